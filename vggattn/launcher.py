"""The `vggattn-app` console script: the app when its extra is installed, else one line saying how. (Outside
`vggattn.app`, whose import needs Gradio: this must run without it.)

    vggattn-app --checkpoint my.safetensors       # = python -m vggattn.app (needs pip install "vggattn[app]")
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    try:
        import gradio  # noqa: F401
        import pandas  # noqa: F401
    except ImportError as e:
        print(f"error: the app needs {e.name or 'gradio'}, which is not installed: pip install \"vggattn[app]\"",
              file=sys.stderr)
        return 2
    from .app import main as app_main

    return app_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
