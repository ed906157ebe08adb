"""Run a registered model on a volume: the code path of the CLI, the notebooks and the flow.

The bundle's ``configs/inference.json`` supplies the network, preprocessing, inferer and
postprocessing. radtriage hands preprocessing ``{"image": MetaTensor}``: one channel of
HU, spatial axes ``(column, row, slice)`` with a RAS affine, as MONAI's ``LoadImaged``
would. Postprocessing must leave ``"pred"`` as per-channel probabilities back on that
input grid (``Invertd``); :func:`run_model` then measures each finding in the source
geometry. A model is loaded once per process and device and reused.

torch and MONAI are imported inside the functions, never at import time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.ai.bundle import WEIGHTS
from pipeline.ai.findings import ModelResult
from pipeline.ai.measure import make_finding
from pipeline.ai.registry import RegisteredModel, Registry
from pipeline.ai.selection import SeriesInfo, select_series, series_from_files
from pipeline.ai.volume import Volume, load_volume
from pipeline.errors import ConfigError, PermanentError, RadtriageError, TransientError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_CACHE: dict[tuple[str, str, str, float], "LoadedModel"] = {}
_CACHE_LOCK = threading.Lock()


def resolve_device(device: str = "auto") -> str:
    """``"auto"``: CUDA when torch sees a GPU, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    return device


@dataclass
class LoadedModel:
    """A bundle's parsed components on one device; share it, it is locked per call."""

    model: RegisteredModel
    device: str
    network: Any
    preprocessing: Any
    inferer: Any
    postprocessing: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


def _check_inside(model: RegisteredModel) -> None:
    # A bundle's "$" expressions are code: only run bundles from the configured models folder.
    path, root = model.path.resolve(), model.models_dir.resolve()
    if root not in path.parents:
        raise ConfigError(f"refusing to run {path}: it is not inside the models folder {root}")


def load_model(model: RegisteredModel, device: str = "auto") -> LoadedModel:
    """Parse the bundle, build the network, load its weights (once per process and device)."""
    import torch
    from monai.bundle import ConfigParser

    _check_inside(model)
    device = resolve_device(device)
    weights = model.path / WEIGHTS
    key = (str(model.path.resolve()), model.version, device, weights.stat().st_mtime)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        started = time.perf_counter()
        parser = ConfigParser()
        parser.read_config(str(model.path / "configs" / "inference.json"))
        parser["bundle_root"] = str(model.path)
        parser["device"] = f"$torch.device('{device}')"
        try:
            network = parser.get_parsed_content("network_def")
            state = torch.load(weights, map_location=device, weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # a MONAI CheckpointSaver file
            network.load_state_dict(state)
            network.to(device).eval()
            loaded = LoadedModel(
                model=model,
                device=device,
                network=network,
                preprocessing=parser.get_parsed_content("preprocessing"),
                inferer=parser.get_parsed_content("inferer"),
                postprocessing=parser.get_parsed_content("postprocessing"),
            )
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError, ImportError) as err:
            raise ConfigError(
                f"model {model.key} ({model.path}) cannot be loaded: {type(err).__name__}: {err}"
            ) from err
        _CACHE[key] = loaded
        log.info("loaded %s on %s in %.1f s", model.key, device, time.perf_counter() - started)
        return loaded


def check_loads(model: RegisteredModel) -> None:
    """A registry check (``load_registry(folder, check=check_loads)``): the network builds
    and its weights load on the CPU."""
    load_model(model, device="cpu")


def volume_to_metatensor(volume: Volume) -> "torch.Tensor":
    """The volume as MONAI expects an image: ``(1, columns, rows, slices)`` with a RAS affine."""
    import torch
    from monai.data import MetaTensor

    lps = np.eye(4)
    lps[:3, :3] = (volume.direction[::-1] * np.asarray(volume.spacing[::-1])[:, None]).T
    lps[:3, 3] = volume.origin
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    array = np.ascontiguousarray(volume.array.transpose(2, 1, 0), dtype=np.float32)
    return MetaTensor(torch.from_numpy(array)[None], affine=torch.from_numpy(ras), meta={"space": "RAS"})


def predict(loaded: LoadedModel, volume: Volume) -> np.ndarray:
    """Per-channel probabilities ``(channels, slices, rows, columns)`` in the source geometry."""
    import torch

    with loaded.lock, torch.inference_mode():
        data = loaded.preprocessing({"image": volume_to_metatensor(volume)})
        try:
            batch = data["image"].unsqueeze(0).to(loaded.device)
            data["pred"] = loaded.inferer(batch, loaded.network)[0].to("cpu")
        except torch.cuda.OutOfMemoryError as err:  # type: ignore[attr-defined]
            torch.cuda.empty_cache()
            raise TransientError(f"GPU out of memory running {loaded.model.key}: {err}") from err
        data = loaded.postprocessing(data)
    pred = np.asarray(data["pred"].detach().cpu().numpy() if hasattr(data["pred"], "detach") else data["pred"])
    expected = volume.shape[::-1]
    if pred.ndim != 4 or tuple(pred.shape[1:]) != expected:
        raise PermanentError(
            f"model {loaded.model.key}: postprocessing returned {tuple(pred.shape)}, expected (channels, "
            f"{', '.join(map(str, expected))}); end postprocessing with Invertd back to the input grid"
        )
    return pred.transpose(0, 3, 2, 1).astype(np.float32, copy=False)


def run_model(model: RegisteredModel, volume: Volume, device: str = "auto") -> ModelResult:
    """Run ``model`` on ``volume`` and measure every finding of its spec.

    Raises
    ------
    ConfigError
        The bundle cannot be loaded (the model is broken, not the study).
    PermanentError
        The bundle produced output radtriage cannot use.
    TransientError
        GPU out of memory: worth retrying.
    """
    started = time.perf_counter()
    loaded = load_model(model, device)
    probabilities = predict(loaded, volume)
    findings = []
    for spec in model.spec.findings:
        if spec.channel >= probabilities.shape[0]:
            raise PermanentError(
                f"model {model.key} returned {probabilities.shape[0]} channels; "
                f"finding {spec.label!r} reads channel {spec.channel}"
            )
        findings.append(make_finding(probabilities[spec.channel], volume, spec))
    log.info(
        "%s on series %s: %s in %.1f s",
        model.key,
        volume.series_instance_uid,
        ", ".join(f"{f.label}={'present' if f.present else 'absent'}" for f in findings),
        time.perf_counter() - started,
    )
    return ModelResult(
        model=model.identity,
        series_instance_uid=volume.series_instance_uid,
        source_sop_instance_uids=list(volume.sop_instance_uids),
        findings=findings,
    )


@dataclass
class SeriesAnalysis:
    """One model on one study: the series it read and what it found, or why not."""

    model: RegisteredModel
    series: SeriesInfo | None
    result: ModelResult | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.error:
            return "failed"
        return "no matching series" if self.series is None else "analysed"


def analyze_series(model: RegisteredModel, series: SeriesInfo, device: str = "auto") -> ModelResult:
    """Load ``series`` as a volume and run ``model`` on it."""
    return run_model(model, load_volume(series.files), device)


def analyze_study(
    registry: Registry,
    files: Sequence[Path] | Path,
    *,
    model_name: str | None = None,
    device: str = "auto",
) -> list[SeriesAnalysis]:
    """Every matching model (or only ``model_name``) on a study's files or folder.

    A model that fails on the study is reported with its error, and the others still run.
    """
    if isinstance(files, Path):
        files = sorted(p for p in files.rglob("*") if p.is_file())
    series = series_from_files(files)
    models = [registry.get(model_name)] if model_name else list(registry.available)
    out = []
    for model in models:
        chosen = select_series(model.spec, series)
        entry = SeriesAnalysis(model, chosen)
        if chosen is not None:
            started = time.perf_counter()
            try:
                entry.result = analyze_series(model, chosen, device)
            except RadtriageError as err:
                log.warning("%s failed on series %s: %s", model.key, chosen.series_instance_uid, err)
                entry.error = str(err)
            entry.seconds = time.perf_counter() - started
        out.append(entry)
    return out
