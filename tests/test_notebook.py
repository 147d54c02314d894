"""`vggattn.show` in Jupyter: a notebook run with nbclient shows the widget; JupyterLab in Chromium runs the cell, and
the live view in its output follows the pointer (its own script, in the browser; nothing fetched from outside)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("anywidget", reason="the optional extra vggattn[notebook] (requirements.txt pins it)")
nbformat = pytest.importorskip("nbformat")

from conftest import CHROMIUM  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
CELL = (f"import vggattn\nw = vggattn.show({str(HERE / 'checkpoints' / 'vgg16att-imagenette-w025-128.safetensors')!r}, "
        f"{str(HERE / 'assets' / 'church.jpg')!r}, point=(60, 150))\nw")


def notebook(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_a_notebook_shows_the_widget_and_its_page(tmp_path):
    """nbclient runs `vggattn.show(...)`: the cell's output is a widget view, and its page pins the point given; with
    compare= the page is the A/B one."""
    from nbclient import NotebookClient

    church = repr(str(HERE / "assets" / "church.jpg"))
    path = notebook(tmp_path / "view.ipynb", [CELL, "print('first = [60, 150];' in w.html)",
                                              f"ab = vggattn.show(None, {church}, compare='reinit')\n"
                                              "print('B − A' in ab.html, 'side-b' in ab.html)",
                                              f"t = vggattn.show('hf:{HERE / 'checkpoints' / 'shapes-detector'}', "
                                              f"{str(HERE / 'assets' / 'shapes' / 'val-3.jpg')!r}, tokens=True)\n"
                                              "print('tokens-data' in t.html, '\"label\": \"query 0' in t.html)"])
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs
    assert nb.cells[1].outputs[0]["text"].strip() == "True"
    assert nb.cells[2].outputs[0]["text"].strip() == "True True"
    assert nb.cells[3].outputs[-1]["text"].strip().splitlines()[-1] == "True True"  # the detector's tokens page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                    reason="Chromium not installed (apt-get install -y chromium); CI always runs this")
def test_jupyterlab_runs_the_cell_and_the_view_follows_the_pointer(browser, tmp_path):
    """JupyterLab (a local server, no token) in Chromium: open the notebook, run its cell, and the widget's frame
    shows the live view with the point pinned; the pointer over its picture moves the rows; no page error."""
    (tmp_path / "nb").mkdir()
    notebook(tmp_path / "nb" / "view.ipynb", [CELL])
    port = free_port()
    lab_log = open(tmp_path / "jupyterlab.log", "w")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                               "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
                               f"--ServerApp.root_dir={tmp_path / 'nb'}", "--LabApp.news_url=", "--ServerApp.open_browser=False", "--allow-root",
                               "--LabApp.extension_manager=readonly", "--LanguageServerManager.autodetect=False"],
                              env=env, stdout=lab_log, stderr=subprocess.STDOUT)  # a file: a pipe nobody reads
    # fills and stops the server
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"http://127.0.0.1:{port}/lab/tree/view.ipynb", timeout=60_000)
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
        # the kernel started and idle before the cell runs (the status bar says so)
        page.get_by_text("Python 3 (ipykernel) | Idle").first.wait_for(timeout=120_000)
        frame_el = page.locator("iframe[title='vggattn live view']")
        for attempt in range(2):  # Run > Run All Cells, as a person would; once more if nothing came
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            try:
                frame_el.wait_for(timeout=120_000)
                break
            except Exception:
                (HERE / "artifacts").mkdir(exist_ok=True)
                page.screenshot(path=str(HERE / "artifacts" / f"jupyterlab-waiting-{attempt}.png"))
                if attempt:
                    raise
        frame = frame_el.element_handle().content_frame()
        frame.wait_for_function("window.vggattnHover && window.vggattnHover.ready() && "
                                "window.vggattnHover.state().pinned", timeout=60_000)
        assert frame.evaluate("window.vggattnHover.state().pinned") == [60, 150]
        picture = frame.locator("#input-image img")
        picture.scroll_into_view_if_needed()
        box = picture.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.25)
        frame.wait_for_function("window.vggattnHover.state().current !== null", timeout=10_000)
        x, y = frame.evaluate("window.vggattnHover.state().current")
        assert abs(x - 112) <= 2 and abs(y - 56) <= 2, (x, y)  # the 224x224 picture, wherever the frame puts it
        (HERE / "artifacts").mkdir(exist_ok=True)
        page.screenshot(path=str(HERE / "artifacts" / "jupyterlab.png"))
        assert not [e for e in errors if "vggattn" in e], errors
    except Exception:  # what the page showed, for the CI's artifacts
        (HERE / "artifacts").mkdir(exist_ok=True)
        for p in context.pages:
            p.screenshot(path=str(HERE / "artifacts" / "jupyterlab-failed.png"))
        print((tmp_path / "jupyterlab.log").read_text()[-4000:])  # the server's last words, in pytest's report
        raise
    finally:
        context.close()
        server.terminate()
        server.wait(timeout=30)
        lab_log.close()
