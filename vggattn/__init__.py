"""vggattn: see what the self-attention inside an attention-VGG16 looks at."""

from .capture import AttentionCapture, LayerCapture
from .checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint
from .data import ImageLoadError, cell_box, open_image, preprocess, query_index
from .model import (GlobalAttention, ModelConfig, VGG16WithAttention, attention_layer_names, fold_batchnorm,
                    from_torchvision, gammas, vgg16_with_attention)
from .analysis import Analysis, analyze, render_attention



def launch(model, *, transform=None, class_names=None, **kw):
    """The web app for any CNN with non-local attention blocks (`vggattn.app_any.launch`; needs vggattn[app])."""
    from .app_any import launch as serve

    return serve(model, transform=transform, class_names=class_names, **kw)


__all__ = [
    "AttentionCapture", "LayerCapture", "DEFAULT_CHECKPOINT", "CheckpointError", "load_checkpoint", "save_checkpoint",
    "ImageLoadError", "cell_box", "open_image", "preprocess", "query_index", "GlobalAttention", "ModelConfig",
    "VGG16WithAttention", "attention_layer_names", "fold_batchnorm", "from_torchvision", "gammas",
    "vgg16_with_attention", "Analysis", "analyze", "render_attention", "launch",
]
