"""vggattn: see what the self-attention inside a CNN looks at (the article's attention-VGG16, and any model
whose blocks compute attention).

`import vggattn` loads nothing heavy: each name below is imported from its module on first use (torch comes with
the first of them), so a command's `--help` and a process that needs one module pay for that module alone.
"""

from __future__ import annotations

import importlib
import sys
import types

_WHERE = {  # name -> the module that defines it
    "Analysis": "analysis", "analyze": "analysis", "capture": "capture",
    "DEFAULT_CHECKPOINT": "models.checkpoint", "CheckpointError": "models.checkpoint",
    "load_checkpoint": "models.checkpoint", "save_checkpoint": "models.checkpoint",
    **dict.fromkeys(["ImageLoadError", "cell_box", "open_image", "preprocess", "query_index"], "data"),
    **dict.fromkeys(["GlobalAttention", "ModelConfig", "VGG16WithAttention", "attention_layer_names", "fold_batchnorm",
                     "from_torchvision", "gammas", "vgg16_with_attention"], "models.vgg"),
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'vggattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # found once
    return value


class _Package(types.ModuleType):
    """`vggattn.capture` stays the function once its module (vggattn/capture.py) is imported too: importing a submodule
    binds it on its package, which would hide the function of the same name."""

    def __setattr__(self, name, value):
        if not (name == "capture" and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted({*globals(), *_WHERE})


def launch(model, *, transform=None, class_names=None, **kw):
    """The web app for a model in hand with attention blocks (`vggattn.app.launch`; needs vggattn[app])."""
    from .app import launch as serve

    return serve(model, transform=transform, class_names=class_names, **kw)


def show(model=None, image=None, **kw):
    """The live view inline in a Jupyter notebook (`vggattn.notebook.show`; needs vggattn[notebook])."""
    from .notebook import show as widget

    return widget(model, image, **kw)


__all__ = [*_WHERE, "launch", "show"]
