"""A second, tiny MONAI bundle made by a test: a "dense bone" detector with known weights.

Its network is one 1x1x1 convolution whose hemorrhage-free answer is known in advance
(voxels above ~700 HU are bone), so tests can check that masks come back in exactly the
source geometry, whatever the series' orientation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BONE_HU = 700.0


def make_tiny_bundle(models_dir: Path, name: str = "dense_bone", version: str = "1.0.0") -> Path:
    folder = models_dir / name
    for sub in ("configs", "models", "docs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "metadata.json").write_text(
        json.dumps(
            {
                "name": name,
                "version": version,
                "changelog": {version: "made by a test"},
                "intended_use": "Testing radtriage only.",
                "network_data_format": {
                    "inputs": {"image": {"type": "image", "num_channels": 1}},
                    "outputs": {
                        "pred": {"type": "image", "num_channels": 2, "channel_def": {"0": "background", "1": "bone"}}
                    },
                },
            }
        )
    )
    (folder / "configs" / "inference.json").write_text(
        json.dumps(
            {
                "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
                "preprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
                        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": None},
                        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.5], "mode": "bilinear"},
                        {
                            "_target_": "ScaleIntensityRanged",
                            "keys": "image",
                            "a_min": 0,
                            "a_max": 2000,
                            "b_min": 0.0,
                            "b_max": 1.0,
                        },
                    ],
                },
                "inferer": {"_target_": "SimpleInferer"},
                "postprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                        {
                            "_target_": "Invertd",
                            "keys": "pred",
                            "transform": "@preprocessing",
                            "orig_keys": "image",
                            "nearest_interp": False,
                        },
                    ],
                },
            }
        )
    )
    (folder / "configs" / "triage.json").write_text(
        json.dumps(
            {
                "series": {"modality": ["CT"], "min_slices": 8},
                "findings": [
                    {
                        "channel": 1,
                        "label": "Dense bone",
                        "category": {"value": "91723000", "scheme": "SCT", "meaning": "Anatomical Structure"},
                        "type": {"value": "272673000", "scheme": "SCT", "meaning": "Bone structure"},
                        "min_volume_ml": 1.0,
                    }
                ],
            }
        )
    )
    (folder / "docs" / "README.md").write_text("# dense_bone\n\nTest model: voxels above 700 HU.\n")
    conv = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0] = 60.0  # input is HU / 2000: logit 0 at 700 HU
        conv.bias[1] = -60.0 * BONE_HU / 2000
    torch.save(conv.state_dict(), folder / "models" / "model.pt")
    return folder
