"""Under load: simulated users uploading photos and clicking, against the app in its own process.

    python bench/load.py [--users 32] [--seconds 120] [--session-ttl 30]

Starts `app.py` (the shipped checkpoint, its bounded queue) on 127.0.0.1 and drives it with
--users gradio_client clients, each its own session, each in a loop for --seconds: upload a
different val photo (`/upload`: the model runs, the hover payload comes back) and pin three points
of it (`/pin`, what a click does). Reports errors, p50/p95 latency of each call, analyses per second,
and the server's RSS at start, its peak, at the end, and after the sessions expired (--session-ttl,
short here so the run can see it; the app's default is an hour). The clients run in this process,
so on a 2-core machine they take CPU from the server too.
"""

import argparse
import os
import random
import subprocess
import sys
import threading
import time

from common import ROOT, percentile, report

from gradio_client import Client, handle_file

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def connect(url: str, timeout: float = 120) -> Client:
    deadline = time.time() + timeout
    while True:
        try:
            return Client(url, verbose=False)
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


def user(url: str, photos: list, seconds: float, rng: random.Random, log: list, lock: threading.Lock):
    client = connect(url)
    # what the page runs after an upload: the open tab's maps (an app that draws them in /upload has no /open_tab)
    tab = [("open tab", lambda: client.predict(0.8, "inferno", "smooth", api_name="/open_tab"))] \
        if "/open_tab" in client.view_api(print_info=False, return_format="dict")["named_endpoints"] else []
    stop = time.time() + seconds
    k = 0
    while time.time() < stop:
        photo = photos[k % len(photos)]
        k += 1
        for kind, call in [("upload", lambda: client.predict(handle_file(str(photo)), api_name="/upload"))] + tab + \
                          [("click", lambda: client.predict(rng.randrange(224), rng.randrange(224), api_name="/pin"))] * 3:
            t0 = time.perf_counter()
            try:
                call()
                ok, err = True, ""
            except Exception as e:  # an error is a result here: counted and shown
                ok, err = False, f"{type(e).__name__}: {e}"[:200]
            with lock:
                log.append((kind, time.perf_counter() - t0, ok, err, time.time()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--session-ttl", type=int, default=30)
    p.add_argument("--port", type=int, default=7893)
    args = p.parse_args()
    val = ROOT.parent / "shared" / "data" / "imagenette2-224" / "val"
    photos = sorted(val.glob("*/*.JPEG")) or sorted((ROOT / "assets").glob("*.jpg"))
    rng = random.Random(0)
    rng.shuffle(photos)
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(args.port), "--session-ttl",
                               str(args.session_ttl)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{args.port}/"
    try:
        connect(url)
        time.sleep(2)
        start = rss_mb(server.pid)
        peak, stopped = [start], threading.Event()

        def sample():
            while not stopped.is_set():
                peak.append(rss_mb(server.pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log, lock = [], threading.Lock()
        t0 = time.time()
        users = [threading.Thread(target=user, args=(url, photos[i::args.users], args.seconds, random.Random(i), log, lock))
                 for i in range(args.users)]
        for u in users:
            u.start()
        for u in users:
            u.join()
        wall = time.time() - t0
        stopped.set()
        end = rss_mb(server.pid)
        time.sleep(args.session_ttl + 15)  # expired states are deleted every second by Gradio
        expired = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = []
    for kind in ("upload", "open tab", "click"):
        xs = [t for k, t, ok, _, _ in log if k == kind and ok]
        if kind == "open tab" and not xs and not any(k == kind for k, *_ in log):
            continue  # an app without /open_tab (its upload draws the maps)
        errors = sum(1 for k, _, ok, _, _ in log if k == kind and not ok)
        rows.append([kind, len(xs), errors, round(percentile(xs, 50), 2) if xs else "-",
                     round(percentile(xs, 95), 2) if xs else "-", round(len(xs) / wall, 2)])
    problems = sorted({e for *_, ok, e, _ in log if not ok})
    report(f"Load: {args.users} users for {args.seconds:.0f} s (gradio_client, each its own session), shipped model",
           ["call", "done", "errors", "p50 s", "p95 s", "per second"], rows,
           [f"Server RSS: {start:.0f} MB at start, peak {max(peak):.0f} MB, {end:.0f} MB at the end, "
            f"{expired:.0f} MB {args.session_ttl + 15} s later (sessions expire after {args.session_ttl} s). "
            f"Wall time {wall:.0f} s.", *(f"Error: {e}" for e in problems[:10])])


if __name__ == "__main__":
    main()
