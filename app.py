"""The web app's entry file (`python app.py`, `make app`, a Gradio Space): the app is the vggattn.app package.

    python app.py --checkpoint checkpoints/vgg16att-imagenette-w025-128.safetensors --port 8000
"""

if __name__ == "__main__":  # the flags first (`vggattn.launcher`): --help answers before Gradio and torch load
    from vggattn.launcher import app

    raise SystemExit(app())

from vggattn import app as _app  # noqa: E402  (imported as a module: scripts and tests use the handlers)
from vggattn.app import *  # noqa: E402,F401,F403  (the handlers and build_demo)


def __getattr__(name: str):
    """Everything else, `demo` included (built lazily on the shipped checkpoint), from vggattn.app."""
    return getattr(_app, name)
