"""Start the app on 127.0.0.1 with a free port in this process (for API and browser tests)."""

import socket
from contextlib import contextmanager

from vggattn import app
import vggattn
from vggattn.study import load_study
from conftest import tiny_meta, tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_and_meta(real: bool):
    """The shipped checkpoint when asked for and present, else a tiny random model."""
    if real and vggattn.DEFAULT_CHECKPOINT.is_file():
        return vggattn.load_checkpoint(device="cpu")
    return tiny_model(), tiny_meta(input_size=64)


@contextmanager
def serving(demo):
    """`demo` served on 127.0.0.1 at a free port in this process: yields its URL; closed after."""
    port = free_port()
    app.serve(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@contextmanager
def running_app(real: bool = False):
    checkpoint = str(vggattn.DEFAULT_CHECKPOINT) if real else None
    study = load_study(checkpoint) if real else None
    with serving(app.build_demo(*model_and_meta(real), study, checkpoint)) as url:
        yield url


@contextmanager
def uploaded(browser, model, meta, image, width: int = 1440, height: int = 900):
    """The app for (model, meta) served here, a page at width x height with `image` uploaded and the page's hover
    ready: yields the page (closed, and the server stopped, after)."""
    with serving(app.build_demo(model, meta)) as url:
        page = browser.new_page(viewport={"width": width, "height": height})
        try:
            page.goto(url)
            page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
            page.locator("#input-image input[type=file]").set_input_files(str(image))
            page.wait_for_function("window.vggattnHover && window.vggattnHover.ready()", timeout=120_000)
            yield page
        finally:
            page.close()
