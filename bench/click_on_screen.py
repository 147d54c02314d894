"""A click's pinned panels as the screen shows them, with 0 and with 300 ms of emulated network latency.

    python bench/click_on_screen.py [--clicks 15] [--latency 0 300] [--models article zoo botnet] [--root DIR]
    python bench/click_on_screen.py --uploads 7 --clicks 0 --latency 0     # the page's upload round trip

Each model's app runs as `python -m vggattn.app ...` from --root (default: this checkout; another checkout gives
the "before" side), Chromium (Playwright, /usr/bin/chromium) opens it at 1440x900 and uploads the church photo.
Per click: the pointer rests on a random pixel (the page's panels follow it), then clicks there; screenshots of
the panels are taken back to back from the click on, until the status names the clicked pixel and no Gradio
event is pending; then one more screenshot is the settled view. A click's time on screen is when the first
screenshot that already shows the settled view was started, provided every later one shows it too (a loading
overlay between them counts as not shown). Chromium's network emulation adds the latency to every request.
Models: the article's default checkpoint, the shipped non-local ResNet, timm's botnet26t_256 (random weights).
--uploads N: also N uploads per model (two photos of different sizes in turn), each timed from the file given to the page until the
page holds the new image's payload and the status names its size, beside the model's forward timed in this process
(interleaved with the uploads; the page's round trip includes the transfer, the server's work and the page's).
"""

import argparse
import io
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import ROOT, machine, percentile

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
PHOTO = ROOT / "assets" / "church.jpg"
MODELS = {
    "article": [],
    "zoo": ["--model", "vggattn.models.zoo:nonlocal_resnet", "--checkpoint",
            str(ROOT / "checkpoints" / "nonlocal-resnet-imagenette-128.safetensors")],
    "botnet": ["--timm", "botnet26t_256"],
}
SETTLED = """() => {
    const busy = document.querySelectorAll('.wrap.translucent, .wrap.pending, .wrap.generating, .eta-bar');
    window.__idle = busy.length ? 0 : (window.__idle || 0) + 1;
    return window.__idle >= 2; }"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(root: Path, args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vggattn.app", *args, "--port", str(port), "--device", "cpu"],
                            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    import urllib.request

    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"the app exited ({proc.returncode}) for {args}")
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the app did not start")


def shot(page, clip) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.screenshot(clip=clip, animations="allow"))).convert("RGB"))


def click_times(page, clicks: int, latency: int, rng: random.Random) -> list[tuple[float, float]]:
    """Per click: (ms to the settled view on screen, ms a screenshot took)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": latency, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    img = page.locator("#input-image img").first
    box = img.bounding_box()
    panels = [page.locator(f"#panel-{i}").bounding_box() for i in range(3) if page.locator(f"#panel-{i}").count()]
    x0, y0 = min(b["x"] for b in panels), min(b["y"] for b in panels)
    x1, y1 = max(b["x"] + b["width"] for b in panels), max(b["y"] + b["height"] for b in panels)
    clip = {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0}
    out = []
    for _ in range(clicks):
        fx, fy = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85)
        px, py = box["x"] + fx * box["width"], box["y"] + fy * box["height"]
        page.mouse.move(px, py)
        page.wait_for_timeout(150)  # the hover view has drawn this point
        page.wait_for_function(SETTLED, polling=50, timeout=60_000)
        before = page.evaluate("document.querySelector('#status').innerText")
        shots = []
        t0 = time.perf_counter()
        page.mouse.click(px, py)
        while True:
            start = time.perf_counter()
            shots.append((start - t0, shot(page, clip), time.perf_counter() - start))
            status = page.evaluate("document.querySelector('#status').innerText")
            if status != before and "Pinned" in status and page.evaluate(SETTLED):
                break
            if start - t0 > 30:
                raise RuntimeError("no answer to a click in 30 s")
        page.wait_for_function(SETTLED, polling=50, timeout=60_000)
        settled = shot(page, clip)
        first = len(shots)
        for i in range(len(shots) - 1, -1, -1):  # the earliest from which every screenshot shows the settled view
            if np.abs(shots[i][1].astype(int) - settled).max() > 8:
                break
            first = i
        took = float(np.median([s[2] for s in shots])) * 1000
        out.append(((shots[first][0] if first < len(shots) else shots[-1][0] + shots[-1][2]) * 1000, took))
        page.mouse.move(5, 5)
    return out


def forward_timer(name: str):
    """A function timing one forward of the model the app serves (this process, the church photo)."""
    import torch

    from vggattn.models.byo import load_model, load_timm
    from vggattn.models.checkpoint import load_checkpoint
    from vggattn.data import eval_transform

    if name == "article":
        model, meta = load_checkpoint(device="cpu")
    elif name == "zoo":
        model, meta = load_model("vggattn.models.zoo:nonlocal_resnet", MODELS["zoo"][3])
    else:
        model, meta = load_timm("botnet26t_256")
    x = eval_transform(meta)(Image.open(PHOTO).convert("RGB")).unsqueeze(0)

    def timed() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model(x)
        return time.perf_counter() - t
    return timed


def upload_times(page, uploads: int, forward) -> tuple[list[float], list[float]]:
    """Per upload: ms from the file given to the page until the page has the image's payload; and one forward."""
    import tempfile

    other = Path(tempfile.mkdtemp()) / "springer-300x200.jpg"  # another size: its status line tells it apart
    Image.open(ROOT / "assets" / "springer.jpg").resize((300, 200)).save(other, quality=92)
    photos = [PHOTO, other]
    up, fw = [], []
    for i in range(uploads):
        photo = photos[(i + 1) % 2]
        w, h = Image.open(photo).size
        t0 = time.perf_counter()
        page.locator("#input-image input[type=file]").set_input_files(str(photo))
        page.wait_for_function("(s) => document.querySelector('#status').innerText.includes(s) && "
                               "window.vggattnHover && window.vggattnHover.state().layers > 0",
                               arg=f"{w}×{h}", polling=10, timeout=120_000)
        up.append((time.perf_counter() - t0) * 1000)
        page.wait_for_function(SETTLED, polling=50, timeout=60_000)
        fw.append(forward() * 1000)
    return up, fw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clicks", type=int, default=15, help="clicks per model and latency")
    p.add_argument("--latency", type=int, nargs="+", default=[0, 300], help="emulated latencies, ms")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="which apps")
    p.add_argument("--root", default=str(ROOT), help="the checkout whose app runs (another one: the 'before' side)")
    p.add_argument("--uploads", type=int, default=0, help="also time this many uploads per model (latency 0 only)")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    rng = random.Random(0)
    print(f"# {machine()}; app from {args.root}")
    print("| model | latency ms | clicks | on screen p50 ms | p90 ms | max ms | a screenshot ms |")
    print("|---|---|---|---|---|---|---|")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        for name in args.models:
            proc, url = start_app(Path(args.root), MODELS[name])
            try:
                for latency in args.latency:
                    page = browser.new_page(viewport={"width": 1440, "height": 900})
                    page.goto(url)
                    page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
                    page.locator("#input-image input[type=file]").set_input_files(str(PHOTO))
                    page.wait_for_function("window.vggattnHover && window.vggattnHover.state().layers > 0",
                                           timeout=120_000)
                    page.wait_for_function(SETTLED, polling=50, timeout=60_000)
                    if args.uploads and latency == 0:
                        up, fw = upload_times(page, args.uploads, forward_timer(name))
                        print(f"| {name} | upload round trip p50 {percentile(up, 50):.0f} ms (p90 {percentile(up, 90):.0f}) "
                              f"| forward p50 {percentile(fw, 50):.0f} ms | x{percentile(up, 50) / percentile(fw, 50):.2f} |",
                              flush=True)
                    if args.clicks:
                        times = click_times(page, args.clicks, latency, rng)
                        ms = [t for t, _ in times]
                        print(f"| {name} | {latency} | {len(ms)} | {percentile(ms, 50):.0f} | {percentile(ms, 90):.0f} | "
                              f"{max(ms):.0f} | {np.median([s for _, s in times]):.0f} |", flush=True)
                    page.close()
            finally:
                proc.kill()
                proc.wait()
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
