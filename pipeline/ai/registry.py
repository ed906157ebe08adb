"""The models folder: every bundle validated at start, the broken ones listed with why.

A broken bundle never stops the others. ``name`` + ``version`` is unique: a second
folder with the same pair is refused (the first, in folder-name order, wins).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from pipeline.ai.bundle import SEMVER, Bundle, check_bundle
from pipeline.ai.findings import ModelIdentity
from pipeline.ai.spec import TriageSpec
from pipeline.errors import ConfigError, RadtriageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisteredModel:
    """A model that passed validation and may run."""

    name: str
    version: str
    path: Path
    spec: TriageSpec
    identity: ModelIdentity
    bundle: Bundle
    models_dir: Path

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


class UnavailableModel(NamedTuple):
    """A folder that is not a usable model; ``reason`` says what to fix."""

    path: Path
    reason: str

    @property
    def name(self) -> str:
        return self.path.name


def version_key(version: str) -> tuple:
    match = SEMVER.match(version)
    if not match:
        return (-1, -1, -1, 0)
    release = 1 if "-" not in version.split("+")[0] else 0  # 1.0.0-rc1 < 1.0.0
    return (*(int(g) for g in match.groups()), release)


@dataclass
class Registry:
    """What the models folder holds."""

    models_dir: Path
    available: list[RegisteredModel] = field(default_factory=list)
    unavailable: list[UnavailableModel] = field(default_factory=list)

    def get(self, name: str, version: str | None = None) -> RegisteredModel:
        """The model called ``name`` (or in folder ``name``); the highest version unless one is given.

        Raises
        ------
        ConfigError
            When there is no such available model; the message lists what there is.
        """
        matches = [
            m for m in self.available if name in (m.name, m.path.name) and (version is None or m.version == version)
        ]
        if not matches:
            why = [u.reason for u in self.unavailable if u.path.name == name]
            known = ", ".join(m.key for m in self.available) or "none"
            detail = f" (unavailable: {why[0]})" if why else ""
            raise ConfigError(
                f"no model {name}{'@' + version if version else ''} in {self.models_dir}{detail}; available: {known}"
            )
        return max(matches, key=lambda m: version_key(m.version))


def _register(bundle: Bundle, models_dir: Path) -> RegisteredModel:
    meta = bundle.metadata
    identity = ModelIdentity(
        name=meta.name,
        version=meta.version,
        family=bundle.spec.algorithm_family.to_code(),
        description=meta.description or meta.intended_use,
    )
    return RegisteredModel(meta.name, meta.version, bundle.path, bundle.spec, identity, bundle, models_dir)


ModelCheck = Callable[[RegisteredModel], object]


def load_registry(models_dir: Path | str, *, check: ModelCheck | None = None) -> Registry:
    """Discover and validate every model folder under ``models_dir``.

    Only files and their consistency are checked here (no torch). A model that also
    has to load should be checked by the caller's ``check``, e.g.
    :func:`pipeline.ai.inference.check_loads` (builds the network, loads its weights):
    a model it raises for is listed as unavailable with the reason.
    """
    models_dir = Path(models_dir).resolve()
    registry = Registry(models_dir)
    if not models_dir.is_dir():
        log.warning("models folder %s does not exist; no models available", models_dir)
        return registry
    seen: dict[tuple[str, str], Path] = {}
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        try:
            model = _register(check_bundle(folder), models_dir)
            if (model.name, model.version) in seen:
                raise ConfigError(
                    f"{model.key} is already provided by {seen[(model.name, model.version)].name}; "
                    "bump the version in metadata.json"
                )
            if check is not None:
                check(model)
        except RadtriageError as err:
            log.warning("model %s unavailable: %s", folder.name, err)
            registry.unavailable.append(UnavailableModel(folder, str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - a bundle's own code may raise anything; it must not stop the others
            log.warning("model %s unavailable: %s: %s", folder.name, type(err).__name__, err)
            registry.unavailable.append(UnavailableModel(folder, f"{type(err).__name__}: {err}"))
            continue
        seen[(model.name, model.version)] = folder
        registry.available.append(model)
    return registry
