"""Deformable attention (vggattn.attention.deformable), read by what the code computes and checked against each
library's own: transformers' Deformable DETR and RT-DETR (v1 and v2). The weights are the ones the model returns
with `output_attentions=True`; the points, spread on the value cells as bilinear sampling spreads them, times the
value the library's own sampling module was given, equal the output it returned."""

import json

import numpy as np
import pytest
import torch

from vggattn.attention.deformable import sampling_points

T = pytest.importorskip("transformers")
H, W = 96, 128  # not square: x and y swapped would show


def _backbone(cls):
    return cls(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
               out_features=["stage2", "stage3", "stage4"])


def deformable_detr(seed: int = 0):
    torch.manual_seed(seed)
    c = T.DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=_backbone(T.ResNetConfig), use_pretrained_backbone=False, d_model=64,
        encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, num_queries=5, num_feature_levels=3, encoder_n_points=2, decoder_n_points=3, num_labels=3)
    return T.DeformableDetrForObjectDetection(c).eval()


def rt_detr(version: str = "", seed: int = 0):
    torch.manual_seed(seed)
    config, model = getattr(T, f"RTDetr{version}Config"), getattr(T, f"RTDetr{version}ForObjectDetection")
    c = config(backbone_config=_backbone(T.RTDetrResNetConfig), d_model=64, encoder_hidden_dim=32,
               encoder_in_channels=[32, 64, 64], encode_proj_layers=[2], decoder_in_channels=[32, 32, 32],
               encoder_layers=1, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5, num_feature_levels=3, decoder_n_points=3,
               num_labels=3, hidden_expansion=0.5)
    return model(c).eval()


@pytest.mark.parametrize("build", [deformable_detr, rt_detr, lambda: rt_detr("V2")], ids=["deformable", "rt", "rt2"])
def test_weights_equal_the_models_own_and_points_reproduce_its_sampling(build):
    model = build()
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        own = model(pixel_values=x, output_attentions=True).cross_attentions  # (B, Q, heads, levels, points)
    got = sampling_points(model, {"pixel_values": x})
    decoder = [s for s in got.values() if not s.queries_on_levels]
    assert [s.block for s in decoder] == [f"model.decoder.layers.{i}.encoder_attn" for i in range(2)]
    for s, a in zip(decoder, own):
        assert s.points.shape == (2, 4, 5, 9, 2) and s.level_grids == [(12, 16), (6, 8), (3, 4)]
        torch.testing.assert_close(s.weights, a.flatten(3).transpose(1, 2), rtol=1e-5, atol=1e-6)
    encoder = [s.block for s in got.values() if s.queries_on_levels]  # RT-DETR's encoder attention is not deformable
    assert encoder == (["model.encoder.layers.0.self_attn"] if "Deformable" in type(model).__name__ else [])
    # the library's own sampling: its values in (value_proj's output), what it sampled out (output_proj's input);
    # the read points and weights, spread on the value cells, reproduce it
    seen = {}

    def keep(name, slot):
        def hook(module, args, out):
            seen.setdefault(name, {})[slot] = out if slot == "value" else args[0]
        return hook
    hooks = [h for n, m in model.named_modules() if hasattr(m, "sampling_offsets")
             for h in (m.value_proj.register_forward_hook(keep(n, "value")),
                       m.output_proj.register_forward_hook(keep(n, "out")))]
    with torch.no_grad():
        model(pixel_values=x)
    for h in hooks:
        h.remove()
    assert set(seen) == set(got)
    for name, s in got.items():
        out = seen[name]["out"]  # (B, Q, heads * d)
        heads = s.points.shape[1]
        value = seen[name]["value"].unflatten(-1, (heads, -1))  # (B, N, heads, d)
        d = value.shape[-1]
        for b in range(2):
            for head in range(heads):
                cells = torch.cat([m.flatten(1) for m in s.cells(b, head).values()], 1)  # (Q, N)
                want = out[b, :, head * d:(head + 1) * d].double()
                torch.testing.assert_close(cells @ value[b, :, head].double(), want, rtol=1e-4, atol=1e-5)


def test_a_deformable_detectors_queries_are_their_points_in_explain_and_the_study(tmp_path):
    from vggattn import explain
    from vggattn.models.byo import load_hf
    from vggattn.tokens import query_study, token_maps
    from vggattn.training import shapes

    deformable_detr().save_pretrained(tmp_path / "det")
    img, _ = shapes.sample("val", 0)
    img.save(tmp_path / "shapes.png")
    model, meta = load_hf(str(tmp_path / "det"))
    found = token_maps(model, meta, img)
    assert found.names == [f"query {i}" for i in range(5)] and not found.rows
    assert found.blocks == [f"model.decoder.layers.{i}.encoder_attn" for i in range(2)]
    assert set(found.predictions) == set(found.names) and "sampling points" in found.shows
    xy, w, levels = found.samples("query 2")["model.decoder.layers.1.encoder_attn"]
    assert xy.shape == (4 * 9, 2) and w.sum() == pytest.approx(1.0, abs=1e-5) and set(levels) == {0, 1, 2}
    # the weight at a place: what the value cells there receive, summed over the levels
    at = found.weights_at((float(xy[np.argmax(w), 0]), float(xy[np.argmax(w), 1])))
    assert at["model.decoder.layers.1.encoder_attn"].shape == (5,)
    assert at["model.decoder.layers.1.encoder_attn"][2] > 0
    out = tmp_path / "out"
    assert explain.main([str(tmp_path / "shapes.png"), "--hf", str(tmp_path / "det"), "--token", "query 2",
                         "--out", str(out), "--no-ablation"]) == 0
    saved = np.load(out / "shapes" / "model.decoder.layers.1.encoder_attn_query-2_points.npy")
    np.testing.assert_allclose(saved.reshape(-1, 3)[:, :2], xy, rtol=1e-5)
    np.testing.assert_allclose(saved.reshape(-1, 3)[:, 2] / 4, w, rtol=1e-5)  # each head's sums to 1
    summary = json.loads((out / "shapes" / "tokens.json").read_text())
    assert "sampling points" in summary["shows"]
    layer = summary["tokens"]["query 2"]["blocks"]["model.decoder.layers.1.encoder_attn"]
    assert layer["points"] == 36 and 0 <= layer["in_box"] <= 1
    study = query_study(model, meta, [img, img])
    assert study["images"] == 2 and study["layers"] == found.blocks


def test_the_apps_tokens_page_draws_rt_detrs_queries_as_their_points(tmp_path, browser):
    import html as _html

    from test_tokens import check_page

    from vggattn import app
    from vggattn.app import tokens
    from vggattn.models.byo import load_hf
    from vggattn.training import shapes

    rt_detr().save_pretrained(tmp_path / "det")
    model, meta = load_hf(str(tmp_path / "det"))
    img, _ = shapes.sample("val", 1)
    img.save(tmp_path / "shapes.png")
    demo = app.build_demo(model, meta)  # its encoder's attention over positions in the panels, the decoder's here
    about = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "about")
    assert "2 layers of tokens" in about.value
    framed, note = tokens.on_upload(model, meta, str(tmp_path / "shapes.png"))
    page = _html.unescape(framed.split('srcdoc="')[1].rsplit('"></iframe>', 1)[0])
    assert "sampling points" in page
    (tmp_path / "tokens.html").write_text(page)
    found = tokens.token_maps(model, meta, img)
    xy, w, _ = found.samples("query 1")["model.decoder.layers.1.encoder_attn"]
    W, H = found.input_wh
    heaviest = (float(xy[np.argmax(w), 0]) / W, float(xy[np.argmax(w), 1]) / H)  # a place where query 1 has weight
    check_page(browser, tmp_path / "tokens.html", found, "query 1", places=((0.5, 0.5), heaviest))


def test_the_app_serves_a_model_whose_only_attention_is_deformable(tmp_path, browser):
    """Deformable DETR has no attention over positions: `python app.py --hf FOLDER` serves the tokens page alone, and
    an upload in Chromium shows its queries' points."""
    import threading

    from server import free_port

    from vggattn import app
    from vggattn.training import shapes

    deformable_detr().save_pretrained(tmp_path / "det")
    shapes.sample("val", 2)[0].save(tmp_path / "shapes.png")
    port = free_port()
    threading.Thread(target=app.main, args=(["--hf", str(tmp_path / "det"), "--port", str(port)],),
                     daemon=True).start()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    for _ in range(120):
        try:
            page.goto(f"http://127.0.0.1:{port}/")
            break
        except Exception:  # noqa: BLE001 (not serving yet)
            page.wait_for_timeout(500)
    assert "no attention over the image's positions" in page.locator("#about").inner_text()
    page.locator("#input-image input[type=file]").set_input_files(str(tmp_path / "shapes.png"))
    frame = page.frame_locator("#tokens-frame")
    frame.locator(".tile.chosen").wait_for(timeout=60_000)
    assert frame.locator(".tile").count() == 5 and "sampling points" in frame.locator("#tokens-note").inner_text()
    page.close()
