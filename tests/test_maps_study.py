"""Scoring maps against what the model does (vggattn.study.maps): on a model whose answer depends on one patch
only, the map that points at it wins every score; the study over the shipped ViT's images writes its tables."""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vggattn.study.maps import image_scores

HERE = Path(__file__).resolve().parents[1]


class OnePatch(nn.Module):
    """Two classes; class 0's logit is 4 x the mean of patch (1, 2) of a 4x4 grid over a 32 px input."""

    def forward(self, x):
        patch = x[:, :, 8:16, 16:24].mean((1, 2, 3))
        return torch.stack([4 * patch, torch.zeros_like(patch)], -1)


def test_the_map_on_the_patch_that_matters_wins_every_score():
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    x[:, :, 8:16, 16:24] = 1.0  # class 0 at p = sigmoid(4); blurred, the patch is dimmer
    right = np.zeros((4, 4))
    right[1, 2] = 1.0
    right += np.linspace(0, 0.1, 16).reshape(4, 4)  # the other patches ordered, below it
    wrong = right.max() - right  # the patch that matters last
    got = image_scores(OnePatch(), x, {"right": right, "wrong": wrong}, target=0)
    assert got["right"]["pos"] < got["wrong"]["pos"]  # deleting it first drops p at once
    assert got["right"]["neg"] > got["wrong"]["neg"]
    assert got["right"]["ins"] > got["wrong"]["ins"]
    assert got["right"]["spearman"] > 0 > got["wrong"]["spearman"]


def test_the_map_study_over_images_of_the_shipped_vit(tmp_path):
    from vggattn import study

    data = tmp_path / "images"
    data.mkdir()
    for name in ("church.jpg",):
        (data / name).write_bytes((HERE / "assets" / name).read_bytes())
    out = tmp_path / "maps"
    assert study.main(["--model", "vggattn.models.zoo:vit_imagenette", "--checkpoint",
                       str(HERE / "checkpoints" / "vit-imagenette-96.safetensors"), "--maps",
                       "weights,value,relevance", "--data", str(data), "--out", str(out), "--bootstrap", "50"]) == 0
    got = json.loads((out / "study.json").read_text())["maps"]
    assert got["images"] == 1 and set(got["scores"]) == {"weights", "value", "relevance"}
    for kind in got["scores"].values():
        assert all(0 <= kind[s][0] <= 1 for s in ("pos", "neg", "ins"))
    assert any("Chefer" in o["claim"] for o in got["orderings"])
    assert "Which map to believe" in (out / "report.html").read_text()
    assert study.main(["--model", "vggattn.models.zoo:vit_imagenette", "--checkpoint",
                       str(HERE / "checkpoints" / "vit-imagenette-96.safetensors"), "--maps", "nope",
                       "--data", str(data), "--out", str(out)]) == 2
