"""A model result on disk, so flow tasks can pass a path instead of arrays.

One ``.npz`` per model result: the masks packed as bits, everything else as JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.ai.findings import Code, Finding, ModelIdentity, ModelResult, Priority


def save_model_result(result: ModelResult, path: Path) -> Path:
    """Write ``result`` to ``path`` atomically and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": asdict(result.model),
        "series_instance_uid": result.series_instance_uid,
        "source_sop_instance_uids": list(result.source_sop_instance_uids),
        "findings": [
            {
                "label": f.label,
                "category": asdict(f.category),
                "type": asdict(f.type),
                "anatomic_site": asdict(f.anatomic_site) if f.anatomic_site else None,
                "probability": float(f.probability),
                "present": bool(f.present),
                "volume_ml": float(f.volume_ml),
                "max_diameter_mm": float(f.max_diameter_mm),
                "priority": Priority(f.priority).value,
                "shape": list(f.mask.shape),
            }
            for f in result.findings
        ],
    }
    arrays = {f"mask{i}": np.packbits(np.asarray(f.mask, dtype=bool).ravel()) for i, f in enumerate(result.findings)}
    tmp = path.with_suffix(".tmp.npz")
    with open(tmp, "wb") as handle:
        np.savez(handle, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def load_model_result(path: Path) -> ModelResult:
    """Read a result written by :func:`save_model_result`."""
    with np.load(path) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        findings = []
        for i, f in enumerate(meta["findings"]):
            shape = tuple(f["shape"])
            mask = np.unpackbits(data[f"mask{i}"], count=int(np.prod(shape))).reshape(shape).astype(bool)
            findings.append(
                Finding(
                    label=f["label"],
                    category=Code(**f["category"]),
                    type=Code(**f["type"]),
                    anatomic_site=Code(**f["anatomic_site"]) if f["anatomic_site"] else None,
                    mask=mask,
                    probability=f["probability"],
                    present=f["present"],
                    volume_ml=f["volume_ml"],
                    max_diameter_mm=f["max_diameter_mm"],
                    priority=Priority(f["priority"]),
                )
            )
    model = meta["model"]
    return ModelResult(
        model=ModelIdentity(
            name=model["name"],
            version=model["version"],
            family=Code(**model["family"]),
            description=model.get("description", ""),
        ),
        series_instance_uid=meta["series_instance_uid"],
        source_sop_instance_uids=meta["source_sop_instance_uids"],
        findings=findings,
    )
