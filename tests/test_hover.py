"""The page's payload (vggattn.view.hover): what the page computes rows and columns from, against the block's rows
(vggattn.attention.adapters); and the app's handlers that send it."""

import dataclasses

import numpy as np
import pytest
import torch

from vggattn import app
from conftest import tiny_meta, tiny_model
from vggattn.analysis import analyze
from vggattn.attention.readouts import row_summaries
from vggattn.view.hover import decode, layer_binary, page_layer, page_payload, page_props, payload_bytes
from vggattn.view.render import COLORMAPS

ASSET = app.HERE / "assets" / "church.jpg"


@pytest.fixture(scope="module")
def result():
    from PIL import Image
    return analyze(tiny_model(), tiny_meta(input_size=64), Image.open(ASSET))


def softmax_rows(q, k):
    logits = q.astype(np.float64) @ k.astype(np.float64).T
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def hover_payload(result, dtype="float32"):
    return page_payload(result, [page_layer(b.name, b.maps, b.family, "qk") for b in result.blocks], dtype)


def test_float32_payload_is_the_blocks_q_and_k(result):
    payload = hover_payload(result)
    assert payload["size"] == [224, 224] and payload["image"].startswith("data:image/jpeg;base64,")
    assert [layer["name"] for layer in payload["layers"]] == ["features.14", "features.22", "features.30"]
    for sent, block in zip(payload["layers"], result.blocks):
        query, key = block.maps.query[0, 0], block.maps.key[0, 0]  # (N, C')
        assert sent["kind"] == "qk" and sent["grid"] == list(block.maps.grid) and sent["dim"] == query.shape[-1]
        assert np.array_equal(decode(sent, "q"), query.numpy())  # bitwise: nothing lost on the way
        assert np.array_equal(decode(sent, "k"), key.numpy())
        attention = torch.softmax(query.double() @ key.double().T, dim=-1).numpy()  # the article's maths
        rows = softmax_rows(decode(sent, "q"), decode(sent, "k"))  # what the page computes
        np.testing.assert_allclose(rows, attention, atol=1e-6)
        # a column from the row normalisers: A[:, j] = exp(Q k_j - log Z)
        q, k, logz = decode(sent, "q").astype(np.float64), decode(sent, "k").astype(np.float64), decode(sent, "logz")
        for j in (0, len(q) // 2, len(q) - 1):
            np.testing.assert_allclose(np.exp(q @ k[j] - logz), attention[:, j], rtol=1e-5, atol=1e-9)  # float32 log Z


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_deferred_layers_bytes_hold_its_json_payload_exactly(result, dtype):
    """`layer_binary` (what the page fetches for a layer past the budget): its header is the JSON payload's
    description and each array's bytes, 8-byte aligned, are what the base64 text decodes to."""
    import base64
    import json

    for block in result.blocks:
        layer = page_layer(block.name, block.maps, block.family, "qk")
        sent, raw = layer.payload(dtype), layer_binary(layer, dtype)
        n = int.from_bytes(raw[:4], "little")
        header = json.loads(raw[4:4 + n])
        arrays = {k for k, v in sent.items() if isinstance(v, str) and k in ("q", "k", "logz")}
        assert arrays == {"q", "k", "logz"}
        assert {k: v for k, v in header.items() if k not in arrays} == {k: v for k, v in sent.items() if k not in arrays}
        for k in arrays:
            at, size = header[k]["at"], header[k]["bytes"]
            assert at % 8 == 0 and at >= 4 + n
            assert raw[at:at + size] == base64.b64decode(sent[k])


def test_row_summaries_in_blocks_equal_the_whole_softmax():
    """log Z and the mean row from one pass a block of rows at a time equal logsumexp and the mean of the whole
    softmax map (float64 to 1e-12; float32 to its rounding), whatever the block size."""
    torch.manual_seed(0)
    q, k = torch.randn(300, 8) * 3, torch.randn(250, 8) * 3
    logits = q.double() @ k.double().T  # (300, 250)
    want_z, want_mean = torch.logsumexp(logits, dim=-1), torch.softmax(logits, dim=-1).mean(0)
    for chunk in (1, 7, 300, 1024):
        z, mean = row_summaries(q[None].double(), k[None].double(), chunk=chunk)
        assert z.shape == (1, 300) and mean.shape == (1, 250) and z.dtype == torch.float64
        torch.testing.assert_close(z[0], want_z, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(mean[0], want_mean, rtol=1e-12, atol=1e-12)
        z, mean = row_summaries(q[None], k[None], chunk=chunk)
        torch.testing.assert_close(z[0].double(), want_z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean[0].double(), want_mean, rtol=1e-4, atol=1e-7)


def test_log_z_and_mean_row_read_from_the_articles_forward_equal_the_whole_softmax():
    """The article's block computes its rows itself (a block of query rows at a time: three blocks of rows at 192 px),
    so an upload reads log Z and the mean row from its softmax calls (`trace.RowSums`) instead of computing them
    again; they equal logsumexp and the mean of the whole map from the block's own Q and K in float64."""
    from PIL import Image
    res = analyze(tiny_model(), tiny_meta(input_size=192), Image.open(ASSET))
    assert res.blocks[0].maps.grid == (48, 48)  # 2,304 queries: rows of 910 at a time
    for b in res.blocks:
        assert b.row_sums is not None, b.name
        q, k = b.maps.query[0, 0].double(), b.maps.key[0, 0].double()
        logits = q @ k.T
        log_z, mean = b.summaries
        np.testing.assert_allclose(log_z[0], torch.logsumexp(logits, -1).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mean[0], torch.softmax(logits, -1).mean(0).numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(b.mean_row, mean[0])
    # without what the forward computed (SDPA on a GPU or under autograd calls no softmax), one pass computes them
    for b in res.blocks:
        computed = dataclasses.replace(b, row_sums=None)
        np.testing.assert_allclose(computed.summaries[0], b.summaries[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(computed.summaries[1], b.summaries[1], rtol=1e-4, atol=1e-7)


def test_float16_payload_halves_q_and_k_and_stays_close(result):
    full, half = hover_payload(result, "float32"), hover_payload(result, "float16")
    for a, b in zip(full["layers"], half["layers"]):
        assert len(b["q"]) * 2 == pytest.approx(len(a["q"]), abs=4)  # base64 of half the bytes
        rows32 = softmax_rows(decode(a, "q"), decode(a, "k"))
        rows16 = softmax_rows(decode(b, "q", "float16"), decode(b, "k", "float16"))
        diff = np.abs(rows16 - rows32).max()
        assert 0 < diff < 1e-2, diff  # rounded, so not equal; the real model's error is in bench/README.md
    qk = lambda p: sum(len(layer[n]) for layer in p["layers"] for n in "qk")  # noqa: E731
    assert qk(half) < 0.51 * qk(full) and payload_bytes(half) < payload_bytes(full)
    with pytest.raises(ValueError, match="dtype"):
        hover_payload(result, "int8")


def test_page_props_carry_the_servers_palettes_and_constants():
    import matplotlib

    from vggattn.view import render

    props = page_props(3, app.APP_CONTROLS)
    assert set(props["palettes"]) == set(COLORMAPS)
    for name, flat in props["palettes"].items():  # matplotlib's colormap at 256 levels, truncated to bytes
        rgb = np.asarray(flat, dtype=np.int64).reshape(256, 3)
        expected = matplotlib.colormaps[name](np.arange(256) / 255)[:, :3] * 255
        assert (np.abs(rgb - expected) < 1.0 + 1e-9).all(), name
    assert (props["top_k"], props["log_decades"], props["full_at"], props["num_panels"]) == \
        (render.TOP_K, render.LOG_DECADES, render.FULL_AT, 3)
    assert props["controls"] == app.APP_CONTROLS and props["sink_dominated"] == 0.5
    assert "TOP_K" not in (app.WEB / "hover.js").read_text() and "= 5;" not in (app.WEB / "hover.js").read_text()


def test_upload_sends_the_payload_and_a_new_upload_drops_it():
    model, meta = tiny_model(), tiny_meta(input_size=64)
    ui = app.build_demo(model, meta).ui
    out = app.on_image(ui, model, meta, str(ASSET))
    assert [layer["name"] for layer in out[ui.hover]["layers"]] == ["features.14", "features.22", "features.30"]
    assert app.on_image(ui, model, meta, None)[ui.hover] is None
    half = app.build_demo(model, meta, hover_dtype="float16")  # the upload event as the demo wires it
    event = next(f for f in half.fns.values() if f.api_name == "upload")
    assert "vggattnHover.load(null)" in event.js  # the page drops its copy of the old maps before the request
    old, other = out[ui.state], str(ASSET.with_name("springer.jpg"))
    sent = event.fn(other, old, "contribution", 0.8, "inferno", "smooth", None)
    assert old.stale and not sent[half.ui.state].stale  # the previous analysis is refused from then on
    assert sent[half.ui.state].path == other
    assert sent[half.ui.hover]["dtype"] == "float16" and payload_bytes(sent[half.ui.hover]) < payload_bytes(out[ui.hover])


def test_the_second_change_event_of_one_upload_runs_no_second_analysis(monkeypatch):
    """Gradio's image fires its change event twice for one upload: while the first analyses the file, the second
    changes nothing; after it, the same file is answered from the session's analysis (the model does not run)."""
    model, meta = tiny_model(), tiny_meta(input_size=64)
    ui = app.build_demo(model, meta).ui
    busy = {"s1": str(ASSET)}  # the first event is analysing this file
    skipped = app.on_upload(ui, model, meta, str(ASSET), None, busy=busy, session_id="s1")
    assert set(skipped) == set(app.blank(ui)) and all(v == app.gr.skip() for v in skipped.values())
    runs = []
    monkeypatch.setattr(app, "analyze", lambda *a: runs.append(a) or analyze(*a))
    first = app.on_upload(ui, model, meta, str(ASSET), None, busy={}, session_id="s2")
    again = app.on_upload(ui, model, meta, str(ASSET), first[ui.state], busy={}, session_id="s2")
    assert len(runs) == 1 and again[ui.state] is first[ui.state] and not first[ui.state].stale
    assert again[ui.hover] == first[ui.hover] and again[ui.status] == first[ui.status]


def test_pin_endpoint_and_a_click_draw_the_rows_of_the_blocks_own_convs():
    """/pin and a click pin pixel (30, 40): each panel is the picture of that position's row, computed here from the
    block's own convs on the block's input (softmax(q_i . K)), not from the capture the app reads."""
    from vggattn.data import query_index
    from vggattn.view.render import attention_picture

    model, meta = tiny_model(), tiny_meta(input_size=64)
    ui = app.build_demo(model, meta).ui
    state = app.on_image(ui, model, meta, str(ASSET))[ui.state]
    entering = {}
    handles = [model.features[i].register_forward_pre_hook(lambda m, a, i=i: entering.__setitem__(i, a[0]))
               for i in (14, 22, 30)]
    with torch.no_grad():
        model(state.result.input)
    for h in handles:
        h.remove()
    disp_h, disp_w = state.result.display.shape[:2]
    point = ((30 + 0.5) * disp_w / state.size[0], (40 + 0.5) * disp_h / state.size[1])
    by_click = app.on_click(ui, state, 0.8, "inferno", "smooth", True, app.gr.SelectData(target=None, data={"index": [30, 40], "value": None}))
    by_pin = app.on_point(ui, state, 30, 40)
    assert by_pin[ui.point] == by_click[ui.point] == (30, 40)
    for panel, i in zip(ui.panels, (14, 22, 30)):
        block, x = model.features[i], entering[i].double()
        conv = lambda c: torch.nn.functional.conv2d(x, c.weight.double(), c.bias.double()).flatten(2)[0].T  # noqa: E731
        q, k = conv(block.conv_query).detach(), conv(block.conv_key).detach()  # (N, C')
        grid = tuple(x.shape[-2:])
        cell = query_index((30, 40), state.size, grid)
        row = torch.softmax(q[cell] @ k.T, dim=0).reshape(grid).numpy()
        want = attention_picture(state.result.display, row, cell, point, opacity=0.8, colormap="inferno", mode="smooth")
        for got in (by_pin[panel], by_click[panel]):
            assert np.abs(got.astype(int) - want).max() <= 1, i  # rows from float32 Q, K on the app's side
    with pytest.raises(app.gr.Error, match="two numbers"):
        app.on_point(ui, state, None, 4)


def test_the_pages_webassembly_is_its_source_assembled():
    """web/dots.wasm, which the page runs, is web/dots.wat as wasmtime assembles it (edit the .wat, then write the
    .wasm with `wasmtime.wat2wasm`)."""
    from pathlib import Path

    import wasmtime

    import vggattn.view.hover

    web = Path(vggattn.view.hover.__file__).parent / "web"
    assert wasmtime.wat2wasm((web / "dots.wat").read_text()) == (web / "dots.wasm").read_bytes()
