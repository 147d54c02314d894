"""Across a transformer's layers (vggattn.attention.across): attention flow against the max-flow it is on graphs
small enough to solve by hand, and Chefer et al.'s relevance read under PyTorch's fused attention against the same
formula on timm's own eager attention (its attention probabilities and their gradients) with the same weights."""

import numpy as np
import pytest
import torch

from vggattn.attention.across import attention_flow, relevance, residual_mixed

timm = pytest.importorskip("timm", reason="timm is the optional extra vggattn[timm] (requirements.txt pins it)")


def test_flow_through_one_and_two_layers_is_what_the_edges_allow():
    g = torch.Generator().manual_seed(0)
    a1, a2 = (torch.softmax(torch.randn(5, 5, generator=g) * 2, -1) for _ in range(2))
    one = attention_flow([a1], source=4)
    np.testing.assert_allclose(one, residual_mixed(a1)[4].numpy(), atol=1e-5)
    two = attention_flow([a1, a2], source=4)  # paths 4 -> k -> j are edge-disjoint: each carries the smaller edge
    m1, m2 = residual_mixed(a1).numpy(), residual_mixed(a2).numpy()
    want = np.array([sum(min(m2[4, k], m1[k, j]) for k in range(5)) for j in range(5)])
    np.testing.assert_allclose(two, want, atol=1e-5)


def test_relevance_equals_the_formula_on_timms_eager_attention():
    from vggattn.attention.adapters import TracedAdapter, find_blocks

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, depth=3, num_heads=2, embed_dim=32, num_classes=4, pretrained=False)
    fused = timm.create_model("vit_tiny_patch16_224", **kw).eval().double()  # float64: the gradients are small
    eager = timm.create_model("vit_tiny_patch16_224", **kw).eval().double()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    blocks = [b for b in find_blocks(fused, example=x) if isinstance(b[2], TracedAdapter)]
    assert [n for n, *_ in blocks] == [f"blocks.{i}.attn" for i in range(3)]
    got = relevance(fused, x, blocks, target=2)
    # the reference: timm's eager attention, its probabilities kept with their gradients
    kept = []
    for blk in eager.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, a, out: (out.retain_grad(), kept.append(out)) and None)
    eager(x)[0, 2].backward()
    r = torch.eye(17, dtype=torch.float64)
    for a in kept:
        cam = (a.grad * a).detach()[0].double().clamp_min(0).mean(0)
        r = r + cam @ r
    order = list(range(1, 17)) + [0]  # the page's order: the 4x4 patches, then the class token
    np.testing.assert_allclose(got.numpy(), r[order][:, order].numpy(), rtol=1e-5, atol=1e-12)


def test_across_layers_on_the_shipped_vit_and_not_on_a_cnn():
    from pathlib import Path

    from PIL import Image

    import vggattn
    from vggattn.analysis import analyze, across_layers
    from vggattn.models.byo import load_model

    here = Path(__file__).resolve().parents[1]
    image = Image.open(here / "assets" / "church.jpg")
    cnn, meta = vggattn.load_checkpoint(device="cpu")
    assert "not_offered" in across_layers(cnn, analyze(cnn, meta, image))
    vit, meta = load_model("vggattn.models.zoo:vit_imagenette", here / "checkpoints" / "vit-imagenette-96.safetensors")
    result = analyze(vit, meta, image)
    got = across_layers(vit, result)
    assert got["token"] == "cls_token" and got["class"] == result.class_names[int(result.probs.argmax())]
    for kind in ("rollout", "flow", "relevance"):
        assert got[kind]["map"].shape == (12, 12) and np.isfinite(got[kind]["map"]).all()
    # the rollout's class-token row is the page's rollout of the last block
    last = result.blocks[-1].rollout
    np.testing.assert_allclose(got["rollout"]["map"].ravel(), last[144, :144], rtol=1e-5, atol=1e-7)
    # each input token's flow (a max-flow of its own) is at most what leaves the class token: 1
    assert 0 < got["flow"]["map"].min() and got["flow"]["map"].max() <= 1 + 1e-6


def test_the_apps_across_layers_tab():
    from pathlib import Path

    from vggattn import app
    from vggattn.app.across import on_across
    from vggattn.models.byo import load_model

    here = Path(__file__).resolve().parents[1]
    vit, meta = load_model("vggattn.models.zoo:vit_imagenette", here / "checkpoints" / "vit-imagenette-96.safetensors")
    demo = app.build_demo(vit, meta)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"across-note", "across-class", "across-rollout", "across-flow", "across-relevance"} <= ids
    state = app.on_upload(demo.ui, vit, meta, str(here / "assets" / "church.jpg"))[demo.ui.state]
    note, *pictures = on_across(vit, state, 3)
    assert meta["class_names"][3] in note and all(p["value"].shape[2] == 3 for p in pictures)
    assert "cls_token" in pictures[2]["label"]
    assert on_across(vit, None, -1)[0] == "Upload an image first."
    import vggattn

    cnn, cmeta = vggattn.load_checkpoint(device="cpu")
    cnn_state = app.on_upload(demo.ui, cnn, cmeta, str(here / "assets" / "church.jpg"))[demo.ui.state]
    assert on_across(cnn, cnn_state, -1)[0].startswith("Not offered for this model")


def test_explain_writes_the_across_layers_maps(tmp_path):
    import json
    from pathlib import Path

    from vggattn import explain

    here = Path(__file__).resolve().parents[1]
    assert explain.main([str(here / "assets" / "church.jpg"), "--model", "vggattn.models.zoo:vit_imagenette",
                         "--checkpoint", str(here / "checkpoints" / "vit-imagenette-96.safetensors"), "--across",
                         "--no-ablation", "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "church" / "across.json").read_text())
    assert got["token"] == "cls_token" and set(got["kinds"]) == {"rollout", "flow", "relevance"}
    assert np.load(tmp_path / "church" / "across_flow.npy").shape == (12, 12)
    assert (tmp_path / "church" / "across.png").stat().st_size > 0


def test_flow_is_not_attempted_past_its_token_limit(monkeypatch):
    from pathlib import Path

    from PIL import Image

    from vggattn import analysis
    from vggattn.analysis import analyze, across_layers
    from vggattn.app.across import on_across
    from vggattn.models.byo import load_model

    here = Path(__file__).resolve().parents[1]
    vit, meta = load_model("vggattn.models.zoo:vit_imagenette", here / "checkpoints" / "vit-imagenette-96.safetensors")
    result = analyze(vit, meta, Image.open(here / "assets" / "church.jpg"))
    monkeypatch.setattr(analysis, "FLOW_MAX_TOKENS", 100)  # the small ViT has 145 tokens
    got = across_layers(vit, result)
    assert "flow" not in got and "145" in got["flow_not_offered"] and "relevance" in got
    state = type("Session", (), {"result": result})()
    note, rollout, flow, relevance = on_across(vit, state, -1)
    assert flow["value"] is None and "up to 100 tokens" in flow["label"] and rollout["value"] is not None
