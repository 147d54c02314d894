"""A/B under one pointer (`vggattn.view.compare`, `vggattn-explain --compare`): the difference's arithmetic on known
cases; what each kind of B changes (another image, an intervention, re-initialised Q and K, another model); and the
file in Chromium from file:// with the network off: the pointer and clicks on either side reach the other at the
same place in its image, and the page's differences equal numpy's."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from vggattn import explain
from vggattn.view.compare import difference, jsd_bits, point_on, resample

from conftest import CHROMIUM

HERE = Path(__file__).resolve().parents[1]
CHURCH = HERE / "assets" / "church.jpg"
SMALL = HERE / "checkpoints" / "vgg16att-imagenette-w025-128.safetensors"


def test_resample_jsd_and_difference_on_known_cases():
    row = np.array([0.1, 0.2, 0.3, 0.4])  # 2x2
    fine = resample(row, (2, 2), (4, 4)).reshape(4, 4)
    assert fine.sum() == pytest.approx(1.0) and fine[0, 0] == fine[1, 1] == pytest.approx(0.025)
    assert fine[3, 3] == pytest.approx(0.1)
    assert jsd_bits([1, 0], [0, 1]) == pytest.approx(1.0) and jsd_bits([0.3, 0.7], [0.3, 0.7]) == pytest.approx(0.0)
    # A: all on the top-left cell of 2x2, a quarter on each of 4 cells of 4x4; B: all on one of those 4 cells
    d = difference(np.array([1.0, 0, 0, 0]), (2, 2), np.eye(16)[5], (4, 4))
    assert d["grid"] == (4, 4) and d["cell"] == 5 and d["largest"] == pytest.approx(0.75)
    m = np.array([0.125, 0.125, 0.125, 0.625])  # by hand: JSD = (KL(p || m) + KL(q || m)) / 2
    assert d["jsd"] == pytest.approx((0.75 * 1 + 0.25 * np.log2(0.25 / m[3]) + np.log2(1 / m[3])) / 2)
    assert point_on((0, 0), (700, 450), (224, 224)) == (0, 0) and point_on((699, 449), (700, 450), (224, 224)) == (223, 223)


def compared(tmp_path, what: str, point: str = "60,150") -> dict:
    assert explain.main([str(CHURCH), "--point", point, "--out", str(tmp_path), "--no-ablation", "--compare", what]) == 0
    return json.loads((tmp_path / "church" / "compare.json").read_text())


def test_what_each_kind_of_b_changes(tmp_path):
    """The same image as B: nothing changes. Every block off: the first block's rows stay (its input is the same),
    later ones change. Two layers: one pair, on the finer grid. Q and K re-initialised: every block's rows change."""
    same = compared(tmp_path / "same", str(CHURCH))
    assert all(p["jsd_bits"] == 0 and p["largest_change"] == 0 for p in same["layers"])
    off = compared(tmp_path / "off", "off")
    assert off["layers"][0]["jsd_bits"] == pytest.approx(0, abs=1e-9) and off["layers"][1]["jsd_bits"] > 0.01
    layers = compared(tmp_path / "layers", "layers:features.14,features.30")  # two layers, the finer grid
    assert [(p["a"], p["b"], p["grid"]) for p in layers["layers"]] == [("features.14", "features.30", [64, 64])]
    assert layers["layers"][0]["jsd_bits"] > 0.01
    reinit = compared(tmp_path / "reinit", "reinit")
    assert all(p["jsd_bits"] > 0.01 for p in reinit["layers"]) and "re-initialised" in reinit["b"]
    assert (tmp_path / "reinit" / "church" / "compare.html").stat().st_size > 100_000


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                    reason="Chromium not installed (apt-get install -y chromium); CI always runs this")
def test_two_models_on_different_grids_under_one_pointer_offline(browser, tmp_path):
    """The shipped checkpoint (grids 64, 32, 16) against the quarter-width one (32, 16, 8): opened from disk with no
    network, both points pinned at the same place; the page's B - A per layer equals compare.json's (numpy); the
    pointer over A's picture moves B's point, a click on B's picture pins A's; no script error, nothing fetched."""
    numbers = compared(tmp_path, str(SMALL))
    assert [p["grid"] for p in numbers["layers"]] == [[64, 64], [32, 32], [16, 16]]
    context = browser.new_context(viewport={"width": 1440, "height": 900}, offline=True)
    refused, errors = [], []
    context.route(lambda url: not url.startswith(("file:", "data:", "about:")),
                  lambda r: (refused.append(r.request.url), r.abort()))
    page = context.new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "church" / "compare.html").as_uri())
    page.wait_for_function("window.vggattnCompare && window.vggattnCompare.ready", timeout=60_000)
    side = {f.frame_element().get_attribute("id"): f for f in page.frames if f != page.main_frame}
    assert side["side-a"].evaluate("window.vggattnHover.state().pinned") == [60, 150]
    assert side["side-b"].evaluate("window.vggattnHover.state().pinned") == numbers["point_b"]
    shown = page.evaluate("window.vggattnCompare.results.map(r => [r.largest, r.jsd, r.cell, r.grid])")
    for (largest, jsd, cell, grid), want in zip(shown, numbers["layers"]):
        assert grid == want["grid"] and divmod(cell, grid[1]) == tuple(want["at_cell"])
        assert largest == pytest.approx(want["largest_change"], abs=1e-9) and jsd == pytest.approx(want["jsd_bits"], abs=1e-9)
    img = page.frame_locator("#side-a").locator("#input-image img").bounding_box()
    page.mouse.move(img["x"] + img["width"] * 0.3, img["y"] + img["height"] * 0.7)
    page.wait_for_function("window.vggattnCompare.results.length === 3", timeout=5_000)
    a_at = side["side-a"].evaluate("window.vggattnHover.state().current")
    assert a_at is not None and side["side-b"].evaluate("window.vggattnHover.state().current") == list(
        point_on(a_at, (224, 224), (224, 224)))
    assert page.evaluate("document.getElementById('diff-text-0').textContent").startswith("B − A, scale ±")
    page.screenshot(path=str(HERE / "artifacts" / "compare.png"), full_page=True)
    img_b = page.frame_locator("#side-b").locator("#input-image img")
    img_b.click(position={"x": 20, "y": 30})
    b_pin = side["side-b"].evaluate("window.vggattnHover.state().pinned")
    assert side["side-a"].evaluate("window.vggattnHover.state().pinned") == list(point_on(b_pin, (224, 224), (224, 224)))
    assert not errors and not refused, (errors, refused)
    context.close()
