"""The console scripts: each parses its flags (`vggattn.cli`, standard library only) before it imports the module
that does the work, so `--help` and a bad flag answer at once; `vggattn-app` says in one line how to install the
app's extra when Gradio is missing. (Outside `vggattn.app`, whose import needs Gradio.)

    vggattn-app --checkpoint my.safetensors       # = python -m vggattn.app (needs pip install "vggattn[app]")
    vggattn-explain photo.jpg --out explained/    # = python -m vggattn.explain
"""

from __future__ import annotations

import sys

from . import cli


def app(argv=None) -> int:
    cli.app_args(argv)
    try:
        import gradio  # noqa: F401
        import pandas  # noqa: F401
    except ImportError as e:
        print(f"error: the app needs {e.name or 'gradio'}, which is not installed: pip install \"vggattn[app]\"",
              file=sys.stderr)
        return 2
    from .app import main

    return main(argv)


def explain(argv=None) -> int:
    cli.explain_args(argv)
    from .explain import main

    return main(argv)


def study(argv=None) -> int:
    cli.study_args(argv)
    from .study import main

    return main(argv)


def train(argv=None) -> int:
    cli.train_args(argv)
    from .training.train import main

    return main(argv)


def evaluate(argv=None) -> int:
    cli.evaluate_args(argv)
    from .training.evaluate import main

    return main(argv)


def plots(argv=None) -> int:
    cli.plots_args(argv)
    from .training.plots import main

    return main(argv)


if __name__ == "__main__":
    raise SystemExit(app())
