"""A transformer's page at its real size, as the screen shows it: upload to every on-screen panel drawn, and hover.

    python bench/page_real_size.py [--uploads 5] [--moves 60] [--latency 0 300] [--case dinov2-s-reg4-518]

The app runs as `python -m vggattn.app --timm NAME --input-size S` (random weights, nothing fetched) and Chromium
(Playwright, /usr/bin/chromium, 1440x900) opens it. Per upload (the church photo and a 300x200 photo in turn, so
that each is a new image): screenshots of the window are taken back to back from the file given to the page until
the page holds the new image's payload, every panel on screen is drawn (deferred layers fetched) and no Gradio event
is pending; one more screenshot a second later is the settled view. The upload's time on screen is when the first
screenshot that already shows the settled view was started, every later one showing it too. Beside it, the model's
forward on the same photo in this process (median of 3, interleaved). With each latency (Chromium's network
emulation adds it to every request). Then, at latency 0, --moves pointer moves over the photo: per move, the page's
own work (`vggattnHover.latencies`: rows and tints of every on-screen panel, each drawn) and the time to the next
painted frame (`vggattnHover.frames`), p50 and p90, with the number of panels on screen.
Targets: upload on screen <= 3x the forward; hover's own work p50 <= 10 ms with 9 panels on screen.
"""

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from click_on_screen import CHROMIUM, FLAGS, PHOTO, SETTLED, start_app
from common import ROOT, machine, percentile

CASES = {"dinov2-s-reg4-518": ("vit_small_patch14_reg4_dinov2", 518), "vit-b16-224": ("vit_base_patch16_224", 224)}
READY = """([size, count]) => {
    const s = document.querySelector('#status'), h = window.vggattnHover;
    if (!s || !s.innerText.includes(size) || !h || h.state().layers < count) return false;
    return h.ready() && h.state().waiting === 0; }"""


def forward_timer(name: str, size: int):
    import torch

    from vggattn.models.byo import load_timm
    from vggattn.data import eval_transform, open_image

    model, meta = load_timm(name, pretrained=False, input_size=size)
    x = eval_transform(meta)(open_image(PHOTO)).unsqueeze(0)
    with torch.no_grad():
        model(x)

    def timed() -> float:
        out = []
        for _ in range(3):
            t = time.perf_counter()
            with torch.no_grad():
                model(x)
            out.append(time.perf_counter() - t)
        return statistics.median(out)
    return timed


def shot(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.screenshot(animations="allow"))).convert("RGB"))


def upload_on_screen(page, photo: Path, layers: int) -> tuple[float, float]:
    """(ms from the file given to the settled view on screen, ms a screenshot took)."""
    w, h = Image.open(photo).size
    shots = []
    t0 = time.perf_counter()
    page.locator("#input-image input[type=file]").set_input_files(str(photo))
    done = None
    while done is None or time.perf_counter() - done < 1.0:  # on, a second past the page saying it is drawn
        start = time.perf_counter()
        shots.append((start - t0, shot(page), time.perf_counter() - start))
        if done is None and page.evaluate(READY, [f"{w}×{h}", layers]) and page.evaluate(SETTLED):
            done = time.perf_counter()
        if start - t0 > 120:
            raise RuntimeError("the upload was not drawn in 120 s")
    settled = shots[-1][1]
    first = len(shots)
    for i in range(len(shots) - 1, -1, -1):
        if np.abs(shots[i][1].astype(int) - settled).max() > 8:
            break
        first = i
    return shots[first][0] * 1000, float(np.median([s[2] for s in shots])) * 1000


def hover(page, moves: int, photo: Path) -> tuple[list[float], list[float], list[float], int]:
    """Per move: (ms of the page's own work, the drawing's start to its end; ms from the event to the panels drawn;
    ms from the event to the next frame), and the panels on screen."""
    img = page.locator("#input-image img").first
    img.scroll_into_view_if_needed()
    box = img.bounding_box()  # the photo is letterboxed in it
    w, h = Image.open(photo).size
    s = min(box["width"] / w, box["height"] / h)
    box = {"x": box["x"] + (box["width"] - w * s) / 2, "y": box["y"] + (box["height"] - h * s) / 2,
           "width": w * s, "height": h * s}
    rng = np.random.default_rng(0)
    before, framed_before = page.evaluate("[window.vggattnHover.works.length, window.vggattnHover.frames.length]")
    made = 0
    for _ in range(moves):
        fx, fy = rng.uniform(0.1, 0.9, 2)
        page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        try:  # a move onto the pixel the pointer is on already draws nothing
            page.wait_for_function("(n) => window.vggattnHover.frames.length > n", arg=framed_before + made,
                                   timeout=5_000)
            made += 1
        except Exception:  # noqa: BLE001
            continue
    work, drawn, framed = page.evaluate("[window.vggattnHover.works, window.vggattnHover.latencies, "
                                        "window.vggattnHover.frames]")
    framed = framed[framed_before:]
    on = page.evaluate("""() => [...document.querySelectorAll('[id^=panel-]')].filter(p => {
        const r = p.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight && r.width > 0; }).length""")
    return work[before + 3:], drawn[before + 3:], framed[3:], on


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="dinov2-s-reg4-518", choices=list(CASES))
    p.add_argument("--uploads", type=int, default=5, help="uploads per latency")
    p.add_argument("--moves", type=int, default=60, help="pointer moves (latency 0)")
    p.add_argument("--latency", type=int, nargs="+", default=[0, 300], help="emulated latencies, ms")
    p.add_argument("--threads", type=int, default=0, help="the app's --threads (0: its default, the cores shared "
                   "among the events running)")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    name, size = CASES[args.case]
    forward = forward_timer(name, size)
    other = Path(tempfile.mkdtemp()) / "springer-300x200.jpg"
    Image.open(ROOT / "assets" / "springer.jpg").resize((300, 200)).save(other, quality=92)
    print(f"# {machine()}; {name} at {size} px, random weights; the app's threads: {args.threads or 'shared'}")
    print("| latency ms | uploads | on screen p50 ms | p90 ms | forward p50 ms | on screen / forward | a screenshot ms |")
    print("|---|---|---|---|---|---|---|")
    proc, url = start_app(ROOT, ["--timm", name, "--input-size", str(size)] +
                          (["--threads", str(args.threads)] if args.threads else []))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            for latency in args.latency:
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(url)
                page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
                page.locator("#input-image input[type=file]").set_input_files(str(other))
                page.wait_for_function("window.vggattnHover && window.vggattnHover.state().layers > 0", timeout=300_000)
                layers = page.evaluate("window.vggattnHover.state().layers")
                page.wait_for_function(SETTLED, polling=50, timeout=60_000)
                cdp = page.context.new_cdp_session(page)
                cdp.send("Network.enable")
                cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": latency,
                                                              "downloadThroughput": -1, "uploadThroughput": -1})
                up, took, fw = [], [], []
                for i in range(args.uploads):
                    ms, s = upload_on_screen(page, [PHOTO, other][i % 2], layers)
                    up.append(ms)
                    took.append(s)
                    fw.append(forward() * 1000)
                fetched = page.evaluate("window.vggattnHover.fetched")
                print(f"<!-- deferred layers: {len(fetched)} fetched, request to panel drawn p50 "
                      f"{percentile(fetched, 50):.0f} ms, p90 {percentile(fetched, 90):.0f} ms -->", flush=True)
                print(f"| {latency} | {len(up)} | {percentile(up, 50):.0f} | {percentile(up, 90):.0f} | "
                      f"{percentile(fw, 50):.0f} | {percentile(up, 50) / percentile(fw, 50):.1f}x | "
                      f"{np.median(took):.0f} |", flush=True)
                if latency == 0 and args.moves:
                    work, drawn, framed, on = hover(page, args.moves, [PHOTO, other][(args.uploads - 1) % 2])
                    print(f"\nhover, {len(work)} moves, {on} panels on screen: the page's own work p50 "
                          f"{percentile(work, 50):.1f} ms (p90 {percentile(work, 90):.1f}); from the event to the "
                          f"panels drawn p50 {percentile(drawn, 50):.1f} ms, to the next frame p50 "
                          f"{percentile(framed, 50):.1f} ms (p90 {percentile(framed, 90):.1f})\n", flush=True)
                page.close()
            browser.close()
    finally:
        proc.kill()
        proc.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
