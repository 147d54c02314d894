"""A click under network latency, in Chromium: the pinned panels are on screen before the server answers, and no
loading overlay covers them while it is asked (Chromium's network emulation adds the latency). Both apps: the
article's (a tiny model) and the any-model app on a classifier of third-party blocks (found by tracing)."""

import os

import pytest

from vggattn import app
from test_browser import CHROMIUM, click_image_at

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("Chromium not installed (apt-get install -y chromium); CI always runs this test", allow_module_level=True)

from server import free_port, running_app  # noqa: E402

LATENCY_MS = 300
# what Gradio puts over a component while one of its events runs
OVERLAY = ".wrap.translucent, .wrap.pending, .wrap.generating, .eta-bar, .progress-text"


def third_party_app():
    pytest.importorskip("mmcv.cnn", reason="mmcv-lite is a test-only extra (requirements.txt pins it)")
    pytest.importorskip("diffusers", reason="diffusers is a test-only extra (requirements.txt pins it)")
    import byo_models
    from vggattn.models.byo import describe

    model = byo_models.third_party()
    return app.build_demo(model, describe("byo_models:third_party", 64, [f"c{i}" for i in range(10)]))


def click_under_latency(browser, url: str, panels: int) -> dict:
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    try:
        page.goto(url)
        page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
        page.locator("#input-image input[type=file]").set_input_files(str(app.HERE / "assets" / "church.jpg"))
        page.wait_for_function("document.querySelector('#status').innerText.includes('Analysed') || "
                               "document.querySelector('#status').innerText.includes('each of the')", timeout=120_000)
        page.wait_for_function("window.vggattnHover && window.vggattnHover.state().layers > 0", timeout=60_000)
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": LATENCY_MS,
                                                      "downloadThroughput": -1, "uploadThroughput": -1})
        img = page.locator("#input-image img").first
        page.evaluate("window.__seen = []")
        click_image_at(img, 0.3, 0.6)
        watch = f"""() => {{
            const shown = (e, root) => {{  // drawn on screen: every ancestor up to the panel visible and opaque
                for (let a = e; a && a !== root.parentElement; a = a.parentElement) {{
                    const s = getComputedStyle(a);
                    if (s.display === 'none' || s.visibility === 'hidden' || parseFloat(s.opacity) < 0.05) return false;
                }}
                const r = e.getBoundingClientRect();
                return r.width > 0 && r.height > 0;
            }};
            const overlays = [];
            for (let i = 0; i < {panels}; i++) {{
                const p = document.querySelector('#panel-' + i);
                if (p && [...p.querySelectorAll('{OVERLAY}')].some((e) => shown(e, p))) overlays.push(i);
            }}
            window.__seen.push([performance.now(), overlays.length]);
            return document.querySelector('#status').innerText.includes('Pinned');
        }}"""
        page.wait_for_function(watch, polling=10, timeout=60_000)
        seen = page.evaluate("window.__seen")
        pins = page.evaluate("window.vggattnHover.pins.slice()")
        return {"seen": seen, "pins": pins}
    finally:
        page.close()


def check(result):
    assert result["pins"] and result["pins"][-1] < LATENCY_MS, result["pins"]  # drawn before any answer could come
    polls = result["seen"]
    assert len(polls) >= 5, polls  # the page was watched while the server was asked (at least 2 x 300 ms)
    assert not [p for p in polls if p[1]], polls  # no overlay on any panel at any poll


def test_the_articles_app_pins_without_an_overlay(browser):
    with running_app() as url:
        check(click_under_latency(browser, url, 3))


def test_the_any_model_app_pins_without_an_overlay(browser):
    demo = third_party_app()
    port = free_port()
    app.serve(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        check(click_under_latency(browser, f"http://127.0.0.1:{port}/", 5))
    finally:
        demo.close()
