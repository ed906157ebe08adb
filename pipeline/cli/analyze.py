"""``radtriage analyze STUDY_DIR``: run the matching models on a study folder and print the findings.

The same code path as the triage flow (select series, load volume, run model), without
the archive: for people who are not in a notebook.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.config import Settings


def _entry(analysis: Any) -> dict[str, Any]:
    series = analysis.series
    result = analysis.result
    return {
        "model": analysis.model.name,
        "version": analysis.model.version,
        "status": analysis.status,
        "error": analysis.error,
        "series_instance_uid": series.series_instance_uid if series else None,
        "series_description": series.series_description if series else None,
        "number_of_instances": series.number_of_instances if series else None,
        "seconds": round(analysis.seconds, 2),
        "priority": result.priority.value if result else None,
        "findings": [
            {
                "label": f.label,
                "present": f.present,
                "probability": round(f.probability, 4),
                "volume_ml": round(f.volume_ml, 3),
                "max_diameter_mm": round(f.max_diameter_mm, 1),
                "priority": f.priority.value,
                "type": {"value": f.type.value, "scheme": f.type.scheme, "meaning": f.type.meaning},
                "category": {"value": f.category.value, "scheme": f.category.scheme, "meaning": f.category.meaning},
            }
            for f in (result.findings if result else [])
        ],
    }


def _analyze(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.ai.inference import analyze_study
    from pipeline.ai.registry import load_registry
    from pipeline.errors import PermanentError

    study = Path(args.study_dir)
    if not study.is_dir():
        raise PermanentError(f"{study} is not a folder; give the folder that holds the study's DICOM files")
    files = sorted(p for p in study.rglob("*") if p.is_file())
    if not files:
        raise PermanentError(f"{study} holds no files")
    registry = load_registry(settings.models.dir)
    for item in registry.unavailable:
        # On stderr: stdout stays parseable with --json.
        print(f"note: model {item.name} unavailable: {item.reason}", file=sys.stderr)
    analyses = analyze_study(registry, files, model_name=args.model, device=args.device or settings.models.device)
    entries = [_entry(a) for a in analyses]
    if args.json:
        print(json.dumps({"study_dir": str(study), "results": entries}, indent=2))
    else:
        if not entries:
            print("no models available")
        for e in entries:
            head = f"{e['model']} {e['version']}"
            if e["status"] == "no matching series":
                print(f"{head}: no matching series")
                continue
            where = f"series {e['series_instance_uid']} ({e['series_description'] or 'no description'}, {e['number_of_instances']} images)"
            if e["status"] == "failed":
                print(f"{head}: FAILED on {where}: {e['error']}")
                continue
            print(f"{head} on {where} in {e['seconds']:.1f} s: priority {e['priority']}")
            for f in e["findings"]:
                state = "PRESENT" if f["present"] else "absent"
                print(
                    f"  {f['label']}: {state}  p={f['probability']:.2f}  {f['volume_ml']:.1f} ml  "
                    f"max diameter {f['max_diameter_mm']:.0f} mm  priority {f['priority']}"
                )
    return 1 if any(e["status"] == "failed" for e in entries) else 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("analyze", help="run the matching models on a study folder and print the findings")
    parser.add_argument("study_dir", help="folder with the study's DICOM files (searched recursively)")
    parser.add_argument("--model", help="run only this model (name or folder name)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: models.device from the config")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_analyze)
