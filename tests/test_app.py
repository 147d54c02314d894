"""Handler tests: call the app's functions directly, no server."""

from pathlib import Path

import numpy as np
import pytest
import torch
import gradio as gr

from vggattn import app
import vggattn
from conftest import tiny_meta, tiny_model

ASSET = app.HERE / "assets" / "church.jpg"


@pytest.fixture(scope="module")
def mm():
    return tiny_model(), tiny_meta(input_size=64)


@pytest.fixture(scope="module")
def ui(mm):
    """The components the handlers write to (a built demo; no server)."""
    return app.build_demo(*mm).ui


def select(x, y):
    return app.gr.SelectData(target=None, data={"index": [x, y], "value": None})


def upload(ui, mm, path=ASSET):
    return app.on_image(ui, *mm, str(path))


def describe(model, meta):
    return app.describe(model, meta, app.blocks_of(model, meta))


def test_upload_runs_the_model_once_and_fills_the_page(mm, ui):
    out = upload(ui, mm)
    state, labels, df, seen = out[ui.state], out[ui.labels], out[ui.gammas_plot], out[ui.seen]
    assert isinstance(state, app.Session) and state.size == (224, 224)
    assert len(labels) == 5 and abs(sum(labels.values()) - 1) < 1 and all(0 <= p <= 1 for p in labels.values())
    assert list(df["block"]) == ["features.14", "features.22", "features.30"]
    assert "features.22" in out[ui.gammas_md] and "γ" in out[ui.gammas_md]
    assert seen.shape == (64, 64, 3) and seen.dtype == np.uint8
    assert "click" in out[ui.status] and "pointer" in out[ui.status]
    assert all(out[p] is None for p in ui.panels) and out[ui.readouts] == ""
    assert all(isinstance(out[m], np.ndarray) for m in ui.contribution)  # the open tab's maps come with the upload
    assert all(out[m] is None for m in [*ui.mean_maps, ui.gradcam])  # the others' when their tab is opened
    tabs = {tab: app.on_tab(ui, tab, state, model=mm[0]) for tab in ("contribution", "dependence", "gradcam", "export")}
    maps = [tabs["contribution"][m] for m in ui.maps[:3]] + [tabs["dependence"][m] for m in ui.maps[3:6]] + \
        [tabs["gradcam"][ui.maps[6]]]
    assert all(isinstance(m, np.ndarray) for m in maps)  # contribution x3, query-averaged x3, Grad-CAM
    assert "‖y − x‖/‖x‖" in ui.maps[0].label and tabs["gradcam"][ui.open_tab] == "gradcam"
    assert "mean over queries" in ui.maps[3].label and "Grad-CAM" in ui.maps[6].label
    assert tabs["contribution"][ui.contribution_md].count("| `features.") == 3 and "largest" in tabs["contribution"][ui.contribution_md]
    assert "features.30" in tabs["dependence"][ui.dependence_md] and "JSD" in tabs["dependence"][ui.dependence_md]
    assert all(tabs["export"][m] is None for m in ui.maps)  # a tab without maps: none drawn
    assert all(tabs["contribution"][m] is None for m in ui.maps[3:])  # only its own; the others when opened
    assert tabs["contribution"][ui.dependence_md] == "" and tabs["dependence"][ui.contribution_md] == ""
    # plain values only: Gradio rebuilds a component and its config for any update dict (bench/README.md)
    assert not any(isinstance(v, dict) for t in tabs.values() for v in t.values())
    assert app.on_tab(ui, "dependence", None)[ui.maps[3]] is None  # no image yet: nothing, no error


def test_cleared_image_resets(mm, ui):
    out = app.on_image(ui, *mm, None)
    assert out[ui.state] is None and "Upload" in out[ui.status]
    assert all(out[p] is None for p in ui.panels) and all(out[m] is None for m in ui.maps)


def test_click_renders_three_titled_overlays_without_the_model(mm, ui, monkeypatch):
    model, meta = mm
    state = upload(ui, mm)[ui.state]
    monkeypatch.setattr(model, "forward", lambda *a: pytest.fail("a click ran the model"))
    out = app.on_click(ui, state, 0.5, "jet", "smooth", True, select(10, 200))
    assert out[ui.point] == (10, 200) and "Pinned: pixel (10, 200)" in out[ui.status]
    assert out[ui.readouts].count("| `features.") == 3 and "entropy" in out[ui.readouts]
    panels = [out[p] for p in ui.panels]
    titles = [p.label for p in ui.panels]  # fixed when the app is built: the numbers are in the readouts
    assert [t.split(":")[0] for t in titles] == ["features.14", "features.22", "features.30"]
    assert all(len(t) < 48 for t in titles), titles  # fits a label
    assert all(isinstance(p, np.ndarray) and p.ndim == 3 for p in panels)
    assert not any(isinstance(v, dict) for v in out.values())  # plain values only (no update dicts)
    elsewhere = app.on_click(ui, state, 0.5, "jet", "smooth", True, select(200, 20))
    assert not np.array_equal(panels[0], elsewhere[ui.panels[0]])


def test_a_click_the_page_drew_gets_the_readouts_and_no_pictures(mm, ui, monkeypatch):
    """The page's script draws a pin itself and says so (PIN_JS): the server draws no picture, clears the
    panels (the page's canvases lie over them) and sends the same status and readouts as a full click."""
    state = upload(ui, mm)[ui.state]
    full = app.on_click(ui, state, 0.5, "jet", "smooth", True, select(10, 200))
    monkeypatch.setattr(vggattn.view.hover, "attention_picture", lambda *a, **k: pytest.fail("a picture was drawn"))
    light = app.on_click(ui, state, 0.5, "jet", "smooth", True, select(10, 200), page_draws=True)
    assert all(light[p] is None for p in ui.panels) and set(light) == set(full)
    assert light[ui.point] == full[ui.point] and light[ui.status] == full[ui.status] and light[ui.readouts] == full[ui.readouts]
    assert "drawsPins" in app.PIN_JS and "drawsPins" in (app.WEB / "hover.js").read_text()


def test_controls_rerender_without_the_model(mm, ui, monkeypatch):
    model, meta = mm
    state = upload(ui, mm)[ui.state]
    monkeypatch.setattr(model, "forward", lambda *a: pytest.fail("a control change ran the model"))
    a = app.on_controls(ui, state, (100, 100), 0.2, "jet", "smooth", True)
    b = app.on_controls(ui, state, (100, 100), 0.9, "viridis", "blocky", False)
    assert set(a) == set(b) == {*ui.panels, *ui.maps, ui.contribution_md, ui.dependence_md}
    first_map = ui.maps[0]
    assert not np.array_equal(a[first_map], b[first_map])  # the tabs' maps follow the controls too
    unclicked = app.on_controls(ui, state, None, 0.5, "jet", "smooth", True)
    assert set(unclicked) == {*ui.maps, *ui.panels, ui.contribution_md, ui.dependence_md}  # nothing clicked yet: the panels are left as they are
    assert all(unclicked[p] == app.gr.update() for p in ui.panels)
    marked, plain = (app.on_controls(ui, state, (100, 100), 0.5, "jet", "smooth", m, tab="contribution")
                     for m in (True, False))
    assert not np.array_equal(marked[ui.panels[0]], plain[ui.panels[0]])  # the numbering redraws the panels
    assert np.array_equal(marked[ui.maps[0]], plain[ui.maps[0]])  # and not the open tab's maps


@pytest.mark.parametrize("stale,words", [(None, "Upload an image"), (True, "still being analysed")])
def test_click_before_upload_or_mid_upload_is_a_message(mm, ui, stale, words):
    state = None
    if stale:  # the upload event of a second image has begun: the first image's analysis is marked stale
        state = upload(ui, mm)[ui.state]
        app.on_upload(ui, *mm, None, state)
        assert state.stale
    out = app.on_click(ui, state, 0.5, "jet", "smooth", True, select(1, 1))
    assert out[ui.point] is None and words in out[ui.status] and set(out) == set(app.point_outputs(ui))
    assert all(out[p] == app.gr.update() for p in [*ui.panels, ui.readouts])  # a warning, not an error


def test_click_outside_is_clamped(mm, ui):
    state = upload(ui, mm)[ui.state]
    assert app.on_click(ui, state, 0.5, "jet", "smooth", True, select(5000, -3))[ui.point] == (223, 0)


def test_bad_uploads_are_plain_errors(mm, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    ui = app.build_demo(*mm).ui
    with pytest.raises(app.gr.Error, match="not an image in a supported format"):
        app.on_image(ui, *mm, str(text))
    # the upload event: a warning, and an empty app that says why (not the previous image's analysis)
    before = upload(ui, mm)[ui.state]
    with pytest.warns(UserWarning, match="not an image in a supported format"):
        out = app.on_upload(ui, *mm, str(text), before)
    assert out[ui.state] is None and out[ui.hover] is None and "not an image" in out[ui.status]
    assert before.stale
    busy = {}  # as the demo wires it: the second change event of the same bad upload warns no second time
    with pytest.warns(UserWarning, match="not an image"):
        app.on_upload(ui, *mm, str(text), None, busy=busy, session_id="s")
    again = app.on_upload(ui, *mm, str(text), None, busy=busy, session_id="s")
    assert all(v == app.gr.skip() for v in again.values())
    with pytest.raises(app.gr.Error, match="upload an image"):
        app.api_analyze(*mm, None, None)


def test_stateless_endpoints(mm):
    model, meta = mm
    labels, gammas = app.api_analyze(model, meta, None, str(ASSET))
    assert len(labels) == 5 and gammas == pytest.approx({"features.14": 0.5, "features.22": 0.5, "features.30": 0.5})
    *images, info = app.api_attention_at(model, meta, None, str(ASSET), 0, 0)
    assert [i["query_index"] for i in info] == [0, 0, 0]
    assert all(im.shape == (224, 224, 3) for im in images)
    with pytest.raises(app.gr.Error, match="outside"):
        app.api_attention_at(model, meta, None, str(ASSET), 224, 5)


def test_bad_checkpoint_exits_with_one_sentence(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    assert app.main(["--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot load the model") and "\n" not in err and "Traceback" not in err


def test_device_note_in_page(mm):
    assert "running on **CPU**" in describe(*mm) or torch.cuda.is_available()


def test_ablation_compares_top5_with_one_forward(mm, ui):
    model, meta = mm
    state = upload(ui, mm)[ui.state]
    calls = []
    real = model.forward
    model.forward = lambda *a: calls.append(1) or real(*a)
    try:
        out = app.on_ablate(ui, model, state, ["features.14", "features.22", "features.30"])
        df, verdict = out[ui.ablation], out[ui.ablation_verdict]
    finally:
        del model.forward
    assert calls == [1]
    assert list(df.columns)[1:] == ["as computed", "features.14, features.22, features.30: off", "change"]
    assert len(df) == 5 and "Top-1" in verdict
    assert (df["change"].abs() > 0).any()  # gammas are 0.5: switching attention off changes the output
    # ordinary sequences are a warning and a line, never an Error
    assert "at least one block" in app.on_ablate(ui, model, state, [])[ui.ablation_verdict]
    assert "Upload an image" in app.on_ablate(ui, model, None, ["features.14"])[ui.ablation_verdict]


def test_export_writes_a_zip_with_figure_maps_and_numbers(mm, ui):
    import json
    import zipfile

    model, meta = mm
    state = upload(ui, mm)[ui.state]
    out = app.on_export(ui, model, state, (30, 40), 0.5, "jet", "smooth", meta=meta)
    archive, figure = out[ui.export_file], out[ui.export_png]
    names = set(zipfile.ZipFile(archive).namelist())
    assert {"figure.png", "result.json", "gradcam.npy", "features.14_attention.npy", "features.30_mean_attention.npy"} <= names
    result = json.loads(zipfile.ZipFile(archive).read("result.json"))
    assert result["points"][0]["xy"] == [30, 40] and result["points"][0]["layers"]["features.14"]["query_index"] == \
        vggattn.query_index((30, 40), (224, 224), state.result.blocks[0].maps.grid)
    assert figure.endswith("figure.png")
    # the live view in one file, also in the zip: the pinned point drawn when it opens, this export's controls
    html = Path(out[ui.export_html]).read_text()
    assert Path(out[ui.export_html]).name == "vggattn-export-x30-y40.html" and "view.html" in names
    assert "first = [30, 40];" in html and '"colormap": "jet"' in html and "attention-VGG16 (width" in html


def test_compare_tab_makes_the_ab_page_for_each_kind_of_b(mm, ui):
    """The Compare tab's handler: for re-initialised Q and K, an intervention and another image, a frame holding the
    A/B page (both sides at the pinned point) and the same page as a file; no image yet or no B image: a warning,
    nothing made."""
    import html

    model, meta = mm
    state = upload(ui, mm)[ui.state]
    for kind, other in (("reinit", None), ("mean", None), ("image", str(ASSET))):
        frame, path = app.on_compare(model, meta, None, state, (30, 40), kind, other)
        page = Path(path).read_text()
        assert frame.startswith("<iframe") and html.escape(page, quote=True) in frame
        assert "first = [30, 40];" in page and "B − A" in page  # A's point, pinned; the difference panels' script
    with pytest.warns(UserWarning):
        assert app.on_compare(model, meta, None, state, None, "image", None) == ("", None)
    with pytest.warns(UserWarning):
        assert app.on_compare(model, meta, None, None, None, "reinit", None) == ("", None)


def test_a_link_names_an_example_its_point_and_controls(mm, ui):
    """on_link: ?example=church.jpg&x=..&y=..&scale=log: that photo analysed, the point pinned (clamped into it), the
    controls set, the page told the point; the image's echo of the link is not a second upload; a photo the app lacks
    or a point that is no number: a warning, nothing else."""
    model, meta = mm
    out = app.on_link(ui, model, meta, {"example": "church.jpg", "x": "9999", "y": "10", "scale": "log", "mark": "0"})
    state = out[ui.state]
    assert out[ui.point] == (223, 10) and out[ui.hover]["pin"] == [223, 10] and out[ui.hover]["example"] == "church.jpg"
    assert dict(zip(ui.controls, [out[c] for c in ui.controls]))[ui.controls[4]] == "log" and out[ui.controls[3]] is False
    assert "Pinned: pixel (223, 10)" in out[ui.status] and out[ui.image].endswith("church.jpg")
    echo = app.on_upload(ui, model, meta, out[ui.image], state)
    assert echo[ui.hover]["pin"] == [223, 10] and echo[ui.hover]["again"] and state.linked is None
    assert all(v == gr.skip() for k, v in echo.items() if k is not ui.hover)  # nothing else of the view redone
    linked = app.on_link(ui, model, meta, {"example": "church.jpg"})[ui.state]  # then, first, the person's own file
    mine = app.on_upload(ui, model, meta, str(ASSET.parent / "parachute.jpg"), linked)
    assert mine[ui.state].path.endswith("parachute.jpg") and mine[ui.state] is not linked  # analysed, not skipped
    with pytest.warns(UserWarning, match="does not have"):
        nothing = app.on_link(ui, model, meta, {"example": "elsewhere.jpg"})
    assert all(v == gr.skip() for v in nothing.values())
    with pytest.warns(UserWarning, match="could not be read"):
        plain = app.on_link(ui, model, meta, {"example": "church.jpg", "x": "left", "y": "2"})
    assert plain[ui.point] is None and isinstance(plain[ui.state], app.Session)
    assert all(v == gr.skip() for v in app.on_link(ui, model, meta, {}).values())  # no link: every output skipped
    for bad in ({"colormap": "plaid"}, {"scale": "cubic"}, {"mode": "x"}, {"opacity": "7"}, {"head": "a"}):
        with pytest.warns(UserWarning, match="could not be read"):  # a control no component takes: none set
            odd = app.on_link(ui, model, meta, {"example": "church.jpg", **bad})
        assert [odd[c] for c in ui.controls] == [app.CONTROLS[k] for k in ("opacity", "colormap", "mode", "mark",
                                                                            "scale")] + ["mean"]
    with pytest.warns(UserWarning, match="not one of the model's 1"):
        assert app.on_link(ui, model, meta, {"example": "church.jpg", "head": "3"})[ui.controls[5]] == "mean"


def dataset_markdown(demo) -> str:
    return next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "study")


def test_dataset_tab_shows_the_shipped_study_or_says_how_to_make_one(mm, tmp_path):
    from vggattn import study as study_mod

    model, meta = mm
    demo = app.build_demo(model, meta, None, "my.safetensors")
    assert "python -m vggattn.study --checkpoint my.safetensors" in dataset_markdown(demo)
    fake = {"checkpoint": "x.safetensors", "data": "val", "images": 4, "input_size": 64, "wall_s": 1.0,
            "definitions": {"sink_dominated": "sink_mass >= 0.5", "ci": "bootstrap", "sanity_pass": "rho < 0.5"},
            "layers": {}, "interventions": {"baseline": {"top1": 0.5, "top5": 1.0}}, "sanity": {"images": 0, "layers": {}}}
    for name in ("features.14", "features.22", "features.30"):
        stats = {s: 0.25 for s in study_mod.STATS}
        dist = {"histogram": {"counts": [1, 3], "edges": [0.0, 0.5, 1.0]}}
        fake["layers"][name] = {**stats, "grid": [2, 2], "gamma": 0.1, "sink_dominated_share": 0.75,
                                "sink_border_share": 1.0, "sink_heatmap": [[3, 1], [0, 0]],
                                "distribution": {s: dist for s in study_mod.STATS}, "per_class": {}}
        for mode in study_mod.MODES:
            fake["interventions"][f"{name}:{mode}"] = {"top1": 0.25, "top5": 1.0, "top1_delta": -0.25,
                                                      "top1_delta_ci95": [-0.5, 0.0]}
    demo = app.build_demo(model, meta, fake, "x.safetensors")
    md = dataset_markdown(demo)
    assert "sink-dominated in 75% of images" in md and "| features.22:mean | 25.00% |" in md
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"study-interventions", "study-sink_heatmaps", "study-distributions"} <= ids


def test_probabilities_use_the_checkpoints_temperature(mm):
    from vggattn.analysis import ablate, analyze
    from vggattn.data import preprocess

    model, meta = mm
    image = vggattn.open_image(ASSET)
    with torch.no_grad():
        logits = model(preprocess(image, meta))[0]
    plain = analyze(model, meta, image)
    hot = analyze(model, {**meta, "temperature": 0.5}, image)
    torch.testing.assert_close(plain.probs, logits.softmax(-1))
    torch.testing.assert_close(hot.probs, (logits / 0.5).softmax(-1))
    torch.testing.assert_close(ablate(model, hot, {}), hot.probs)  # the same calibration with nothing switched off


def test_unsure_threshold_rule_on_known_predictions():
    from vggattn.attention.readouts import unsure_threshold

    # the 3 least confident are right 1 time in 3 (< 50%), the 4 least confident 2 in 4 (not under 50%)
    assert unsure_threshold(np.array([0.9, 0.1, 0.4, 0.2, 0.3]), np.array([1, 0, 1, 0, 1])) == pytest.approx(0.3)
    assert unsure_threshold(np.array([0.2, 0.6]), np.array([1, 0])) == 0.0  # never under 50%


def test_the_app_says_what_the_model_knows_and_when_it_is_unsure(mm, ui):
    model, meta = mm
    header = describe(model, meta)
    assert "knows 10 classes (c0, c1" in header and "any image you give it gets one of them" in header
    assert "Every γ is 0" not in header
    many = describe(model, {**meta, "class_names": [f"k{i}" for i in range(1000)]})  # an ImageNet head
    assert "knows 1000 classes (k0, k1" in many and "k19, and 980 more)" in many and "k20" not in many
    sure = app.on_image(ui, model, {**meta, "unsure_below": 0.0}, str(ASSET))[ui.status]
    unsure = app.on_image(ui, model, {**meta, "unsure_below": 0.999}, str(ASSET))[ui.status]
    assert "Unsure" not in sure and "⚠ Unsure: the top-1 probability" in unsure and "below 100%" in unsure


def test_a_model_whose_gammas_are_all_zero_is_flagged():
    fresh = vggattn.vgg16_with_attention(10, width=0.125, hidden=32).eval()  # gamma = 0, as initialised
    header = describe(fresh, tiny_meta(input_size=64))
    assert "Every γ is 0: attention does not affect this model's predictions" in header


def test_host_and_port_follow_the_hosting_environment(monkeypatch):
    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PORT"):
        monkeypatch.delenv(name, raising=False)
    args = app.parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 7860)  # this machine only, by default
    monkeypatch.setenv("PORT", "8080")
    assert app.parse_args([]).port == 8080
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    args = app.parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 7861)
    assert app.parse_args(["--host", "127.0.0.1", "--port", "9000"]).port == 9000  # flags win


def test_a_click_states_the_sink_notes_under_the_panels():
    """The quarter-width checkpoint (two sink-dominated layers on most images): the notes are in the
    status line right under the panels, where a label would cut them off."""
    from vggattn.models.checkpoint import SMALL_CHECKPOINT

    model, meta = vggattn.load_checkpoint(SMALL_CHECKPOINT, device="cpu")
    ui = app.build_demo(model, meta).ui
    state = app.on_image(ui, model, meta, str(ASSET))[ui.state]
    out = app.on_click(ui, state, 0.5, "jet", "smooth", True, select(30, 40))
    flagged = out[ui.status].count("⚠ `features.")
    assert flagged and out[ui.readouts].count("⚠ `features.") == flagged  # and in the readouts beside the numbers
    assert "query-independent here" in out[ui.status] or "sink-dominated image" in out[ui.status]


def test_log_scale_redraws_the_pinned_panels(mm, ui):
    state = upload(ui, mm)[ui.state]
    linear = app.on_point(ui, state, 100, 120)
    logged = app.on_point(ui, state, 100, 120, scale="log")
    assert linear[ui.status] == logged[ui.status]  # the same point and queries, coloured otherwise
    assert all(not np.array_equal(linear[p], logged[p]) for p in ui.panels)
    c = app.CONTROLS
    again = app.on_controls(ui, state, (100, 120), c["opacity"], c["colormap"], c["mode"], True, "log")
    assert all(np.array_equal(again[p], logged[p]) for p in ui.panels)


def test_controls_before_a_click_leave_every_panel_as_it_is(mm, ui):
    """Gradio reads an empty dict as one missing output (the panels showed "Error"): every output gets
    a no-op update instead."""
    state = upload(ui, mm)[ui.state]
    out = app.on_controls(ui, state, None, 0.5, "jet", "smooth", True, "log", tab="export")
    assert all(out[p] == app.gr.update() for p in ui.panels)
    out = app.on_controls(ui, None, None, 0.5, "jet", "smooth", True)
    assert set(out) == {*ui.panels, *ui.maps, ui.contribution_md, ui.dependence_md}
    assert all(v == app.gr.update() for v in out.values())


def test_the_server_shares_the_cores_among_the_events_running(monkeypatch):
    """A lone event that runs the model gets every core; two at once half each (two forwards at 2 threads each on 2
    cores lost 6% of the uploads under load); `--threads N` fixes N whatever runs."""
    import threading

    from vggattn.app import ui as page

    served, threads = [], torch.get_num_threads()
    monkeypatch.setattr(app, "serve", lambda demo, *a, **k: served.append(k))
    monkeypatch.setitem(page._CORES, "cores", 4)
    seen, inside, leave = [], threading.Barrier(2), threading.Event()

    def event():
        with page.sharing_cores():
            seen.append(torch.get_num_threads())
            inside.wait(timeout=10)
            leave.wait(timeout=10)
    try:
        assert app.main(["--concurrency", "2"]) == 0 and served[-1]["concurrency"] == 2
        with page.sharing_cores():
            assert torch.get_num_threads() == 4  # alone: every core
        first = threading.Thread(target=event)
        first.start()
        inside.wait(timeout=10)  # the first is inside; a second comes in beside it
        inside.reset()
        second = threading.Thread(target=event)
        second.start()
        inside.wait(timeout=10)
        leave.set()
        first.join(), second.join()
        assert seen == [4, 2] and page._CORES["running"] == 0
        assert app.main(["--concurrency", "1", "--threads", "3"]) == 0
        with page.sharing_cores():
            assert torch.get_num_threads() == 3
    finally:
        page.fix_threads(0)
        torch.set_num_threads(threads)


def test_freed_memory_goes_back_only_once_the_process_has_grown(monkeypatch):
    """malloc_trim hands freed pages back (the RSS under load), but the next forward faults them in again: it runs
    only once the process has grown by TRIM_GROWTH since the last time."""
    from vggattn.app import ui as page

    trims, rss = [], [500 << 20]

    class Libc:
        def malloc_trim(self, pad):
            trims.append(pad)
            rss[0] -= 100 << 20  # what a trim gives back

    monkeypatch.setattr(page.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(page, "resident_bytes", lambda: rss[0])
    monkeypatch.setattr(page, "_resident_after_trim", [0])
    page.release_memory()  # 500 MB over nothing: trimmed, to 400 MB
    assert len(trims) == 1
    rss[0] += page.TRIM_GROWTH - (1 << 20)
    page.release_memory()  # grown by less than TRIM_GROWTH: kept
    assert len(trims) == 1
    rss[0] += 2 << 20
    page.release_memory()  # now more: trimmed
    assert len(trims) == 2
    monkeypatch.setattr(page, "resident_bytes", lambda: None)  # nothing to read (not Linux): trim every time
    page.release_memory()
    assert len(trims) == 3
