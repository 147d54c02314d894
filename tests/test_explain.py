"""python -m vggattn.explain and the gamma-over-training plot, end to end on a tiny checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import vggattn
from conftest import tiny_meta, tiny_model
from vggattn import explain
from vggattn.training import plots
from vggattn.data import query_index

ASSETS = vggattn.DEFAULT_CHECKPOINT.parent.parent / "assets"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    vggattn.save_checkpoint(tiny_model(), tiny_meta(input_size=64), path)
    return path


def test_two_images_write_what_is_promised(tiny_checkpoint, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(ASSETS / "church.jpg", images / "church.jpg")
    Image.open(ASSETS / "springer.jpg").resize((300, 200)).save(images / "dog.png")
    out = tmp_path / "out"
    rc = explain.main([str(images), "--checkpoint", str(tiny_checkpoint), "--point", "10,20", "--point", "150,100",
                       "--out", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["church", "dog"]
    for name, size in (("church", (224, 224)), ("dog", (300, 200))):
        d = out / name
        result = json.loads((d / "result.json").read_text())
        assert result["image_size"] == list(size) and len(result["predictions"]) == 5
        assert list(result["gammas"]) == ["features.14", "features.22", "features.30"]
        assert [layer["grid"] for layer in result["layers"]] == [[16, 16], [8, 8], [4, 4]]
        assert all(len(layer["top5_attention_off"]) == 5 for layer in result["layers"])
        for point in result["points"]:
            for layer in result["layers"]:
                readout = point["layers"][layer["name"]]
                assert readout["query_index"] == query_index(tuple(point["xy"]), size, tuple(layer["grid"]))
                assert 0 <= readout["entropy_fraction"] <= 1 and len(readout["top_cells"]) == 5
        assert sorted(result["files"]) == sorted(p.name for p in d.iterdir())
        rows = np.load(d / "features.22_attention.npy")
        assert rows.shape == (2, 8, 8) and np.allclose(rows.sum((1, 2)), 1, atol=1e-5)
        assert np.load(d / "features.14_contribution.npy").shape == (16, 16)
        assert np.load(d / "features.30_mean_attention.npy").shape == (4, 4)
        assert np.load(d / "gradcam.npy").shape == (4, 4)
        # the page's other two views at each point: what each key brings and the effect of removing it
        value, moved = np.load(d / "features.22_value.npy"), np.load(d / "features.22_effect.npy")
        assert value.shape == moved.shape == (2, 8, 8) and (value >= 0).all() and (moved >= 0).all()
        if name == "church":
            from vggattn.attention.effect import effect, full_rows
            from vggattn.analysis import analyze
            from vggattn.models.checkpoint import load_checkpoint

            model, meta = load_checkpoint(tiny_checkpoint, device="cpu")
            block = analyze(model, meta, Image.open(d.parent.parent / "in" / "church.jpg")).blocks[1]
            want = effect(full_rows(block.maps, block.query_index((150, 100))), block.keys_contributions()[0])
            assert want.max() > 0  # (gamma 0.5: the block's keys do change its output)
            np.testing.assert_allclose(moved[1].ravel(), want.numpy(), rtol=1e-4, atol=1e-9)
        with Image.open(d / "figure.png") as fig:
            assert fig.format == "PNG" and fig.width > 800


def test_bad_images_and_points_are_reported_and_skipped(tiny_checkpoint, tmp_path, caplog):
    images = tmp_path / "in"
    images.mkdir()
    shutil.copy(ASSETS / "church.jpg", images / "a.jpg")
    (images / "b.jpg").write_text("not an image")
    out = tmp_path / "out"
    assert explain.main([str(images), "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--no-ablation"]) == 2
    assert (out / "a" / "result.json").exists() and not (out / "b").exists()
    assert "b.jpg" in caplog.text
    assert explain.main([str(images / "a.jpg"), "--checkpoint", str(tiny_checkpoint), "--point", "500,5",
                         "--out", str(tmp_path / "o2")]) == 2
    assert "outside the 224x224 image" in caplog.text
    # relative points land at the same pixel on every image size
    assert explain.main([str(images / "a.jpg"), "--checkpoint", str(tiny_checkpoint), "--relative", "--point", "0.5,1",
                         "--out", str(tmp_path / "o3"), "--no-ablation"]) == 0
    assert json.loads((tmp_path / "o3" / "a" / "result.json").read_text())["points"][0]["xy"] == [112, 223]
    assert explain.main([str(tmp_path / "missing.jpg"), "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 2


def test_gamma_plot_from_log_and_from_checkpoints(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"epoch": e, "gammas": {"features.14": -0.1 * e, "features.22": 0.01 * e,
                                                              "features.30": 0.0}}) + "\n" for e in (1, 2, 3)))
    assert plots.gamma_series(plots.read_history([tmp_path]))["features.14"] == pytest.approx([-0.1, -0.2, -0.3])
    paths = []
    for epoch, g in ((2, 0.3), (1, 0.1)):
        model = tiny_model()
        with torch.no_grad():
            model.features[22].gamma.fill_(g)
        meta = tiny_meta(input_size=64)
        meta["training"] = {"epochs": epoch}
        paths.append(tmp_path / f"e{epoch}.safetensors")
        vggattn.save_checkpoint(model, meta, paths[-1])
    history = plots.read_history(paths)
    assert [r["epoch"] for r in history] == [1, 2]
    assert plots.gamma_series(history)["features.22"] == pytest.approx([0.1, 0.3])
    plots.main([str(p) for p in paths] + ["--out", str(tmp_path / "g.png")])
    with Image.open(tmp_path / "g.png") as im:
        assert im.format == "PNG"
