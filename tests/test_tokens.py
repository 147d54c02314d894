"""A detector's object queries looked at on the image (vggattn.tokens, `vggattn-explain --token`), the seeded shapes
set and the detector's training pieces (vggattn.training.shapes and .detector): AP against hand-made cases, the
frozen norms' statistics, a resumed run."""

import json

import numpy as np
import pytest
import torch

from vggattn.tokens import box_shares, predictions
from vggattn.training import shapes

T = pytest.importorskip("transformers")


def test_box_shares_count_cells_by_their_centres():
    m = np.zeros((4, 4))
    m[1, 1] = 3.0  # inside the box (cells of 16 px: centre (24, 24))
    m[0, 0] = 1.0  # on the band outside it (centre (8, 8), within one cell of the box's corner)
    m[3, 3] = 1.0  # neither
    got = box_shares(m, (16, 16, 32, 32), (64, 64))
    assert got["in_box"] == pytest.approx(3 / 5) and got["box_area"] == pytest.approx(1 / 16)
    assert got["on_border"] == pytest.approx(4 / 5)  # the box's own cell is within a cell of its edge too
    assert got["border_area"] == pytest.approx(9 / 16)
    assert got["outside_on_border"] == pytest.approx(1 / 5) and got["outside_border_area"] == pytest.approx(8 / 16)
    assert got["in_centre"] == pytest.approx(3 / 5) and got["centre_area"] == pytest.approx(1 / 16)


def test_predictions_read_detrs_no_object_class_and_conditional_detrs_sigmoids():
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.25], [0.25, 0.25, 0.1, 0.1]]])
    softmax = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])  # 2 classes + "no object"
    got = predictions(type("Out", (), {"logits": softmax, "pred_boxes": boxes})(), ["query 0", "query 1"],
                      ["a", "b"], (100, 80))
    assert got["query 0"]["class"] == "a" and got["query 0"]["object"] and not got["query 1"]["object"]
    assert got["query 0"]["box"] == [25.0, 30.0, 75.0, 50.0]
    sigmoid = torch.tensor([[[-3.0, 2.0], [-3.0, -2.0]]])  # 2 classes, no "no object"
    got = predictions(type("Out", (), {"logits": sigmoid, "pred_boxes": boxes})(), ["query 0", "query 1"],
                      ["a", "b"], (100, 80))
    assert got["query 0"]["class"] == "b" and got["query 0"]["object"] and not got["query 1"]["object"]
    assert predictions(torch.zeros(1, 3), ["query 0"], None, (8, 8)) == {}


def test_explain_writes_each_querys_maps_equal_to_its_cross_attention(tmp_path):
    from vggattn import explain, open_image, preprocess
    from vggattn.models.byo import load_hf
    from vggattn.tokens import token_maps
    from vggattn.training.detector import config

    torch.manual_seed(0)
    c = config(num_queries=4)
    c.decoder_layers, c.encoder_layers = 2, 1
    T.ConditionalDetrForObjectDetection(c).save_pretrained(tmp_path / "det")
    img, _ = shapes.sample("val", 0)
    img.save(tmp_path / "shapes.jpg")
    out = tmp_path / "out"
    assert explain.main([str(tmp_path / "shapes.jpg"), "--hf", str(tmp_path / "det"), "--token", "query 3",
                         "--token", "1", "--out", str(out), "--no-ablation"]) == 0
    got = json.loads((out / "shapes" / "tokens.json").read_text())
    assert list(got["tokens"]) == ["query 3", "query 1"]
    blocks = [f"model.decoder.layers.{i}.encoder_attn" for i in range(2)]
    assert list(got["tokens"]["query 3"]["blocks"]) == blocks
    pred = got["tokens"]["query 3"]["prediction"]
    assert pred["class"] in shapes.CLASSES and len(pred["box"]) == 4
    model, meta = load_hf(str(tmp_path / "det"))
    img = open_image(tmp_path / "shapes.jpg")  # as explain read it (JPEG)
    found = token_maps(model, meta, img)
    with torch.no_grad():
        want = T.ConditionalDetrForObjectDetection.from_pretrained(tmp_path / "det", attn_implementation="eager")(
            pixel_values=preprocess(img, meta), output_attentions=True).cross_attentions
    for block, a in zip(blocks, want):
        saved = np.load(out / "shapes" / f"{block}_query-3.npy")
        np.testing.assert_allclose(saved.ravel(), a[0, :, 3].mean(0).numpy(), rtol=1e-4, atol=1e-6)
        assert saved.shape == found.key_grids[block] == (shapes.SIZE // 16, shapes.SIZE // 16)
        heads = np.load(out / "shapes" / f"{block}_query-3_heads.npy")
        np.testing.assert_allclose(heads.reshape(4, -1), a[0, :, 3].numpy(), rtol=1e-4, atol=1e-6)
    assert (out / "shapes" / "tokens.png").stat().st_size > 0
    # the live page, and an A/B against another checkpoint (B: other weights)
    torch.manual_seed(1)
    T.ConditionalDetrForObjectDetection(c).save_pretrained(tmp_path / "det-b")
    assert explain.main([str(tmp_path / "shapes.jpg"), "--hf", str(tmp_path / "det"), "--token", "query 3", "--html",
                         "--compare", f"hf:{tmp_path / 'det-b'}", "--out", str(tmp_path / "ab"), "--no-ablation"]) == 0
    page = (tmp_path / "ab" / "shapes" / "tokens-compare.html").read_text()
    assert '"first": "query 3"' in page and page.count('"label": "query 0') == 2  # both sides' tokens
    assert (tmp_path / "ab" / "shapes" / "tokens.html").is_file()
    # a token the model has not: reported, the image skipped, exit code 2
    assert explain.main([str(tmp_path / "shapes.jpg"), "--hf", str(tmp_path / "det"), "--token", "query 9",
                         "--out", str(tmp_path / "bad"), "--no-ablation"]) == 2


def test_the_shapes_are_a_function_of_split_and_index():
    a, ta = shapes.sample("val", 3)
    b, tb = shapes.sample("val", 3)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and ta == tb
    c, tc = shapes.sample("train", 3)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    for i in range(20):
        img, t = shapes.sample("train", i)
        assert img.size == (shapes.SIZE, shapes.SIZE) and 1 <= len(t["labels"]) <= shapes.MAX_SHAPES
        for x0, y0, x1, y1 in t["boxes"]:
            assert 0 <= x0 < x1 <= shapes.SIZE and 0 <= y0 < y1 <= shapes.SIZE
    with pytest.raises(IndexError):
        shapes.sample("val", shapes.VAL_COUNT)


def test_average_precision_on_hand_made_detections():
    from vggattn.training.detector import average_precision

    targets = [{"labels": [0], "boxes": [[10, 10, 50, 50]]}, {"labels": [0], "boxes": [[0, 0, 20, 20]]}]

    def dets(*rows):  # per image: (score, label, box) rows
        return [(np.array([r[0] for r in rs]), np.array([r[1] for r in rs]), np.array([r[2] for r in rs],
                 dtype=float).reshape(-1, 4)) for rs in rows]
    perfect = dets([(0.9, 0, [10, 10, 50, 50])], [(0.8, 0, [0, 0, 20, 20])])
    assert average_precision(perfect, targets)["per_class"] == {"circle": 1.0}
    # a false positive ranked first, then both hits: precision 1/2 then 2/3 at recall 1/2 and 1 -> AP 2/3
    mixed = dets([(0.95, 0, [100, 100, 120, 120]), (0.9, 0, [10, 10, 50, 50])], [(0.8, 0, [0, 0, 20, 20])])
    assert average_precision(mixed, targets)["ap"] == pytest.approx(2 / 3)
    # the same box twice: the second is a false positive (its ground truth is taken)
    twice = dets([(0.9, 0, [10, 10, 50, 50]), (0.85, 0, [10, 10, 50, 50])], [])
    assert average_precision(twice, targets)["ap"] == pytest.approx(0.5)


def test_the_frozen_norms_normalise_and_a_run_resumes(tmp_path):
    from vggattn.training import detector

    torch.manual_seed(0)
    model = detector.build(num_queries=4)
    x, _ = detector.batch("train", range(8))
    detector.set_frozen_norms(model, x)
    first = next(m for m in model.modules() if type(m).__name__.endswith("FrozenBatchNorm2d"))
    seen = {}
    h = first.register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
    with torch.no_grad():
        model.model.backbone.model(x)
    h.remove()
    o = seen["o"]  # weight 1, bias 0: the normalised input
    assert o.mean((0, 2, 3)).abs().max() < 1e-3 and (o.var((0, 2, 3)) - 1).abs().max() < 1e-2
    args = ["--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--queries", "4", "--save-every", "1",
            "--eval-every", "2", "--eval-images", "2"]
    assert detector.main(args) == 0
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"] == 2
    assert detector.main([*args[:3], "3", *args[4:]]) == 0
    lines = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"] == 3 and "ap50" in lines[-1]


def test_the_apps_tokens_tab_sends_the_tokens_page_and_the_page_draws_what_python_reads(tmp_path, browser):
    """The tab's upload sends the page (in a frame); in Chromium, choosing a tile draws the query's map and box, and
    the weights at a place the page shows are `TokenMaps.weights_at`'s, for every layer."""
    import html as _html

    from vggattn import app
    from vggattn.app import tokens
    from vggattn.models.byo import load_hf
    from vggattn.training.detector import config

    torch.manual_seed(0)
    c = config(num_queries=4)
    c.decoder_layers, c.encoder_layers = 2, 1
    T.ConditionalDetrForObjectDetection(c).save_pretrained(tmp_path / "det")
    model, meta = load_hf(str(tmp_path / "det"))
    img, _ = shapes.sample("val", 1)
    img.resize((300, 200)).save(tmp_path / "wide.png")
    demo = app.build_demo(model, meta)
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"tokens-note", "tokens-page"} <= ids
    about = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "about")
    assert "2 layers of tokens" in about.value and "Tokens** tab" in about.value  # a visitor is told where they are
    framed, note = tokens.on_upload(model, meta, str(tmp_path / "wide.png"))
    assert framed.startswith('<iframe id="tokens-frame"') and "4 tokens attend to the image in 2 layers" in note
    page = _html.unescape(framed.split('srcdoc="')[1].rsplit('"></iframe>', 1)[0])
    (tmp_path / "tokens.html").write_text(page)
    found = tokens.token_maps(model, meta, open_image_(tmp_path / "wide.png"))
    check_page(browser, tmp_path / "tokens.html", found, "query 2")
    # a file that is no image: said in the tab, nothing raised
    (tmp_path / "bad.png").write_bytes(b"not an image")
    framed, note = tokens.on_upload(model, meta, str(tmp_path / "bad.png"))
    assert framed == "" and "could not be read" in note
    tokens_tab_at_phone_width(browser, demo, tmp_path / "wide.png")


def tokens_tab_at_phone_width(browser, demo, image) -> None:
    """The detector's app at 390x844 (tests/test_browser.py's phone checks): every tab on screen and whole, the
    Tokens tab included; inside its frame, the tokens page no wider than the screen, its tiles and pictures drawn."""
    from server import serving
    from test_browser import every_view_at_phone_width, open_view, phone_page

    with serving(demo) as url:
        view = phone_page(browser, url, image)
        try:
            assert "Tokens" in every_view_at_phone_width(view, {"Tokens"})
            open_view(view, "Tokens")
            view.frame_locator("#tokens-frame").locator(".tile").first.wait_for(state="visible", timeout=30_000)
            wide = view.locator("#tokens-frame").evaluate(
                "f => [f.contentDocument.documentElement.scrollWidth, f.clientWidth, f.getBoundingClientRect().right]")
            assert wide[0] <= wide[1] + 1 and wide[2] <= 390 + 1, wide  # the page fits its frame, the frame the screen
        finally:
            view.close()


def open_image_(path):
    from vggattn.data import open_image

    return open_image(path)


def check_page(browser, path, found, token: str, places=((0.1, 0.1), (0.55, 0.4), (0.97, 0.9))) -> None:
    """The tokens page at `path`: no script error; `token` chosen draws on every layer's picture; at each place the
    bars of every layer are the tokens with the largest `found.weights_at` there, with their weights."""
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_function("window.vggattnTokens && window.vggattnTokens.ready", timeout=30_000)
    other = next(n for n in found.names if n != token)
    page.evaluate(f"window.vggattnTokens.choose({other!r})")
    before = page.evaluate("[...document.querySelectorAll('canvas')].map((c) => c.toDataURL())")
    page.locator(f'.tile[data-name="{token}"]').click()
    assert page.evaluate("document.querySelector('.tile.chosen').dataset.name") == token
    after = page.evaluate("[...document.querySelectorAll('canvas')].map((c) => c.toDataURL())")
    assert len(after) == len(found.blocks) and all(a != b for a, b in zip(after, before))  # every layer redrawn
    W, H = found.input_wh
    for fx, fy in places:
        page.evaluate(f"window.vggattnTokens.at({fx}, {fy})")
        want = found.weights_at((fx * W, fy * H))
        layers = page.locator("#tokens-bars .token-layer")
        assert layers.count() == len(found.blocks)
        for k, block in enumerate(found.blocks):
            shown = layers.nth(k).locator(".token-weight").all_inner_texts()
            names = layers.nth(k).locator(".token-name").all_inner_texts()
            top = np.sort(want[block])[::-1][:len(shown)]
            np.testing.assert_allclose([float(v) for v in shown], top, atol=1.5e-4)
            best = found.names[int(np.argmax(want[block]))]
            assert names[0].split(" · ")[0] == best or float(shown[0]) == float(shown[1])
    assert not errors
    page.close()


def test_the_shipped_detector_finds_the_held_out_shapes_and_its_queries_look_at_them():
    """checkpoints/shapes-detector as `--hf` loads it, on 40 held-out images: the card's AP50 (0.962 on all 500) and
    its queries' attention inside their objects' boxes, each well clear of a chance level."""
    from pathlib import Path

    from vggattn.models.byo import load_hf
    from vggattn.training import detector

    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-detector"
    model, meta = load_hf(str(folder))
    assert meta["input_size"] == shapes.SIZE
    inner = T.ConditionalDetrForObjectDetection.from_pretrained(folder).eval()
    assert detector.evaluate(inner, count=40)["ap50"] > 0.85
    report = detector.attention_report(inner, count=40)
    assert report["matched"] >= 0.9 * report["objects"]
    assert report["in_box"][0] > 5 * report["box_area"][0]


def test_the_per_query_study_over_a_folder_of_the_shipped_detector(tmp_path):
    from pathlib import Path

    from vggattn import study

    for i in range(6):
        img, _ = shapes.sample("val", 100 + i)
        img.save(tmp_path / f"{i}.png")
    folder = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-detector"
    out = tmp_path / "queries"
    assert study.main(["--hf", str(folder), "--tokens", "--data", str(tmp_path), "--out", str(out)]) == 0
    got = json.loads((out / "study.json").read_text())
    assert "<td>query 0</td>" in (out / "report.html").read_text()
    assert got["images"] == 6 and len(got["queries"]) == 12 and len(got["layers"]) == 3
    finders = [q for q in got["queries"].values() if q["object_rate"] > 0]
    assert finders and all(set(q["classes"]) <= set(shapes.CLASSES) for q in finders)
    last = got["layers"][-1]
    for q in finders:
        mean, low, high = q["in_box"][last]
        assert low <= mean <= high and mean > q["box_area"][0]  # more inside its box than an even spread gives
    assert all(q["in_box"][last] is None for q in got["queries"].values() if q["object_rate"] == 0)
    assert study.main(["--hf", str(folder), "--tokens", "--data", str(tmp_path / "none"), "--out", str(out)]) == 2
