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
def running_app(real: bool = False):
    checkpoint = str(vggattn.DEFAULT_CHECKPOINT) if real else None
    study = load_study(checkpoint) if real else None
    demo = app.build_demo(*model_and_meta(real), study, checkpoint)
    port = free_port()
    app.serve(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
