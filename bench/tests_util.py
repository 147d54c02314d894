"""Models the benchmarks share."""

import torch

import vggattn
from common import article_reference

article = article_reference()


def full_width_model(seed: int = 0, gamma: float = 0.1) -> vggattn.VGG16WithAttention:
    """The article's full-width model (1000 classes) with random weights and non-zero gammas, eval mode."""
    torch.manual_seed(seed)
    model = vggattn.vgg16_with_attention(1000).eval()
    for m in model.modules():
        if isinstance(m, vggattn.GlobalAttention):
            torch.nn.init.constant_(m.gamma, gamma)
    return model


def article_twin(model: vggattn.VGG16WithAttention) -> torch.nn.Module:
    """The article's own code holding the same weights (full width only, as the article writes it)."""
    ref = article.VGG16WithAttention(num_classes=model.config.num_classes).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref


def full_width_meta(size: int = 224) -> dict:
    return {"class_names": [f"class {i}" for i in range(1000)], "input_size": size,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "config": {"width": 1.0}}
