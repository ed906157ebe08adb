"""``radtriage models``: the models in the models folder, available or not and why."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.config import Settings


def _describe(model: Any) -> dict[str, Any]:
    rules = model.spec.series
    return {
        "name": model.name,
        "version": model.version,
        "status": "available",
        "path": str(model.path),
        "intended_use": model.bundle.metadata.intended_use,
        "series": {
            "modality": rules.modality,
            "body_part_examined": rules.body_part_examined,
            "min_slices": rules.min_slices,
            "prefer": rules.prefer,
        },
        "findings": [
            {
                "channel": f.channel,
                "label": f.label,
                "type": f.type.meaning,
                "priority": [r.model_dump(exclude_none=True, mode="json") for r in f.priority],
            }
            for f in model.spec.findings
        ],
    }


def _models(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.ai.registry import load_registry

    check = None
    if not args.quick:
        from pipeline.ai.inference import check_loads

        check = check_loads
    registry = load_registry(settings.models.dir, check=check)
    if args.json:
        rows = [_describe(m) for m in registry.available]
        rows += [
            {"name": u.name, "status": "unavailable", "path": str(u.path), "reason": u.reason}
            for u in registry.unavailable
        ]
        print(json.dumps({"models_dir": str(registry.models_dir), "models": rows}, indent=2))
        return 0
    print(f"models folder: {registry.models_dir}")
    if not registry.available and not registry.unavailable:
        print("no models")
    for model in registry.available:
        labels = ", ".join(f.label for f in model.spec.findings)
        print(f"  available    {model.name} {model.version}  [{'/'.join(model.spec.series.modality)}] {labels}")
    for item in registry.unavailable:
        print(f"  UNAVAILABLE  {item.name}: {item.reason}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("models", help="list the models: available, and unavailable with the reason")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--quick", action="store_true", help="check files only; do not build the networks and load their weights"
    )
    parser.set_defaults(func=_models)
