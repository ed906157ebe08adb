# radtriage: `make run` starts the whole system, `make test` runs the test suite.
# Both set up everything first: Debian packages when missing, then .venv.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb chromium chromium-driver postgresql
CONFIG ?= config/default.toml
PYTEST_ARGS ?=

.PHONY: run test test-postgresql test-fast lint bench setup apt data viewer constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from the CPU wheel; the constraints file keeps it pinned afterwards
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

apt:
	@scripts/ensure-apt.sh $(APT_PACKAGES)

setup: apt $(STAMP)

data: setup
	$(BIN)/python scripts/fetch_data.py

# The OHIF viewer pinned in config/ohif.lock, into .cache/ohif/ (nothing when already there).
viewer: $(STAMP)
	@command -v npm >/dev/null || scripts/ensure-apt.sh npm
	$(BIN)/python scripts/fetch_ohif.py

run: setup viewer
	$(BIN)/radtriage --config $(CONFIG) serve

# Lint, formatting, import contracts (pyproject.toml [tool.importlinter]) and cycles.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	$(BIN)/python scripts/check_import_cycles.py

# Where the index database matters, run again on PostgreSQL by `make test` (README, Tests):
# the study state machine, storing, two receivers and two receiver processes writing one
# instance, dispatch, the forward queue, the worklist SQL, STOW-RS and QIDO/WADO-RS.
# tests/core/test_postgresql.py and test_query_engine.py start PostgreSQL in the first run.
POSTGRESQL_TESTS := tests/core/test_state.py tests/core/test_store_file.py tests/core/test_concurrent_store.py \
	tests/core/test_multiprocess_receive.py::test_same_instance_through_two_processes_is_stored_once \
	tests/flow/test_dispatch.py tests/forward/test_queue.py tests/web/test_worklist_paging.py \
	tests/web/test_stow.py tests/web/test_dicomweb.py

test: setup lint viewer
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	RADTRIAGE_TEST_INDEX=postgresql $(BIN)/python -m pytest $(POSTGRESQL_TESTS) $(PYTEST_ARGS)

# The whole core, flow, forward and web suite with the index on PostgreSQL.
test-postgresql: setup viewer
	RADTRIAGE_TEST_INDEX=postgresql $(BIN)/python -m pytest tests/core tests/flow tests/forward tests/web $(PYTEST_ARGS)

# The inner loop: unit tests only (no servers, notebooks or Chromium), under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/ingest.py --senders 1
	$(BIN)/python benchmarks/ingest.py --senders 4
	$(BIN)/python benchmarks/time_to_triage.py

# After changing dependencies in pyproject.toml: pin what the tests passed with.
constraints: $(STAMP)
	{ echo "# Versions radtriage is tested with (pip freeze of .venv); 'make constraints' regenerates."; \
	  echo "# torch is the CPU build that pip installs from this machine's disk."; \
	  $(BIN)/pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/' | grep -v '^radtriage'; } > constraints.txt

clean:
	rm -rf $(VENV) var .cache
