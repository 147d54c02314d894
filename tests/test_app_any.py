"""The app on models of every family without a browser: the page's layers
(vggattn.view.hover.PageLayer) against each family's adapter, and the handlers on a trained model, a model of every
family and a discriminator (a score, no top-5)."""

import json

import numpy as np
import pytest
import torch

import vggattn
from vggattn import app
from vggattn.attention.adapters import find_blocks
from vggattn.analysis import analyze
from vggattn.models.byo import describe, load_model
from vggattn.view.hover import decode, page_layer, page_payload
ZOO_CHECKPOINT = app.HERE / "checkpoints" / "nonlocal-resnet-imagenette-128.safetensors"

pytest.importorskip("timm", reason="timm is the optional extra vggattn[timm] (requirements.txt pins it)")
import byo_models  # noqa: E402  (needs timm)

ASSET = app.HERE / "assets" / "church.jpg"


@pytest.fixture(scope="module")
def every():
    from PIL import Image

    model = byo_models.every_family()
    meta = describe("byo_models:every_family", 64, [f"c{i}" for i in range(5)])
    return model, meta, analyze(model, meta, Image.open(ASSET))


def test_every_family_reaches_the_page_as_its_rows(every):
    """Each block's page layer (Q and K, the rows, or one map) gives the adapter's rows and columns, per head and
    as the mean of heads, for every kind it can be sent as; the payload decodes to the same arrays."""
    _, _, result = every
    kinds_seen = set()
    for block in result.blocks:
        maps = block.maps
        rows = maps.rows(dtype=torch.float64)[0]  # (heads, N or 1, M); float32 loses 1e-5 to cancellation in f / M
        kinds = ["map"] if maps.per_image else ["rows"] if maps.bias is not None else ["qk", "rows"]
        for kind in kinds:
            layer = page_layer(block.name, maps, block.family, kind=kind)
            kinds_seen.add(kind)
            sent = layer.payload()
            assert json.loads(json.dumps(sent)) == sent
            if kind == "qk":
                assert np.array_equal(decode(sent, "q").reshape(layer.q.shape), layer.q)
            else:
                assert np.array_equal(decode(sent, "rows"), layer.rows_)
            for i in (0, 37, layer.n - 1):
                want = rows[:, 0 if maps.per_image else i]  # (heads, M)
                np.testing.assert_allclose(layer.row(i), want.mean(0).numpy(), rtol=1e-6, atol=1e-6, err_msg=f"{block.name} {kind}")
                np.testing.assert_allclose(layer.row(i, head=layer.heads - 1), want[-1].numpy(), rtol=1e-6, atol=1e-6)
            if not maps.per_image:
                for j in (0, layer.m // 2, layer.m - 1):
                    # columns use log Z from a float32 pass: off by ~6e-8 |logit| relatively (random weights: logits
                    # in the hundreds), far below a colour level (1/255)
                    np.testing.assert_allclose(layer.column(j), rows[:, :, j].mean(0).numpy(), rtol=1e-4, atol=1e-6,
                                               err_msg=f"{block.name} {kind} column")
    assert kinds_seen == {"qk", "rows", "map"}
    by_name = {b.name: page_layer(b.name, b.maps, b.family) for b in result.blocks}
    assert by_name["blocks.botnet"].kind == "rows" and by_name["blocks.botnet"].heads == 4  # relative positions
    assert by_name["blocks.gcnet"].kind == "map"
    assert by_name["blocks.biggan"].key_grid == (8, 8) and by_name["blocks.biggan"].grid == (16, 16)
    assert by_name["blocks.nonlocal_dot"].normalise == "mean" and by_name["blocks.nonlocal_dot"].sink is None
    # the sink is the query- and head-averaged row's largest share
    botnet = next(b for b in result.blocks if b.name == "blocks.botnet")
    mean = botnet.maps.rows()[0].mean((0, 1))
    assert by_name["blocks.botnet"].sink == (int(mean.argmax()), pytest.approx(float(mean.max()), abs=1e-6))


def test_a_pinned_picture_marks_the_query_cell_on_its_own_grid(every):
    """BigGAN's keys sit on a half grid: the row is drawn on the 8x8 key grid, the query's frame on the 16x16 grid;
    the column the other way round."""
    from vggattn.view.render import attention_picture

    _, _, result = every
    block = next(b for b in result.blocks if b.name == "blocks.biggan")
    layer = page_layer(block.name, block.maps, block.family)
    xy, style = (100.0, 60.0), dict(scale="linear", mode="smooth", colormap="inferno", opacity=0.8, top_k=5)
    rgb, cell, values = layer.picture(result.display, result.size, xy, **style)
    want_cell = vggattn.query_index(xy, result.size, (16, 16))
    want = block.maps.rows([want_cell], dtype=torch.float64)[0, 0, 0].reshape(8, 8).numpy()  # the adapter's row
    assert values.shape == (8, 8) and cell == want_cell
    np.testing.assert_allclose(values, want, rtol=1e-6, atol=1e-9)
    h, w = result.display.shape[:2]
    point = ((xy[0] + 0.5) * w / result.size[0], (xy[1] + 0.5) * h / result.size[1])
    assert np.array_equal(rgb, attention_picture(result.display, want, want_cell, point, query_grid=(16, 16), **style))
    rgb, cell, values = layer.picture(result.display, result.size, xy, view="column", **style)
    assert values.shape == (16, 16) and cell == vggattn.query_index(xy, result.size, (8, 8))


def test_handlers_on_the_trained_non_local_resnet():
    model, meta = load_model("vggattn.models.zoo:nonlocal_resnet", ZOO_CHECKPOINT)
    demo = app.build_demo(model, meta)
    ui = demo.ui
    assert len(ui.panels) == 1
    none_yet = app.on_point(ui, None, 10, 10)  # a click before any upload: a line, not an Error
    assert "Upload an image" in none_yet[ui.status] and none_yet[ui.point] is None
    out = app.on_image(ui, model, meta, str(ASSET))
    state = out[ui.state]
    assert next(iter(out[ui.labels])) == "church"  # the trained model's top-1
    payload = out[ui.hover]
    assert payload["version"] == 3 and payload["layers"][0]["key_grid"] == [8, 8]
    pinned = app.on_point(ui, state, 120, 90)
    assert pinned[ui.point] == (120, 90) and "nonlocal3" in pinned[ui.readouts]
    picture = pinned[ui.panels[0]]
    assert picture.shape == state.result.display.shape
    assert app.on_controls(ui, state, (120, 90), 0.5, "viridis", "blocky", False, "log", "mean")[ui.panels[0]].shape == picture.shape
    light = app.on_point(ui, state, 120, 90, pictures=False)  # a pin the page drew: the readouts, no pictures
    assert light[ui.panels[0]] is None and light[ui.readouts] == pinned[ui.readouts]
    assert app.on_controls(ui, state, (9999, 0), 0.5, "viridis", "blocky", False, "log", "mean")[ui.panels[0]] == {"__type__": "update"}
    ablated = app.on_ablate(ui, model, state, ["nonlocal3"], "uniform")
    assert "church" in ablated[ui.ablation_verdict] and list(ablated[ui.ablation].columns)[2] == "nonlocal3: uniform"
    # the ablation's forward equals the adapter's intervention on the block by hand
    from vggattn.attention.adapters import Intervention

    with torch.no_grad(), Intervention(model, {"nonlocal3": "uniform"}):
        expected = torch.softmax(model(state.result.input), -1)[0]
    top = ablated[ui.ablation]
    assert top["nonlocal3: uniform"][0] == pytest.approx(round(float(expected.max()), 4), abs=1e-4)


def test_a_discriminator_shows_its_score_not_a_top5():
    model = byo_models.discriminator().eval()
    meta = describe("byo_models:discriminator", 64, None)
    demo = app.build_demo(model, meta)
    ui = demo.ui
    assert ui.labels.visible is False  # no class names: no top-5 box
    out = app.on_image(ui, model, meta, str(ASSET))
    assert out[ui.labels] is None
    with torch.no_grad():
        score = float(model(out[ui.state].result.input))
    assert f"{score:+.4f}" in out[ui.score] and "score" in out[ui.score]
    ablated = app.on_ablate(ui, model, out[ui.state], ["attn1", "attn2"], "off")
    assert ablated[ui.ablation_verdict].startswith(f"Score {score:+.4f} →")
    assert len(ui.panels) == 2  # SAGAN's Self_Attn and BigGAN's attention


def test_the_head_selector_and_the_panel_count_follow_the_model(every):
    model, meta, _ = every
    demo = app.build_demo(model, meta)
    config = demo.get_config_file()
    head = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "head")
    assert [c[1] for c in head["props"]["choices"]] == ["mean", "0", "1", "2", "3"]  # BoTNet's 4 heads
    assert len(demo.ui.panels) == 8
    hover = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "hover")
    assert hover["props"]["props"]["num_panels"] == 8 if "props" in hover["props"] else True
    assert app.head_choice("2") == 2 and app.head_choice("mean") is None and app.head_choice("x") is None


def test_vggattn_launch_serves_a_model_in_hand():
    """`vggattn.launch(model, transform=..., class_names=...)`: the app answers on 127.0.0.1 with that transform."""
    import urllib.request

    from torchvision.transforms import v2

    from server import free_port

    model = byo_models.classifier().eval()
    calls = []
    base = v2.Compose([v2.ToImage(), v2.Resize((48, 48)), v2.ToDtype(torch.float32, scale=True)])
    transform = lambda image: calls.append(image.size) or base(image)  # noqa: E731
    port = free_port()
    demo = vggattn.launch(model, transform=transform, class_names=["a", "b", "c"], port=port, prevent_thread_lock=True,
                          quiet=True)
    try:
        demo = demo[0] if isinstance(demo, tuple) else demo
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "vggattn" in page
        assert calls  # the probe forward went through the user's transform
    finally:
        import gradio as gr

        gr.close_all()


def test_vggattn_app_takes_model_and_timm_flags(monkeypatch):
    """`vggattn-app --timm NAME` and `--model ... --checkpoint ...` build the any-model app (serving stubbed)."""
    served = []
    monkeypatch.setattr(app, "serve", lambda demo, *a, **k: served.append(demo))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert app.main(["--timm", "botnet26t_256"]) == 0
    assert len(served[-1].ui.panels) == 3 and "random weights" in served[-1].config["components"][0]["props"]["value"]
    assert app.main(["--model", "vggattn.models.zoo:nonlocal_resnet", "--checkpoint", str(ZOO_CHECKPOINT)]) == 0
    tabs = [c["props"].get("label") for c in served[-1].config["components"] if c["type"] == "tabitem"]
    assert "Dataset" in tabs  # the zoo model's shipped study
    assert app.main(["--checkpoint", str(ZOO_CHECKPOINT)]) == 0  # its meta names its model: no --model needed
    assert len(served[-1].ui.panels) == 1 and "nonlocal_resnet" in served[-1].config["components"][0]["props"]["value"]
    assert app.main(["--model", "byo_models:classifier", "--layers", "features.1"]) == 2  # a ReLU: no block


def test_find_blocks_sees_every_family(every):
    model, _, _ = every
    assert len({a.family for *_, a in find_blocks(model)}) == 8 - 1  # two non-local forms share a family


def test_the_payload_carries_the_image(every):
    _, _, result = every
    layers = [page_layer(b.name, b.maps, b.family) for b in result.blocks]
    payload = page_payload(result, layers, "float16")
    assert payload["dtype"] == "float16" and payload["size"] == list(result.size)
    with pytest.raises(ValueError, match="dtype"):
        page_payload(result, layers, "int8")
