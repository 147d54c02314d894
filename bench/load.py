"""Under load: simulated users uploading photos and clicking, against the app in its own process.

    python bench/load.py [--users 32] [--seconds 120] [--session-ttl 30] [--client http|gradio_client]
    python bench/load.py --root /tmp/before     # the app of another checkout (a worktree), same clients

Starts `app.py` (the shipped checkpoint, its bounded queue) on 127.0.0.1 and drives it with
--users gradio_client clients, each its own session, each in a loop for --seconds: upload a
different val photo (`/upload`: the model runs, the hover payload comes back) and pin three points
of it (`/pin`, what a click does). Reports errors, p50/p95 latency of each call, analyses per second,
and the server's RSS at start, its peak, at the end, and after the sessions expired (--session-ttl,
short here so the run can see it; the app's default is an hour). The clients run in this process,
so on a 2-core machine they take CPU from the server too; the report says how much CPU time each side
used per upload cycle (the server's is what a deployment pays; the clients' is this benchmark's).

--client http (default): each user does what the page does, over plain HTTP with one keep-alive
connection: upload the file, join the queue, read the session's event stream, and fetch every file the
outputs name (as the browser does), without decoding anything. --client gradio_client: the same calls
through gradio_client, which costs this process about as much CPU as the server (JSON-decodes every
payload, downloads output files to disk, a heartbeat thread and new connections per call): with it the
2 cores measure the client as much as the server.
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
import uuid

import httpx

from common import ROOT, percentile, report

from gradio_client import Client, handle_file

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class PageClient:
    """One user as the page talks to the app: a session, the queue's join and event stream, and a GET of
    every file an output names. predict(*data, api_name=...) -> the outputs, as gradio_client's."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=600)
        config = self.http.get("config").raise_for_status().json()
        self.prefix = config.get("api_prefix", "/gradio_api").rstrip("/")
        self.fn = {f"/{d['api_name']}": d["id"] for d in config["dependencies"] if d.get("api_name")}
        components = {c["id"]: c for c in config["components"]}
        # each endpoint's inputs: None for a State (the server holds its value), else the component's default
        # (what gradio_client sends for parameters not given)
        self.inputs = {f"/{d['api_name']}": [(components[i]["type"] == "state", components[i].get("props", {}).get("value"))
                                             for i in d["inputs"]]
                       for d in config["dependencies"] if d.get("api_name")}
        # the page's click carries whether its script drew the pin (apps since the page draws pins; else None)
        self.page_draws = next((j for d in config["dependencies"] if d.get("api_name") == "click"
                                for j, i in enumerate(d["inputs"])
                                if components[i].get("props", {}).get("elem_id") == "page-draws"), None)
        self.session = uuid.uuid4().hex

    def named_endpoints(self) -> set:
        return set(self.fn)

    def upload(self, path: str) -> dict:
        with open(path, "rb") as f:
            r = self.http.post(f"{self.prefix}/upload", files={"files": (os.path.basename(path), f)})
        return {"path": r.raise_for_status().json()[0], "orig_name": os.path.basename(path),
                "meta": {"_type": "gradio.FileData"}}

    def click(self, x: int, y: int):
        """What a click on the image sends from a page whose script drew the pin (the app's default controls)."""
        data = [None if is_state else default for is_state, default in self.inputs["/click"]]
        data[self.page_draws] = True
        return self.predict(api_name="/click", data=data, event_data={"index": [x, y], "value": None, "selected": True})

    def predict(self, *given, api_name: str, data: list | None = None, event_data: dict | None = None):
        if data is None:
            given, data = list(given), []
            for is_state, default in self.inputs[api_name]:
                data.append(None if is_state else given.pop(0) if given else default)
        r = self.http.post(f"{self.prefix}/queue/join", json={"data": data, "fn_index": self.fn[api_name],
                                                              "session_hash": self.session, "event_data": event_data,
                                                              "trigger_id": None})
        if r.status_code == 503:
            raise RuntimeError("queue full")
        event = r.raise_for_status().json()["event_id"]
        output = None
        with self.http.stream("GET", f"{self.prefix}/queue/data", params={"session_hash": self.session}) as resp:
            buffer, seen = b"", 0
            for chunk in resp.iter_bytes():
                buffer += chunk
                while (end := buffer.find(b"\n\n", seen)) >= 0:
                    line, buffer, seen = buffer[:end], buffer[end + 2:], 0
                    if not line.startswith(b"data:"):
                        continue
                    msg = json.loads(line[5:])
                    if msg.get("event_id") == event and msg.get("msg") == "process_completed":
                        if not msg.get("success"):
                            raise RuntimeError(str(msg.get("output", msg))[:200])
                        output = msg["output"]["data"]
                        break
                else:
                    seen = max(0, len(buffer) - 1)
                    continue
                break
        if output is None:
            raise RuntimeError(f"the stream ended before {api_name} completed")
        for url in file_urls(output):  # what the browser fetches to show the outputs
            self.http.get(url).raise_for_status()
        return output


def file_urls(value) -> list[str]:
    if isinstance(value, dict):
        if value.get("url") and value.get("path"):
            return [value["url"]]
        return [u for v in value.values() for u in file_urls(v)]
    if isinstance(value, (list, tuple)):
        return [u for v in value for u in file_urls(v)]
    return []


class GradioClient:
    """The same calls through gradio_client."""

    def __init__(self, url: str):
        self.client = Client(url, verbose=False)

    def named_endpoints(self) -> set:
        return set(self.client.view_api(print_info=False, return_format="dict")["named_endpoints"])

    def upload(self, path: str):
        return handle_file(path)

    def predict(self, *data, api_name: str):
        return self.client.predict(*data, api_name=api_name)


def connect(url: str, timeout: float = 120, kind: str = "gradio_client"):
    deadline = time.time() + timeout
    while True:
        try:
            return PageClient(url) if kind == "http" else GradioClient(url)
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(1)


def user(url: str, photos: list, seconds: float, rng: random.Random, log: list, lock: threading.Lock,
         kind: str = "http"):
    client = connect(url, kind=kind)
    # what the page runs after an upload: the open tab's maps (an app that draws them in /upload has no /open_tab)
    tab = [("open tab", lambda: client.predict(0.8, "inferno", "smooth", api_name="/open_tab"))] \
        if "/open_tab" in client.named_endpoints() else []
    # a click: as the page sends it where the app lets the page draw pins, else /pin (renders the pictures)
    if getattr(client, "page_draws", None) is not None:
        click = lambda: client.click(rng.randrange(224), rng.randrange(224))  # noqa: E731
    else:
        click = lambda: client.predict(rng.randrange(224), rng.randrange(224), api_name="/pin")  # noqa: E731
    stop = time.time() + seconds
    k = 0
    while time.time() < stop:
        photo = photos[k % len(photos)]
        k += 1
        for step, call in [("upload", lambda: client.predict(client.upload(str(photo)), api_name="/upload"))] + tab + \
                          [("click", click)] * 3:
            t0 = time.perf_counter()
            try:
                call()
                ok, err = True, ""
            except Exception as e:  # an error is a result here: counted and shown
                ok, err = False, f"{type(e).__name__}: {e}"[:200]
            with lock:
                log.append((step, time.perf_counter() - t0, ok, err, time.time()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--session-ttl", type=int, default=30)
    p.add_argument("--port", type=int, default=7893)
    p.add_argument("--client", choices=("http", "gradio_client"), default="http", help="how the users talk to the app")
    p.add_argument("--root", default=str(ROOT), help="the checkout whose app.py to start (its vggattn first on the path)")
    p.add_argument("--app-args", default="", help="more arguments for app.py, e.g. '--concurrency 4'")
    args = p.parse_args()
    val = ROOT.parent / "shared" / "data" / "imagenette2-224" / "val"
    photos = sorted(val.glob("*/*.JPEG")) or sorted((ROOT / "assets").glob("*.jpg"))
    rng = random.Random(0)
    rng.shuffle(photos)
    env = {**os.environ, "PYTHONPATH": args.root, "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, os.path.join(args.root, "app.py"), "--port", str(args.port), "--session-ttl",
                               str(args.session_ttl), *args.app_args.split()], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{args.port}/"
    try:
        connect(url, kind="http")
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
        server_cpu, client_cpu = cpu_seconds(server.pid), own_cpu_seconds()
        users = [threading.Thread(target=user, args=(url, photos[i::args.users], args.seconds, random.Random(i), log, lock,
                                                      args.client))
                 for i in range(args.users)]
        for u in users:
            u.start()
        for u in users:
            u.join()
        wall = time.time() - t0
        server_cpu, client_cpu = cpu_seconds(server.pid) - server_cpu, own_cpu_seconds() - client_cpu
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
    cycles = max(1, sum(1 for k, *_ in log if k == "upload"))
    report(f"Load: {args.users} users for {args.seconds:.0f} s ({args.client} clients, each its own session), app of "
           f"{args.root}",
           ["call", "done", "errors", "p50 s", "p95 s", "per second"], rows,
           [f"Server RSS: {start:.0f} MB at start, peak {max(peak):.0f} MB, {end:.0f} MB at the end, "
            f"{expired:.0f} MB {args.session_ttl + 15} s later (sessions expire after {args.session_ttl} s). "
            f"Wall time {wall:.0f} s.",
            f"CPU time per upload cycle (upload, tab, 3 clicks; {cycles} cycles): server {server_cpu / cycles:.3f} s, "
            f"clients {client_cpu / cycles:.3f} s (in all: server {server_cpu:.0f} s, clients {client_cpu:.0f} s).",
            *(f"Error: {e}" for e in problems[:10])])


if __name__ == "__main__":
    main()
