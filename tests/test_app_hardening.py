"""The running app under bad input, many users and floods (gradio_client against 127.0.0.1)."""

import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

from vggattn import app
from conftest import ROOT, tiny_meta, tiny_model
from server import running_app
from test_images import png_declaring
from vggattn import query_index

GOOD = str(app.HERE / "assets" / "church.jpg")


@pytest.fixture(scope="module")
def url():
    with running_app() as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


def bad_files(d):
    rgb = Image.fromarray((np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8))
    rgb.save(d / "full.jpg", quality=90)
    files = {
        "empty.jpg": (b"", "empty"),
        "text.jpg": (b"just some text\n" * 20, "not an image in a supported format"),
        "cut.jpg": ((d / "full.jpg").read_bytes()[:3000], "truncated or corrupt"),
        "bomb.png": (png_declaring(30000, 30000), "too large"),
        "vector.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "not an image in a supported format"),
        "figure.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n%%EOF\n", "not an image in a supported format"),
    }
    for name, (data, _) in files.items():
        (d / name).write_bytes(data)
    return {name: words for name, (_, words) in files.items()}


def test_bad_images_get_one_sentence_and_the_next_request_works(client, tmp_path):
    for name, words in bad_files(tmp_path).items():
        with pytest.raises(Exception) as e:
            client.predict(handle_file(str(tmp_path / name)), api_name="/analyze")
        msg = str(e.value)
        assert words in msg, (name, msg)
        assert "Traceback" not in msg and msg.count("\n") == 0, msg
        labels, gammas = client.predict(handle_file(GOOD), api_name="/analyze")
        assert len(labels["confidences"]) == 5


def odd_images(d):
    rng = np.random.default_rng(2)
    rgb = Image.fromarray((rng.random((60, 90, 3)) * 255).astype(np.uint8))
    rgb.convert("L").save(d / "grey.png")
    rgb.convert("RGBA").save(d / "rgba.png")
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.random((60, 90)) * 65535).astype(np.uint16)).save(d / "sixteen.png")
    rgb.convert("P").save(d / "palette.png", transparency=0)
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "dot.png")
    Image.new("RGB", (8000, 6000), (90, 120, 30)).save(d / "huge.jpg", quality=40)
    return ["grey.png", "rgba.png", "cmyk.jpg", "sixteen.png", "palette.png", "anim.gif", "dot.png", "huge.jpg"]


def test_odd_but_valid_images_work(client, tmp_path):
    for name in odd_images(tmp_path):
        labels, gammas = client.predict(handle_file(str(tmp_path / name)), api_name="/analyze")
        assert len(labels["confidences"]) == 5 and len(gammas) == 3, name


def test_exif_rotated_photo_lines_up_with_the_picture_as_displayed(client, tmp_path):
    stored = np.zeros((60, 120, 3), np.uint8)
    stored[:, :30] = 255  # bright band on the left as stored; on top as displayed (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    x, y = 10, 110  # displayed coordinates of a portrait 60 x 120 picture: near the bottom left
    *paths, info = client.predict(handle_file(str(tmp_path / "rot.jpg")), x, y, api_name="/attention_at")
    overlay = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert overlay.shape[:2] == (120, 60)  # drawn on the picture as displayed (portrait)
    for layer in info:
        assert layer["query_index"] == query_index((x, y), (60, 120), tuple(layer["grid"]))
    with pytest.raises(Exception, match="outside"):
        client.predict(handle_file(str(tmp_path / "rot.jpg")), 100, 10, api_name="/attention_at")  # x=100 > width 60


def distinct_images(d, n):
    paths = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        w, h = 64 + 16 * i, 96 - 4 * i
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(d / f"user{i}.png")
        paths.append(str(d / f"user{i}.png"))
    return paths


def call(cl, kind, path, k):
    if kind == "analyze":
        labels, gammas = cl.predict(handle_file(path), api_name="/analyze")
        return labels, gammas
    x, y = 7 * k + 3, 5 * k + 1
    *paths, info = cl.predict(handle_file(path), x, y, api_name="/attention_at")
    return info, [np.asarray(Image.open(p)).tobytes() for p in paths]


def test_eight_users_at_once_get_their_own_answers(url, tmp_path):
    images = distinct_images(tmp_path, 8)
    plan = [[("analyze" if (u + k) % 2 else "attention_at", k) for k in range(6)] for u in range(8)]  # 3 of each
    solo = Client(url, verbose=False)
    expected = {(u, k): call(solo, kind, images[u], k) for u in range(8) for kind, k in plan[u]}

    def user(u):
        cl = Client(url, verbose=False)
        return {(u, k): call(cl, kind, images[u], k) for kind, k in plan[u]}

    with ThreadPoolExecutor(8) as pool:
        results = {}
        for r in pool.map(user, range(8)):
            results.update(r)
    assert len(results) == 48
    for key, value in expected.items():
        assert results[key] == value, key


class Slow(torch.nn.Module):
    """A tiny attention model that takes 0.4 s per forward, to fill the queue."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()

    def forward(self, x):
        time.sleep(0.4)
        return self.inner(x)


def test_a_flood_past_the_queue_gets_queue_full_not_a_hang():
    demo = app.build_demo(Slow().eval(), tiny_meta(input_size=64))
    from server import free_port

    port = free_port()
    app.serve(demo, port=port, prevent_thread_lock=True, quiet=True, concurrency=1, queue_size=2)
    try:
        url = f"http://127.0.0.1:{port}/"
        clients = [Client(url, verbose=False) for _ in range(10)]
        outcomes = []

        def one(cl):
            try:
                cl.predict(handle_file(GOOD), api_name="/analyze")
                outcomes.append("ok")
            except Exception as e:
                outcomes.append(str(e))

        threads = [threading.Thread(target=one, args=(cl,)) for cl in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a request hung"
        full = [o for o in outcomes if o != "ok"]
        assert outcomes.count("ok") >= 1 and full, outcomes
        assert all(re.search("queue is full", o, re.I) for o in full), full
        assert len(clients[0].predict(handle_file(GOOD), api_name="/analyze")[0]["confidences"]) == 5
    finally:
        demo.close()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def test_memory_does_not_grow_over_200_requests(url, tmp_path):
    """The server's RSS (this process) over 200 requests from two clients at once (the app's concurrency; the files
    it answers with are made and cached as for any client, not downloaded)."""
    path = distinct_images(tmp_path, 1)[0]
    clients = [Client(url, verbose=False, download_files=False) for _ in range(2)]

    def request(i):
        cl = clients[i % 2]
        return cl.predict(handle_file(path), i % 60, i % 90, api_name="/attention_at") if i % 4 < 2 else \
            cl.predict(handle_file(path), api_name="/analyze")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: clients[i % 2].predict(handle_file(path), 5, 5, api_name="/attention_at"),
                      range(30)))  # warm up caches and allocators
        before = rss_mb()
        list(pool.map(request, range(200)))
    growth = rss_mb() - before
    print(f"RSS growth over 200 requests: {growth:.1f} MB")
    assert growth < 60, f"RSS grew {growth:.1f} MB over 200 requests"


def test_app_with_a_bad_checkpoint_exits_with_one_sentence(tmp_path):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"\x80\x04not really a pickle")
    proc = subprocess.run([sys.executable, "app.py", "--checkpoint", str(bad), "--port", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert err.startswith("error: cannot load the model") and "Traceback" not in err and err.count("\n") == 0, err
