"""The app's page pieces (vggattn.app wires them): the controls and their initial values, the upload component,
the hover view, refusing and clamping a point, the Dataset tab's view, session memory and serving.
"""

from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from ..data import ImageLoadError, open_image
from ..view.hover import CONTROLS, WEB, page_props  # noqa: F401  (CONTROLS, WEB: app's)
from ..view.render import COLORMAPS, LOG_DECADES, SCALES, UPSAMPLING
from ..study.report import figures as study_figures, missing_study_markdown, summary_markdown

HERE = Path(__file__).resolve().parents[2]  # the checkout (assets/); an installed package has no examples
EXAMPLES = sorted(str(p) for p in (HERE / "assets").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
# The views' tabs (gr.Tabs(overflow_behavior="wrap"): their buttons wrap onto more rows where they do not fit, none in
# a "..." menu) in the place Gradio's menu kind gives them: a row 4 px above its box, 8 px less below it. At a phone's
# width (a media query: the desktop's layout is untouched) the views' tables break their lines between words, not
# inside them ("large/st"), and scroll sideways in their box where they are still wider than the screen; a command
# line wraps; a file's size and link stay in its box; a picture's label leaves room for its buttons (wraps, not under)
PHONE_WIDTH = 640  # px
VIEWS_CSS = ("#views > .tab-wrapper { margin-top: -4px; padding-bottom: 4px; }"
             f" @media (max-width: {PHONE_WIDTH}px) {{"
             " #views .md table { display: block; overflow-x: auto; word-break: normal; overflow-wrap: normal; padding: 0; }"
             " #views .md th, #views .md td { padding: 6px; font-size: var(--text-sm); }"
             " #views .md pre, #views .md pre code { white-space: pre-wrap; overflow-wrap: anywhere; }"
             " .file-preview .download { min-width: 0; width: auto; }"
             " .file-preview .filename .stem { white-space: normal; overflow-wrap: anywhere; }"
             " label[data-testid='block-label'].float { max-width: calc(100% - 84px); } }")
STATE_SESSIONS = 500  # sessions whose analysis is kept (least recently used beyond this are dropped)
# The controls reach the page's script without a request
CONTROLS_JS = ("(opacity, colormap, mode, mark, scale) => { if (window.vggattnHover) "
               "window.vggattnHover.setControls({opacity, colormap, mode, mark, scale}); }")
# An upload: the page drops its copy of the old image's maps before the request goes (the server marks them stale)
UPLOAD_JS = "(...inputs) => { if (window.vggattnHover) window.vggattnHover.load(null); return inputs; }"
# A click's last input: whether the page's script has drawn this pin (then the server draws no pictures)
PIN_JS = ("(...inputs) => { const h = window.vggattnHover; "
          "inputs[inputs.length - 1] = !!(h && h.drawsPins && h.drawsPins()); return inputs; }")


class UploadedImage(gr.Image):
    """gr.Image that hands handlers the uploaded file's path untouched, so vggattn.open_image (format
    allowlist, size limit, clear errors) is the only code that decodes what a user sent."""

    is_template = True  # render with gr.Image's frontend

    def preprocess(self, payload):
        return None if payload is None else str(payload.path)


def load_upload(path: str | None) -> Image.Image:
    if not path:
        raise gr.Error("Please upload an image first.")
    try:
        return open_image(path)
    except ImageLoadError as e:
        raise gr.Error(str(e)) from None


TRIM_GROWTH = 64 << 20  # bytes the process may grow by before freed heap pages are handed back
_resident_after_trim = [0]


def resident_bytes() -> int | None:
    """The process's resident memory (Linux's /proc/self/statm), or None where there is none to read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_CORES = {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
          "fixed": 0, "running": 0}
_CORES_LOCK = threading.Lock()


def fix_threads(threads: int) -> None:
    """`--threads N`: every forward gets N PyTorch threads, however many run (0: share the cores, `sharing_cores`)."""
    _CORES["fixed"] = threads
    if threads:
        torch.set_num_threads(threads)


@contextmanager
def sharing_cores():
    """Around an event that runs the model: the cores divided among the events running now (PyTorch's threads are
    the process's): a lone upload gets every core, two at once half each, so neither oversubscribes them."""
    with _CORES_LOCK:
        _CORES["running"] += 1
        if not _CORES["fixed"]:
            torch.set_num_threads(max(1, _CORES["cores"] // _CORES["running"]))
    try:
        yield
    finally:
        with _CORES_LOCK:
            _CORES["running"] -= 1


def release_memory() -> None:
    """Hand freed heap pages back to the OS after an analysis (glibc keeps them otherwise: under concurrent uploads
    the server's RSS then stays at its peak; bench/README.md, load run), once the process has grown by TRIM_GROWTH
    since the last time: the pages handed back are faulted in again by the next forward (1.5 ms of a 10 ms one),
    which a small model's upload need not pay."""
    rss = resident_bytes()
    if rss is not None and rss - _resident_after_trim[0] < TRIM_GROWTH:
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return
    _resident_after_trim[0] = resident_bytes() or 0


def click_problem(state) -> str | None:
    if state is None:
        return "Upload an image (or pick an example) first."
    if getattr(state, "stale", False):
        return "The new image is still being analysed; try again in a moment."
    return None


def unchanged(components) -> dict:
    return {c: gr.update() for c in components}


def pinned_point(state, point) -> tuple[int, int] | None:
    """The pinned point if it belongs to this image (inside it), else None."""
    if click_problem(state) or point is None:
        return None
    x, y = point
    w, h = state.size
    return (int(x), int(y)) if 0 <= x < w and 0 <= y < h else None


def refused_point(ui, state, outputs: list) -> dict | None:
    """A click before (or while) an image is analysed: a warning and a line, the point dropped; else None."""
    problem = click_problem(state)
    if not problem:
        return None
    gr.Warning(problem)
    return {**unchanged(outputs), ui.point: None, ui.status: problem}


def clamped_point(state, x, y) -> tuple[int, int]:
    """(x, y) as whole pixels inside the image; one clear error when a coordinate is missing."""
    if x is None or y is None:
        raise gr.Error("Give the point as two numbers, x and y, in pixels of the image.")
    w, h = state.size
    return min(max(int(x), 0), w - 1), min(max(int(y), 0), h - 1)


def study_view(study: dict | None, checkpoint: str | None):
    """The Dataset tab's markdown and figures (uint8 arrays), from a checkpoint's shipped study."""
    if study is None:
        return missing_study_markdown(checkpoint), {}
    import io

    import numpy as np
    from PIL import Image

    images = {name: np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for name, png in study_figures(study).items()}
    return summary_markdown(study), images


def hover_view(num_panels: int, controls: dict) -> gr.HTML:
    """The page's hover view (vggattn/web): its script, template and style, told the panels and controls."""
    return gr.HTML(None, html_template=(WEB / "hover.html").read_text(), css_template=(WEB / "hover.css").read_text(),
                   js_on_load=(WEB / "hover.js").read_text(), elem_id="hover", **page_props(num_panels, controls))


def view_controls(extra=None) -> tuple:
    """The controls of the maps, in two rows: opacity, colormap, upsampling; scale, numbering (and `extra()`'s
    components, made in that row) -> (opacity, colormap, mode, scale, mark)."""
    with gr.Row():
        opacity = gr.Slider(0.0, 1.0, value=CONTROLS["opacity"], step=0.05, label="Opacity of the most attended cells",
                            elem_id="opacity",
                            info="Cells fade out with their weight: where a position does not look, the photo shows as it is.")
        colormap = gr.Dropdown(list(COLORMAPS), value=CONTROLS["colormap"], label="Colormap", elem_id="colormap")
        mode = gr.Radio(list(UPSAMPLING), value=CONTROLS["mode"], label="Upsampling", elem_id="upsampling")
    with gr.Row():
        scale = gr.Radio([(f"log ({LOG_DECADES} decades below the maximum)" if s == "log" else s, s)
                          for s in SCALES], value=CONTROLS["scale"], label="Scale", elem_id="scale")
        mark = gr.Checkbox(value=CONTROLS["mark"], label="Number the top-5 attended cells")
        if extra is not None:
            extra()
    return opacity, colormap, mode, scale, mark


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False, *,
           concurrency: int = 2, queue_size: int = 64, **kw):
    """Serve with a bounded queue: `concurrency` events run at once, at most `queue_size` wait."""
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    if getattr(demo, "vggattn_css", None):  # the any-model app's panel strip (Gradio 6 takes CSS at launch)
        kw.setdefault("css", demo.vggattn_css)
    # run_history off: Gradio would otherwise copy every event's inputs and outputs (an upload's payload is about
    # a megabyte) into the browser's localStorage, re-reading and re-writing that history at every event: the page
    # spent 0.6-1 s of each upload on it, more with every upload (bench/README.md, the page's upload round trip)
    kw.setdefault("run_history", False)
    block = not kw.pop("prevent_thread_lock", False)
    out = demo.launch(server_name=host, server_port=port, share=share, max_file_size="25mb", enable_monitoring=False,
                      show_error=True, state_session_capacity=STATE_SESSIONS, prevent_thread_lock=True, **kw)
    for path, answer in getattr(demo, "vggattn_routes", []):  # plain GET routes beside Gradio's (layers sent later)
        demo.server_app.add_api_route(path, answer, methods=["GET"])
    if block:
        demo.block_thread()
    return out
