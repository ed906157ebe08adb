"""The layout's own checks: the cycle finder finds cycles, the contracts can break,
and ``config/default.toml`` documents every key radtriage reads."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
from pydantic import BaseModel

from pipeline.config import Settings
from scripts.check_import_cycles import cycles

ROOT = Path(__file__).resolve().parents[2]


def _graph(*edges: tuple[str, str]) -> grimp.ImportGraph:
    graph = grimp.ImportGraph()
    for importer, imported in edges:
        graph.add_import(importer=importer, imported=imported)
    return graph


def test_the_cycle_check_finds_a_cycle_through_three_modules_and_only_that() -> None:
    graph = _graph(
        ("pipeline.a", "pipeline.b"),
        ("pipeline.b", "pipeline.c"),
        ("pipeline.c", "pipeline.a"),
        ("pipeline.c", "pipeline.d"),
        ("flows.x", "pipeline.a"),
    )
    assert cycles(graph) == [["pipeline.a", "pipeline.b", "pipeline.c"]]
    assert cycles(_graph(("pipeline.a", "pipeline.b"), ("flows.x", "pipeline.a"))) == []


def test_the_package_has_no_import_cycles() -> None:
    assert cycles(grimp.build_graph("pipeline", "flows")) == []


def test_a_broken_contract_fails_and_names_the_import(tmp_path: Path) -> None:
    """Copy the package, make the worklist import inference (torch), run lint-imports."""
    for package in ("pipeline", "flows"):
        subprocess.run(["cp", "-r", str(ROOT / package), str(tmp_path / package)], check=True)
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    worklist = tmp_path / "pipeline" / "web" / "worklist.py"
    worklist.write_text(
        worklist.read_text()
        + "\n\ndef _bad() -> None:\n    from pipeline.ai.inference import load_model  # noqa: F401\n"
    )
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run(
        [str(lint), "--no-cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode != 0
    assert "Nothing that answers DICOM or HTTP imports torch or MONAI BROKEN" in out.stdout.replace("\n", " ")
    assert "pipeline.web.worklist -> pipeline.ai.inference" in out.stdout


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_default_toml_documents_every_key() -> None:
    text = (ROOT / "config" / "default.toml").read_text()
    tomllib.loads(text)  # it parses
    section, present = "", set()
    for line in text.splitlines():
        if match := re.match(r"^\s*#?\s*\[+([\w.]+)\]+\s*$", line):
            section = match.group(1) + "."
            present.add(match.group(1))
        elif match := re.match(r"^\s*#?\s*(\w+)\s*=", line):
            present.add(section + match.group(1))
    missing = [k for k in _keys(Settings) if k not in present]
    assert missing == [], f"config/default.toml does not mention: {', '.join(missing)}"
