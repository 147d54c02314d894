"""Bring your own model (vggattn.models.byo): a factory and its weights, or timm by name, through vggattn-explain."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vggattn import explain
from vggattn.models import byo
from vggattn import app
from vggattn.analysis import analyze
from vggattn.models.checkpoint import CheckpointError
from vggattn.data import eval_transform, to_rgb

ASSET = app.HERE / "assets" / "church.jpg"


def test_a_discriminator_gets_its_score_and_every_blocks_rows(tmp_path):
    import byo_models

    torch.manual_seed(0)
    d = byo_models.discriminator()
    torch.save(d.state_dict(), tmp_path / "d.pth")
    out = tmp_path / "out"
    code = explain.main([str(ASSET), "--model", "byo_models:discriminator", "--checkpoint", str(tmp_path / "d.pth"),
                         "--input-size", "64", "--point", "20,30", "--point", "200,100", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "church" / "result.json").read_text())
    assert result["predictions"] is None and len(result["score"]) == 1  # no class logits: the score
    blocks = {b["name"]: b for b in result["layers"]}
    assert blocks["attn1"]["family"] == "SAGAN Self_Attn" and blocks["attn1"]["grid"] == [16, 16]
    assert blocks["attn2"]["grid"] == [8, 8] and blocks["attn2"]["key_grid"] == [4, 4]  # BigGAN pools its keys
    a1 = np.load(out / "church" / "attn1_attention.npy")
    a2 = np.load(out / "church" / "attn2_attention.npy")
    assert a1.shape == (2, 16, 16) and a2.shape == (2, 4, 4)  # points x key rows x key columns
    np.testing.assert_allclose(a1.sum((1, 2)), 1, rtol=1e-5)
    # the rows are the model's own: SAGAN's forward returns its attention
    model, meta = byo.load_model("byo_models:discriminator", tmp_path / "d.pth", input_size=64)
    result = analyze(model, meta, Image.open(ASSET))
    with torch.no_grad():
        x = eval_transform(meta)(to_rgb(Image.open(ASSET))).unsqueeze(0)
        _, attention = model.attn1(model.stem(x))
    q = result.blocks[0].query_index((20, 30))
    np.testing.assert_allclose(a1[0].ravel(), attention[0, q].numpy(), atol=1e-6)
    assert (out / "church" / "figure.png").stat().st_size > 1000


def test_dot_product_rows_say_what_they_are_and_classes_come_from_a_file(tmp_path):
    import byo_models

    torch.manual_seed(0)
    torch.save(byo_models.classifier().state_dict(), tmp_path / "c.pth")
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n")
    out = tmp_path / "out"
    assert explain.main([str(ASSET), "--model", "byo_models:classifier", "--checkpoint", str(tmp_path / "c.pth"),
                         "--classes", str(tmp_path / "names.txt"), "--input-size", "64", "--out", str(out)]) == 0
    result = json.loads((out / "church" / "result.json").read_text())
    assert {p["class"] for p in result["predictions"]} == {"cat", "dog", "bird"} and result["score"] is None
    (block,) = result["layers"]
    assert "not a softmax" in block["what_the_numbers_are"] and block["key_grid"] == [8, 8]


def test_bad_models_are_one_line_and_exit_2(tmp_path, caplog):
    assert explain.main([str(ASSET), "--model", "no_such_module:f", "--out", str(tmp_path)]) == 2
    assert explain.main([str(ASSET), "--model", "torch.nn:Identity", "--out", str(tmp_path)]) == 2
    assert "no attention in this model" in caplog.text and "it is made of: Identity" in caplog.text
    torch.save({"nope": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="does not fit the model"):
        byo.load_model("byo_models:classifier", tmp_path / "w.pth")


def test_timm_offline_gets_random_weights_with_a_warning(tmp_path, monkeypatch, caplog):
    pytest.importorskip("timm", reason="timm is the optional extra vggattn[timm]")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as here: the hub cannot be reached
    model, meta = byo.load_timm("botnet26t_256")
    assert meta["weights"] == "random" and "random weights" in meta["warning"] and "random weights" in caplog.text
    assert len(meta["class_names"]) == 1000 and meta["class_names"][0] == "tench" and meta["input_size"] == 256
    out = tmp_path / "out"
    assert explain.main([str(ASSET), "--timm", "botnet26t_256", "--point", "100,100", "--out", str(out)]) == 0
    result = json.loads((out / "church" / "result.json").read_text())
    assert len(result["predictions"]) == 5
    heads = [b for b in result["layers"] if b["heads"] > 1]
    assert heads and all(b["family"] == "timm BottleneckAttn (BoTNet)" for b in heads)
    name = heads[0]["name"].replace("/", "_")
    per_head = np.load(out / "church" / f"{name}_attention_heads.npy")
    assert per_head.shape == (1, heads[0]["heads"], *heads[0]["key_grid"])
    np.testing.assert_allclose(per_head.sum((2, 3)), 1, rtol=1e-4)


def test_a_safetensors_checkpoint_brings_its_own_class_names_and_input_size(tmp_path):
    """As scripts/train_zoo.py writes them: weights + a "meta" entry; flags still win."""
    from safetensors.torch import save_file

    from vggattn.models.zoo import nonlocal_resnet

    model = nonlocal_resnet(3)
    meta = {"class_names": ["a", "b", "c"], "input_size": 96, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"),
              metadata={"meta": json.dumps(meta)})
    (tmp_path / "zoo3.py").write_text("from vggattn.models.zoo import nonlocal_resnet\ndef make():\n    return nonlocal_resnet(3)\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        loaded, got = byo.load_model("zoo3:make", tmp_path / "m.safetensors")
        assert got["class_names"] == ["a", "b", "c"] and got["input_size"] == 96 and got["mean"] == [0.5] * 3
        assert byo.load_model("zoo3:make", tmp_path / "m.safetensors", input_size=64)[1]["input_size"] == 64
        x = torch.randn(1, 3, 96, 96)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x), model.eval()(x))
        result = analyze(loaded, got, Image.open(ASSET))
        assert set(result.top_k(3)) == {"a", "b", "c"}
        assert result.blocks[0].maps.grid == (12, 12) and result.blocks[0].maps.key_grid == (6, 6)  # 96 px: 1/8, pooled
    finally:
        sys.path.remove(str(tmp_path))


def test_a_checkpoint_that_names_its_model_needs_no_model_flag(tmp_path):
    """The shipped non-local ResNet's meta names vggattn.models.zoo:nonlocal_resnet: --checkpoint alone builds it (no
    "missing keys"); a checkpoint naming another package's factory is refused with the flag to give; --model
    without --checkpoint has random weights; and the shipped meta holds no path of the machine it was made on."""
    zoo = app.HERE / "checkpoints" / "nonlocal-resnet-imagenette-128.safetensors"
    out = tmp_path / "zoo"
    assert explain.main([str(ASSET), "--checkpoint", str(zoo), "--point", "100,100", "--out", str(out)]) == 0
    result = json.loads((out / "church" / "result.json").read_text())
    assert [b["name"] for b in result["layers"]] == ["nonlocal3"] and result["predictions"][0]["class"] == "church"
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(zoo), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert not [v for v in json.dumps(meta).split('"') if v.startswith(("/root", "/home", "/work", "../"))]
    foreign = tmp_path / "foreign.safetensors"
    save_file(load_file(str(zoo)), str(foreign), metadata={"meta": json.dumps({**meta, "model": "somepkg.nets:f"})})
    assert byo.named_model(foreign) == "somepkg.nets:f"
    args = explain.parse_args([str(ASSET), "--checkpoint", str(foreign), "--out", str(out)])
    with pytest.raises(CheckpointError, match="give --model somepkg.nets:f"):
        byo.load_from_args(args)
    _, random_meta = byo.load_from_args(explain.parse_args([str(ASSET), "--model", "byo_models:classifier",
                                                            "--out", str(out)]))
    assert random_meta["weights"] == "random"
