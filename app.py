"""The web app's entry file (`python app.py`, `make app`, a Gradio Space): the app is the vggattn.app package.

    python app.py --checkpoint checkpoints/vgg16att-imagenette-w025-128.safetensors --port 8000
"""

from vggattn import app as _app
from vggattn.app import *  # noqa: F401,F403  (the handlers and build_demo, for scripts and tests)


def __getattr__(name: str):
    """Everything else, `demo` included (built lazily on the shipped checkpoint), from vggattn.app."""
    return getattr(_app, name)


if __name__ == "__main__":
    raise SystemExit(_app.main())
