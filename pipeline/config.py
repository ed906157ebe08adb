"""Typed settings from a TOML file, overridable per key by environment variables.

The file is ``--config FILE`` or ``$RADTRIAGE_CONFIG`` (default ``config/default.toml``
when it exists). Every key can be overridden as ``RADTRIAGE_<SECTION>__<KEY>``, e.g.
``RADTRIAGE_DICOM__PORT=11113`` or
``RADTRIAGE_FORWARD__DESTINATIONS='[{"ae_title": "ORTHANC", ...}]'``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pipeline.errors import ConfigError

DEFAULT_CONFIG = Path("config/default.toml")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSSettings(_Section):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = True


PeerRight = Literal["store", "query", "retrieve", "move_destination"]


class DicomPeer(_Section):
    """A known DICOM node: where it listens and what it may do here.

    ``store``: send us instances (as ``allowed_aes`` does); ``query``: C-FIND;
    ``retrieve``: C-MOVE and C-GET; ``move_destination``: receive what a C-MOVE sends.
    """

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    allow: list[PeerRight] = Field(default_factory=list)

    _ae = field_validator("ae_title")(lambda cls, v: _check_ae_title(v))


class DicomSettings(_Section):
    ae_title: str = "RADTRIAGE"
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)  # 0: any free port (tests)
    allowed_aes: list[str] = Field(
        default_factory=lambda: ["STORESCU", "ECHOSCU", "FINDSCU", "MOVESCU", "GETSCU", "RADTRIAGE"]
    )
    max_pdu_size: int = Field(4_194_304, ge=0)
    network_timeout_seconds: float = Field(60.0, gt=0)
    # Called AE titles accepted; empty: ae_title only; "*": any.
    called_aes: list[str] = Field(default_factory=list)
    # Seconds from a connection to its accepted association (A-ASSOCIATE-RQ read and answered).
    association_timeout_seconds: float = Field(10.0, gt=0)
    # Seconds one PDU may take from its first byte to its last.
    pdu_timeout_seconds: float = Field(30.0, gt=0)
    max_associations: int = Field(64, ge=1)
    max_associations_per_address: int = Field(16, ge=1)
    # Receiver processes accepting on the port: "auto" is one per CPU core, 1 is one process.
    workers: int | Literal["auto"] = "auto"
    # Known DICOM nodes and what each may do (query, retrieve, be a C-MOVE destination).
    peers: list[DicomPeer] = Field(default_factory=list)
    # C-FIND: PatientName/ReferringPhysicianName match case-sensitively (PS3.4 C.2.2.2.1).
    strict_person_name_matching: bool = False
    tls: TLSSettings = Field(default_factory=TLSSettings)

    _ae = field_validator("ae_title")(lambda cls, v: _check_ae_title(v))

    @field_validator("allowed_aes", "called_aes")
    @classmethod
    def _allowed(cls, value: list[str]) -> list[str]:
        return [v if v == "*" else _check_ae_title(v) for v in value]

    @property
    def open_to_all(self) -> bool:
        return "*" in self.allowed_aes

    @field_validator("peers")
    @classmethod
    def _unique_peers(cls, value: list[DicomPeer]) -> list[DicomPeer]:
        titles = [p.ae_title for p in value]
        twice = sorted({t for t in titles if titles.count(t) > 1})
        if twice:
            raise ValueError(f"AE title(s) {', '.join(twice)} listed more than once; give each peer one entry")
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: object) -> int | str:
        if value == "auto":
            return value
        text = str(value).strip()
        if isinstance(value, bool) or not text.isdigit() or not 1 <= int(text) <= 256:
            raise ValueError(f'{value!r}: give "auto" (one receiver process per CPU core) or a number from 1 to 256')
        return int(text)

    @property
    def worker_processes(self) -> int:
        """How many receiver processes ``workers`` means here ("auto": the CPU cores this
        process may run on)."""
        if self.workers != "auto":
            return self.workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, cores or 1)

    @property
    def called_ae_titles(self) -> list[str]:
        """The called AE titles an association may ask for (``called_aes`` or ``ae_title``)."""
        return self.called_aes or [self.ae_title]


class StorageSettings(_Section):
    data_dir: Path = Path("var/data")
    fsync: bool = True
    # A group that may read (not write) the data folder; empty: radtriage's user alone.
    group: str = ""


class IndexSettings(_Section):
    # Empty means SQLite in <data_dir>/index.sqlite; a postgresql+psycopg:// URL for scale-out.
    url: str = ""


Urgency = Literal["critical", "urgent", "routine"]


def regular_expression(value: str | None) -> str | None:
    """A pydantic check: ``value`` compiles as a regular expression (``None`` passes)."""
    if value is not None:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
    return value


class QueueRule(_Section):
    """Raise a study's place in the AI queue from what is known before inference.

    Every condition given must hold; list conditions match any of their values
    (case-insensitive). A study takes the most urgent level among the rules that match
    it and the ``urgency`` of the models that will read it (``routine`` when none).
    """

    level: Urgency
    # Names of the models that will read the study (their bundle's metadata name).
    model: list[str] = Field(default_factory=list)
    # Of a series a model will read.
    modality: list[str] = Field(default_factory=list)
    body_part_examined: list[str] = Field(default_factory=list)
    # From the study's images when the modality sends them: Requested Procedure Priority
    # (0040,1003: STAT, HIGH, ROUTINE, MEDIUM, LOW; top level or in the Request Attributes
    # Sequence) and Study Priority ID (0032,000C: HIGH, MED, LOW).
    requested_procedure_priority: list[str] = Field(default_factory=list)
    study_priority_id: list[str] = Field(default_factory=list)
    # The AE title that sent the study (kept as SourceApplicationEntityTitle in the file).
    calling_ae: list[str] = Field(default_factory=list)
    # Regular expression searched, case-insensitively, in InstitutionalDepartmentName (0008,1040).
    institutional_department_name: str | None = None

    @field_validator(
        "model", "modality", "body_part_examined", "requested_procedure_priority", "study_priority_id", "calling_ae"
    )
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [v.strip().upper() for v in values]

    @field_validator("institutional_department_name")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        return regular_expression(value)

    @model_validator(mode="after")
    def _has_condition(self) -> QueueRule:
        if not self.model_dump(exclude={"level"}, exclude_defaults=True):
            raise ValueError(f"a priority rule for {self.level!r} needs at least one condition (e.g. calling_ae)")
        return self

    @property
    def reads_headers(self) -> bool:
        """Whether the rule needs an image header (not only the index and the models)."""
        return bool(
            self.requested_procedure_priority
            or self.study_priority_id
            or self.calling_ae
            or self.institutional_department_name
        )


def _default_queue_rules() -> list[QueueRule]:
    return [
        QueueRule(level="critical", requested_procedure_priority=["STAT"]),
        QueueRule(level="urgent", requested_procedure_priority=["HIGH"]),
        QueueRule(level="urgent", study_priority_id=["HIGH"]),
        QueueRule(level="urgent", institutional_department_name=r"emergency|^(ED|ER|A&E)$"),
    ]


class TriageSettings(_Section):
    # false: archive only (receiver, sweep, forwarder, web); no Prefect, no models
    enabled: bool = True
    stable_age_seconds: float = Field(10.0, ge=0)
    sweep_interval_seconds: float = Field(1.0, gt=0)
    # Flow runs executed at once by this process's worker; inference inside them is
    # further limited to `inference_slots` (this process's slots, then a Prefect
    # concurrency limit). A run is claimed only when a slot is free for it, so the queue's
    # order holds; `inference_slots + 1` lets a run's last steps overlap the next inference.
    max_parallel_flows: int = Field(2, ge=1)
    inference_slots: int = Field(1, ge=1)
    # Port of the embedded Prefect server (started when PREFECT_API_URL is not set); 0 = any free port.
    embedded_prefect_port: int = Field(4200, ge=0, le=65535)
    # Embedded server only: record task runs for the Prefect UI. Off by default: on its
    # SQLite database the task-run recorder's writes stall each study by ~2 s. Flow runs,
    # states and logs are recorded either way; radtriage keeps per-step timings itself.
    embedded_prefect_task_history: bool = False
    # The Prefect work pool of the triage-study deployment; one work queue per urgency
    # (critical, urgent, routine, in that priority). As in prefect.yaml.
    work_pool: str = Field("radtriage", min_length=1, max_length=100)
    # serve only: run triage flow runs in this process too. false on a front node whose
    # flow runs are all executed by `radtriage worker` processes on other machines.
    local_worker: bool = True
    # How this process's worker is named in Prefect (its heartbeats, and the label
    # radtriage.worker on every flow run it executes); empty: <hostname>-<pid>.
    worker_name: str = Field("", max_length=100)
    # Seconds between the worker's heartbeats to the work pool. The dispatching node
    # takes a worker that missed 3 of them as dead and dispatches its runs again.
    worker_heartbeat_seconds: int = Field(10, ge=1)
    # The AI queue's order (see QueueRule); then oldest first.
    priority_rules: list[QueueRule] = Field(default_factory=_default_queue_rules)


class ModelSettings(_Section):
    dir: Path = Path("models")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class ResultSettings(_Section):
    manufacturer: str = "radtriage"
    seg_series_number: int = Field(9001, ge=1)
    sr_series_number: int = Field(9002, ge=1)
    seg_series_description: str = "AI segmentation"
    sr_series_description: str = "AI findings"
    # Device Serial Number of the writer (type 1 in SEG's Enhanced General Equipment).
    device_serial_number: str = Field("1", min_length=1, max_length=64)
    institution_name: str = ""


class ForwardDestination(_Section):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    kinds: list[Literal["SEG", "SR"]] = Field(default_factory=lambda: ["SEG", "SR"])

    _ae = field_validator("ae_title")(lambda cls, v: _check_ae_title(v))


class ForwardSettings(_Section):
    destinations: list[ForwardDestination] = Field(default_factory=list)
    max_attempts: int = Field(8, ge=1)
    backoff_seconds: float = Field(5.0, gt=0)
    backoff_max_seconds: float = Field(600.0, gt=0)


class WebSettings(_Section):
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0: any free port (tests)
    secret_key: str = ""  # empty: generated once and kept in <data_dir>/web_secret
    login_max_failures: int = Field(5, ge=1)
    login_lockout_seconds: float = Field(300.0, gt=0)
    # Each further failure doubles the lockout, up to this; failures are remembered this long.
    login_lockout_max_seconds: float = Field(3600.0, gt=0)
    # A right HTTP Basic password is remembered (as a keyed hash) this long: no argon2 per request.
    basic_auth_cache_seconds: float = Field(60.0, ge=0)
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks).
    trusted_proxies: list[str] = Field(default_factory=list)
    # Serve HTTPS directly (PEM files); both or neither (checked when the web app starts).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    request_header_timeout_seconds: float = Field(10.0, gt=0)
    request_body_timeout_seconds: float = Field(30.0, gt=0)
    max_header_bytes: int = Field(16_384, ge=1024)
    max_connections: int = Field(1000, ge=1)
    max_connections_per_client: int = Field(64, ge=1)
    # One STOW-RS instance (one multipart part) larger than this fails with 0xA700, not stored.
    stow_max_instance_bytes: int = Field(2 * 1024**3, ge=1024)
    # The URL clients reach the web app by, for the links DICOMweb hands out (RetrieveURL,
    # BulkDataURI); empty: the scheme, host and port of each request.
    public_url: str = ""
    # Studies per worklist page (and the API's default limit); the total is always shown.
    worklist_page_size: int = Field(50, ge=10, le=500)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError(f"public_url {value!r} must be an http(s) URL such as https://pacs.example.org")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)") from None
        return [entry.strip() for entry in value]


class Settings(BaseSettings):
    """All radtriage settings. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="RADTRIAGE_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    triage: TriageSettings = Field(default_factory=TriageSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    results: ResultSettings = Field(default_factory=ResultSettings)
    forward: ForwardSettings = Field(default_factory=ForwardSettings)
    web: WebSettings = Field(default_factory=WebSettings)

    @property
    def index_url(self) -> str:
        if self.index.url:
            return self.index.url
        return f"sqlite:///{(self.storage.data_dir / 'index.sqlite').resolve()}"


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(root)"
    env_name = "RADTRIAGE_" + "__".join(str(p).upper() for p in first["loc"][:2])
    if env_name in {name.upper() for name in os.environ}:
        source = f"(environment {env_name})"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid config {source}: {key}: {first['msg']}{more}"


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load settings from ``path`` (or ``$RADTRIAGE_CONFIG``, or the default file).

    Raises
    ------
    ConfigError
        With one line naming the key and the problem.
    """
    chosen = path or os.environ.get("RADTRIAGE_CONFIG")
    if chosen is None and DEFAULT_CONFIG.exists():
        chosen = DEFAULT_CONFIG
    toml_path = Path(chosen) if chosen else None
    if toml_path is not None and not toml_path.is_file():
        raise ConfigError(f"config file {toml_path} does not exist: pass --config FILE or set RADTRIAGE_CONFIG")

    class _FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if toml_path is not None:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
            return tuple(sources)

    try:
        loaded = _FileSettings()
    except ValidationError as err:
        raise ConfigError(_format_error(err, str(toml_path) if toml_path else "(environment)")) from None
    except ValueError as err:  # TOML syntax errors
        raise ConfigError(f"invalid config {toml_path}: {err}") from None
    return Settings.model_validate(loaded.model_dump())
