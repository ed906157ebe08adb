"""A triage spec or bundle with a mistake is refused, and the message names the field."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.ai.bundle import check_bundle
from pipeline.ai.findings import Priority
from pipeline.ai.registry import load_registry
from pipeline.ai.spec import load_spec, parse_spec
from pipeline.errors import ConfigError

from .conftest import REFERENCE

VALID = json.loads((REFERENCE / "configs" / "triage.json").read_text())


def _set(path: str, value: object) -> Callable[[dict], None]:
    def change(spec: dict) -> None:
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


_DELETE = object()

MISTAKES = [
    ("no modality", _set("series.modality", _DELETE), "series.modality"),
    ("empty modality", _set("series.modality", []), "series.modality"),
    ("bad regex", _set("series.series_description_exclude", "(unclosed"), "series.series_description_exclude"),
    ("typo in a key", _set("series.min_slice", 3), "series.min_slice"),
    (
        "thickness range upside down",
        _set("series.slice_thickness_mm", {"min": 6, "max": 1}),
        "series.slice_thickness_mm",
    ),
    ("negative thickness", _set("series.slice_thickness_mm", {"min": -1}), "series.slice_thickness_mm.min"),
    ("max slices below min", _set("series.max_slices", 4), "series"),
    ("unknown preference", _set("series.prefer", ["newest"]), "series.prefer.0"),
    ("closest without target", _set("series.target_slice_thickness_mm", _DELETE), "series"),
    ("no findings", _set("findings", []), "findings"),
    ("negative channel", _set("findings.0.channel", -1), "findings.0.channel"),
    ("no label", _set("findings.0.label", _DELETE), "findings.0.label"),
    ("SNOMED code not numeric", _set("findings.0.type.value", "hemorrhage"), "findings.0.type"),
    ("unknown coding scheme", _set("findings.0.category.scheme", "SNOMED"), "findings.0.category.scheme"),
    ("empty code meaning", _set("findings.0.anatomic_site.meaning", ""), "findings.0.anatomic_site.meaning"),
    ("threshold above 1", _set("findings.0.voxel_threshold", 1.5), "findings.0.voxel_threshold"),
    ("unknown priority", _set("findings.0.priority.0.level", "stat"), "findings.0.priority.0.level"),
    ("probability above 1", _set("findings.0.priority.1.min_probability", 2), "findings.0.priority.1.min_probability"),
    ("negative volume", _set("findings.0.min_volume_ml", -3), "findings.0.min_volume_ml"),
    ("HU gate upside down", _set("findings.0.min_hu", 400.0), "findings.0"),
    (
        "probability slope not positive",
        _set("findings.0.study_probability", {"slope": 0}),
        "findings.0.study_probability.slope",
    ),
    (
        "unknown probability method",
        _set("findings.0.study_probability", {"method": "isotonic", "slope": 2}),
        "findings.0.study_probability.method",
    ),
]


@pytest.mark.parametrize(("what", "change", "field"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_each_mistake_is_refused_naming_the_field(what: str, change: Callable[[dict], None], field: str) -> None:
    spec = copy.deepcopy(VALID)
    change(spec)
    with pytest.raises(ConfigError) as caught:
        parse_spec(spec, "configs/triage.json")
    message = str(caught.value)
    assert f"configs/triage.json: {field}" in message, message


def test_the_reference_spec_is_valid_and_means_what_it_says() -> None:
    spec = load_spec(REFERENCE / "configs" / "triage.json")
    finding = spec.findings[0]
    assert finding.type.to_code().value == "50960005"  # SNOMED CT Hemorrhage
    assert finding.priority_for(True, 45.0, 0.9, 60.0) is Priority.CRITICAL
    assert finding.priority_for(True, 2.0, 0.9, 15.0) is Priority.URGENT
    assert finding.priority_for(False, 0.0, 0.1, 0.0) is Priority.ROUTINE


def test_two_findings_on_one_channel_are_refused() -> None:
    spec = copy.deepcopy(VALID)
    spec["findings"].append({**spec["findings"][0], "label": "Other"})
    with pytest.raises(ConfigError, match="same channel"):
        parse_spec(spec)


def test_a_file_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "triage.json"
    path.write_text('{"series": ')
    with pytest.raises(ConfigError, match=f"{path}: not valid JSON"):
        load_spec(path)


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


BUNDLE_MISTAKES = [
    ("version not semver", "metadata.json", _set("version", "1.0"), "metadata.json: version"),
    (
        "changelog lacks version",
        "metadata.json",
        _set("changelog", {"0.0.1": "old"}),
        "changelog has no entry for version",
    ),
    ("no intended use", "metadata.json", _set("intended_use", _DELETE), "metadata.json: intended_use"),
    (
        "no channel_def",
        "metadata.json",
        _set("network_data_format.outputs.pred.channel_def", _DELETE),
        "network_data_format.outputs.pred.channel_def",
    ),
    (
        "channel not in channel_def",
        "configs/triage.json",
        _set("findings.0.channel", 5),
        "findings.0.channel: channel 5",
    ),
    ("no postprocessing", "configs/inference.json", _set("postprocessing", _DELETE), "missing postprocessing"),
]


@pytest.mark.parametrize(("what", "file", "change", "expected"), BUNDLE_MISTAKES, ids=[m[0] for m in BUNDLE_MISTAKES])
def test_bundle_mistakes_are_refused(
    bundle_copy: Path, what: str, file: str, change: Callable[[dict], None], expected: str
) -> None:
    _edit_json(bundle_copy / file, change)
    with pytest.raises(ConfigError) as caught:
        check_bundle(bundle_copy)
    assert expected in str(caught.value), str(caught.value)


def test_missing_weights_are_refused(bundle_copy: Path) -> None:
    (bundle_copy / "models" / "model.pt").unlink()
    with pytest.raises(ConfigError, match="model.pt: missing"):
        check_bundle(bundle_copy)


def test_a_broken_bundle_is_listed_with_its_reason_and_does_not_stop_the_others(bundle_copy: Path) -> None:
    models = bundle_copy.parent
    broken = models / "broken_model"
    broken.mkdir()
    (broken / "metadata.json").write_text("{not json")
    duplicate = models / "head_ct_hemorrhage_copy"
    import shutil

    shutil.copytree(bundle_copy, duplicate)
    newer = models / "head_ct_hemorrhage_next"
    shutil.copytree(bundle_copy, newer)
    _edit_json(
        newer / "metadata.json", lambda m: m.update(version="9.0.0", changelog={**m["changelog"], "9.0.0": "next"})
    )

    registry = load_registry(models)

    current = json.loads((bundle_copy / "metadata.json").read_text())["version"]
    assert sorted(m.key for m in registry.available) == [f"head_ct_hemorrhage@{current}", "head_ct_hemorrhage@9.0.0"]
    reasons = {u.name: u.reason for u in registry.unavailable}
    assert set(reasons) == {"broken_model", "head_ct_hemorrhage_copy"}
    assert "not valid JSON" in reasons["broken_model"]
    assert "already provided by head_ct_hemorrhage" in reasons["head_ct_hemorrhage_copy"]
    assert registry.get("head_ct_hemorrhage").version == "9.0.0"
    assert registry.get("head_ct_hemorrhage", current).path == bundle_copy.resolve()
    with pytest.raises(ConfigError, match="broken_model.*not valid JSON"):
        registry.get("broken_model")
