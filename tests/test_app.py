"""Handler tests: call the app's functions directly, no server."""

import numpy as np
import pytest
import torch

import app
from conftest import tiny_meta, tiny_model
from vggattn.analysis import Analysis

ASSET = app.HERE / "assets" / "church.jpg"


@pytest.fixture(scope="module")
def mm():
    return tiny_model(), tiny_meta(input_size=64)


def select(x, y):
    return app.gr.SelectData(target=None, data={"index": [x, y], "value": None})


def test_upload_runs_the_model_once_and_fills_the_page(mm):
    model, meta = mm
    state, labels, md, df, seen, status, *panels = app.on_image(model, meta, str(ASSET))
    assert isinstance(state, Analysis) and state.size == (224, 224)
    assert len(labels) == 5 and abs(sum(labels.values()) - 1) < 1 and all(0 <= p <= 1 for p in labels.values())
    assert list(df["layer"]) == ["features.14", "features.22", "features.30"]
    assert "features.22" in md and "γ" in md
    assert seen.shape == (64, 64, 3) and seen.dtype == np.uint8
    assert "Click" in status
    assert all(p.value is None for p in panels)


def test_cleared_image_resets(mm):
    out = app.on_image(*mm, None)
    assert out[0] is None and "Upload" in out[5]


def test_click_renders_three_titled_overlays_without_the_model(mm, monkeypatch):
    model, meta = mm
    state = app.on_image(model, meta, str(ASSET))[0]
    monkeypatch.setattr(model, "forward", lambda *a: pytest.fail("a click ran the model"))
    point, status, *panels = app.on_click(state, 0.5, "jet", "smooth", select(10, 200))
    assert point == (10, 200) and "query index" in status
    titles = [p.label for p in panels]
    assert [t.split(" ")[0] for t in titles] == ["features.14", "features.22", "features.30"]
    assert "16×16" in titles[0] and "γ = +0.5000" in titles[0]
    for p in panels:
        assert p.value is not None
    _, _, *elsewhere = app.on_click(state, 0.5, "jet", "smooth", select(200, 20))
    assert not np.array_equal(np.asarray(panels[0].value["path"] if isinstance(panels[0].value, dict) else panels[0].value),
                              np.asarray(elsewhere[0].value["path"] if isinstance(elsewhere[0].value, dict) else elsewhere[0].value))


def test_controls_rerender_without_the_model(mm, monkeypatch):
    model, meta = mm
    state = app.on_image(model, meta, str(ASSET))[0]
    monkeypatch.setattr(model, "forward", lambda *a: pytest.fail("a control change ran the model"))
    a = app.on_controls(state, (100, 100), 0.2, "jet", "smooth")
    b = app.on_controls(state, (100, 100), 0.9, "viridis", "blocky")
    assert len(a) == len(b) == 3
    assert a[0].label == b[0].label
    assert app.on_controls(state, None, 0.5, "jet", "smooth") == [app.gr.skip()] * 3  # nothing clicked yet


@pytest.mark.parametrize("state,words", [(None, "before clicking"), (app.PENDING, "still being analysed")])
def test_click_before_upload_or_mid_upload_is_a_message(state, words):
    point, status, *panels = app.on_click(state, 0.5, "jet", "smooth", select(1, 1))
    assert point is None and words in status


def test_click_outside_is_clamped(mm):
    state = app.on_image(*mm, str(ASSET))[0]
    point, *_ = app.on_click(state, 0.5, "jet", "smooth", select(5000, -3))
    assert point == (223, 0)


def test_bad_uploads_are_plain_errors(mm, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(app.gr.Error, match="not an image in a supported format"):
        app.on_image(*mm, str(text))
    with pytest.raises(app.gr.Error, match="upload an image"):
        app.api_analyze(*mm, None)


def test_stateless_endpoints(mm):
    model, meta = mm
    labels, gammas = app.api_analyze(model, meta, str(ASSET))
    assert len(labels) == 5 and gammas == pytest.approx({"features.14": 0.5, "features.22": 0.5, "features.30": 0.5})
    *images, info = app.api_attention_at(model, meta, str(ASSET), 0, 0)
    assert [i["query_index"] for i in info] == [0, 0, 0]
    assert all(im.shape == (224, 224, 3) for im in images)
    with pytest.raises(app.gr.Error, match="outside"):
        app.api_attention_at(model, meta, str(ASSET), 224, 5)


def test_bad_checkpoint_exits_with_one_sentence(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    assert app.main(["--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot load checkpoint") and "\n" not in err and "Traceback" not in err


def test_device_note_in_page(mm):
    assert "running on **CPU**" in app.describe(*mm) or torch.cuda.is_available()
