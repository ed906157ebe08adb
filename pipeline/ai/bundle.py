"""A model folder: a MONAI bundle plus radtriage's triage spec.

Layout (the MONAI bundle format, https://docs.monai.io/en/latest/mb_specification.html)::

    models/<folder>/
        metadata.json          name, semver version, changelog, intended_use,
                               network_data_format (outputs.pred.channel_def)
        configs/inference.json network_def, preprocessing, inferer, postprocessing
        configs/triage.json    radtriage's spec (pipeline.ai.spec)
        models/model.pt        weights (a state_dict)
        docs/README.md         model card

:func:`check_bundle` validates all of it without running any of the bundle's code;
``$`` expressions in ``inference.json`` are code and only run when the model is loaded
for inference (:mod:`pipeline.ai.inference`), and only from the configured models folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.ai.spec import TriageSpec, format_validation_error, load_spec
from pipeline.errors import ConfigError

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
REQUIRED_CONFIG_IDS = ("network_def", "preprocessing", "inferer", "postprocessing")
WEIGHTS = Path("models/model.pt")


class _Output(BaseModel):
    model_config = ConfigDict(extra="allow")
    channel_def: dict[str, str] = Field(min_length=1)


class _DataFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    inputs: dict[str, dict[str, Any]] = Field(min_length=1)
    outputs: dict[str, _Output]

    @field_validator("outputs")
    @classmethod
    def _has_pred(cls, value: dict[str, _Output]) -> dict[str, _Output]:
        if "pred" not in value:
            raise ValueError("needs an output named 'pred' with a channel_def")
        return value


class BundleMetadata(BaseModel):
    """The parts of ``metadata.json`` radtriage relies on; other keys are kept as they are."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    version: str
    changelog: dict[str, str] = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    description: str = ""
    network_data_format: _DataFormat

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not SEMVER.match(value):
            raise ValueError(f"{value!r} is not a semantic version (MAJOR.MINOR.PATCH)")
        return value

    @model_validator(mode="after")
    def _changelog_has_version(self) -> "BundleMetadata":
        if self.version not in self.changelog:
            raise ValueError(f"changelog has no entry for version {self.version}")
        return self

    @property
    def channel_def(self) -> dict[int, str]:
        return {int(k): v for k, v in self.network_data_format.outputs["pred"].channel_def.items()}


class Bundle(BaseModel):
    """A validated model folder (no code from it has run)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    path: Path
    metadata: BundleMetadata
    spec: TriageSpec
    inference_config: dict[str, Any]

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def model_card(self) -> Path:
        return self.path / "docs" / "README.md"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; a model bundle needs {what}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None


def load_metadata(path: Path) -> BundleMetadata:
    data = _read_json(
        path / "metadata.json", "metadata.json (name, version, changelog, intended_use, network_data_format)"
    )
    if isinstance(data, dict) and "name" not in data:
        data = {**data, "name": path.name}
    try:
        return BundleMetadata.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path / "metadata.json"))) from None


def check_bundle(path: Path | str) -> Bundle:
    """Validate a model folder's files and their consistency.

    Raises
    ------
    ConfigError
        The first problem found, naming the file and field.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a folder")
    metadata = load_metadata(path)
    spec = load_spec(path / "configs" / "triage.json")
    config = _read_json(path / "configs" / "inference.json", "configs/inference.json")
    if not isinstance(config, dict):
        raise ConfigError(f"{path / 'configs/inference.json'}: must be a JSON object")
    missing = [key for key in REQUIRED_CONFIG_IDS if key not in config]
    if missing:
        raise ConfigError(
            f"{path / 'configs/inference.json'}: missing {', '.join(missing)} "
            f"(radtriage runs network_def, preprocessing, inferer and postprocessing)"
        )
    channels = metadata.channel_def
    for i, finding in enumerate(spec.findings):
        if finding.channel not in channels:
            raise ConfigError(
                f"{path / 'configs/triage.json'}: findings.{i}.channel: channel {finding.channel} is not in "
                f"metadata.json network_data_format.outputs.pred.channel_def {sorted(channels)}"
            )
    weights = path / WEIGHTS
    if not weights.is_file() or weights.stat().st_size == 0:
        raise ConfigError(f"{weights}: missing or empty; save the network's state_dict there")
    return Bundle(path=path, metadata=metadata, spec=spec, inference_config=config)
