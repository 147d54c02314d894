"""vggattn: see what the self-attention inside a CNN looks at (the article's attention-VGG16, and any model
whose blocks compute attention)."""

from .analysis import Analysis, analyze
from .capture import capture
from .models.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint
from .data import ImageLoadError, cell_box, open_image, preprocess, query_index
from .models.vgg import (GlobalAttention, ModelConfig, VGG16WithAttention, attention_layer_names, fold_batchnorm,
                    from_torchvision, gammas, vgg16_with_attention)


def launch(model, *, transform=None, class_names=None, **kw):
    """The web app for a model in hand with attention blocks (`vggattn.app.launch`; needs vggattn[app])."""
    from .app import launch as serve

    return serve(model, transform=transform, class_names=class_names, **kw)


def show(model=None, image=None, **kw):
    """The live view inline in a Jupyter notebook (`vggattn.notebook.show`; needs vggattn[notebook])."""
    from .notebook import show as widget

    return widget(model, image, **kw)


__all__ = [
    "DEFAULT_CHECKPOINT", "CheckpointError", "load_checkpoint", "save_checkpoint",
    "ImageLoadError", "cell_box", "open_image", "preprocess", "query_index", "GlobalAttention", "ModelConfig",
    "VGG16WithAttention", "attention_layer_names", "fold_batchnorm", "from_torchvision", "gammas",
    "vgg16_with_attention", "Analysis", "analyze", "capture", "launch", "show",
]
