"""The second shipped model: a ResNet with a non-local block (vggattn.models.zoo), trained on Imagenette."""

import json

import numpy as np
import pytest

from vggattn import explain
from vggattn.models import byo
from vggattn.analysis import analyze
from vggattn.models.checkpoint import CHECKPOINTS
from vggattn.data import load_rgb
from vggattn.view.hover import block_page

ZOO = CHECKPOINTS / "nonlocal-resnet-imagenette-128.safetensors"


@pytest.fixture(scope="module")
def zoo():
    return byo.load_model("vggattn.models.zoo:nonlocal_resnet", ZOO)


def test_it_loads_with_its_description_and_is_small(zoo):
    model, meta = zoo
    assert ZOO.stat().st_size < 25e6 and meta["input_size"] == 128 and len(meta["class_names"]) == 10
    assert float(model.nonlocal3.W[1].weight.abs().mean()) > 0.01  # the block is in use (it starts as the identity)


def test_it_recognises_val_photos(zoo, data_root):
    """Two photos of each class, evenly spaced in the val split: at least 80% right (the card: val top-1 over all
    3,925 photos)."""
    hits, _ = val_hits(*zoo, data_root)
    assert hits >= 16, hits


def val_hits(model, meta, data_root):
    """(how many of two photos of each class, evenly spaced in the val split, the model gets right; the last
    photo's analysis)."""
    hits = 0
    folders = sorted(p for p in (data_root / "val").iterdir() if p.is_dir())
    for label, folder in enumerate(folders):
        files = sorted(folder.glob("*.JPEG"))
        for path in (files[0], files[len(files) // 2]):
            result = analyze(model, meta, load_rgb(path))
            hits += int(max(result.top_k(1), key=result.top_k(1).get) == meta["class_names"][label])
    return hits, result


def test_explain_and_its_shipped_study(tmp_path, zoo):
    out = tmp_path / "out"
    assert explain.main([str(CHECKPOINTS.parent / "assets" / "church.jpg"), "--model", "vggattn.models.zoo:nonlocal_resnet",
                         "--checkpoint", str(ZOO), "--point", "112,60", "--out", str(out)]) == 0
    rows = np.load(out / "church" / "nonlocal3_attention.npy")
    assert rows.shape == (1, 8, 8) and abs(rows.sum() - 1) < 1e-5  # 16x16 queries, keys pooled to 8x8
    result = json.loads((out / "church" / "result.json").read_text())
    assert result["predictions"][0]["class"] == "church"
    study = json.loads(ZOO.with_name(ZOO.stem + ".study.json").read_text())
    assert study["images"] == 3925 and "nonlocal3" in study["layers"]


@pytest.mark.parametrize("registers", [0, 4])
def test_the_small_vits_to_train_are_found_with_their_prefix_by_name(registers):
    """`vggattn.models.zoo.vit_imagenette(_reg4)` (what scripts/train_zoo.py --arch trains): six blocks on a 12x12 grid of
    8 px patches at 96 px, the class token and each register named, every row (the prefix tokens' too) from Q and K."""
    pytest.importorskip("timm")
    import torch

    from vggattn.models import zoo
    from vggattn.attention.adapters import find_blocks

    torch.manual_seed(0)
    model = (zoo.vit_imagenette_reg4 if registers else zoo.vit_imagenette)().eval()
    meta = byo.describe("vggattn.models.zoo:vit_imagenette", 96, [f"c{i}" for i in range(10)])
    image = load_rgb(CHECKPOINTS.parent / "assets" / "church.jpg")
    result = analyze(model, meta, image)
    assert [b.name for b in result.blocks] == [b[0] for b in find_blocks(model, example=result.input)]
    assert len(result.blocks) == 6
    for block in result.blocks:
        assert block.maps.grid == (12, 12) and block.maps.heads == 3
        assert block.maps.prefix_names == ["cls_token"] + [f"reg_token[{i}]" for i in range(registers)]
        page = block_page(block)
        assert page.kind == "qk" and page.tokens == 1 + registers
        np.testing.assert_allclose(page.full_row(144 + registers).sum(), 1.0, atol=1e-9)  # the last prefix token


VITS = {"vit_imagenette": CHECKPOINTS / "vit-imagenette-96.safetensors",
        "vit_imagenette_reg4": CHECKPOINTS / "vit-reg4-imagenette-96.safetensors"}


@pytest.mark.parametrize("factory", list(VITS))
def test_the_shipped_small_vits_recognise_val_photos_and_show_their_prefix(factory, data_root):
    """The small ViTs trained here (checkpoints/README.md has their card): small, loaded with their description;
    two photos of each class, evenly spaced in the val split: at least 10 of 20 right (val top-1 about 60%, the
    card); the page's rows of a patch and of the class token sum to 1 over the patches and the prefix tokens."""
    pytest.importorskip("timm")
    model, meta = byo.load_model(f"vggattn.models.zoo:{factory}", VITS[factory])
    assert VITS[factory].stat().st_size < 25e6 and meta["input_size"] == 96 and len(meta["class_names"]) == 10
    hits, result = val_hits(model, meta, data_root)
    assert hits >= 10, hits
    page = block_page(result.blocks[-1])
    assert page.prefix_names[0] == "cls_token" and page.grid == (12, 12)
    assert page.prefix_names[1:] == (["reg_token[0]", "reg_token[1]", "reg_token[2]", "reg_token[3]"]
                                     if "reg4" in factory else [])
    for i in (0, page.n):  # a patch's row, the class token's own row
        assert page.full_row(i).sum() == pytest.approx(1.0, abs=1e-9)
