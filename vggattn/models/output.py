"""Models whose forward returns more than a tensor (transformers' `ModelOutput`, a dict, a dataclass) as models of
images -> one tensor, the way every part of vggattn reads a model's output.

    model = image_model(net)        # net itself when its output is a tensor (or a tuple starting with one)
    image_model(net).shows          # what the tensor is: "logits", "pooler_output" (an embedding, no classifier), ...

The wrapper shares the model's submodules, parameters and buffers, so every block keeps its own name.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.nn as nn

# what stands for the model's output, in order of preference: class logits, else the image's embedding
PREFERRED = ("logits", "pooler_output", "image_embeds", "last_hidden_state")


def output_tensor_of(out) -> tuple[torch.Tensor, str | None]:
    """(the tensor that stands for a model's output, its name where it has one): a tensor itself, the first tensor of
    a tuple or list, or of a mapping or dataclass the first of `PREFERRED` it holds, else its first tensor."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], None
    if dataclasses.is_dataclass(out) and not isinstance(out, dict):
        items = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    elif isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict of the fields that are set
        items = dict(out)
    else:
        raise TypeError(f"the model returned a {type(out).__name__}, not a tensor, a tuple, a dict or a dataclass")
    tensors = {k: v for k, v in items.items() if isinstance(v, torch.Tensor)}
    for key in (*PREFERRED, *tensors):
        if key in tensors:
            return tensors[key], key
    raise TypeError(f"the model's {type(out).__name__} holds no tensor (fields: {list(items)[:8]})")


class ImageOutput(nn.Module):
    """A model whose forward returns a ModelOutput, dict or dataclass, as forward(x) -> one tensor (`output_tensor_of`;
    `shows` names it after a forward). Its submodules, parameters and buffers are the model's own (shared, not
    copied): every name stays the model's. keyword: the model takes its input by that name (transformers'
    `pixel_values`)."""

    def __init__(self, model: nn.Module, keyword: str | None = None):
        super().__init__()
        object.__setattr__(self, "inner", model)  # not a submodule: its children are this module's children
        self._modules, self._parameters, self._buffers = model._modules, model._parameters, model._buffers
        self.keyword, self.shows = keyword, None
        self.training = model.training

    def train(self, mode: bool = True):
        self.inner.train(mode)
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.shows = output_tensor_of(self.inner(**{self.keyword: x}) if self.keyword else self.inner(x))
        return out


_WRAPPED: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
_RETURNED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()  # a tensor (or a tuple of)?


def _is_tensor_output(out) -> bool:
    return isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and bool(out) and isinstance(out[0], torch.Tensor))


def remember_output(model: nn.Module, out) -> None:
    """Note what a forward of the model returned, so that `image_model` need not run one to see (finding the blocks
    runs a whole forward: at 518 px a ViT's forward is most of a second)."""
    _RETURNED[model] = _is_tensor_output(out)


def image_model(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """The model as vggattn reads it: itself when its forward returns a tensor (or a tuple starting with one), else
    an `ImageOutput` (the same one for the same model). transformers' models (a `config` and a `main_input_name`)
    are wrapped and called with their input by keyword (`pixel_values`); another model runs once on `example` to
    show what it returns (no example: taken as it is)."""
    if isinstance(model, ImageOutput):
        return model
    if model in _WRAPPED:
        return _WRAPPED[model]
    keyword = getattr(model, "main_input_name", None) if hasattr(model, "config") else None
    if keyword is None:
        if model not in _RETURNED:
            if example is None:
                return model
            with torch.no_grad():
                remember_output(model, model(example))
        if _RETURNED[model]:
            _WRAPPED[model] = model
            return model
    _WRAPPED[model] = ImageOutput(model, keyword)
    return _WRAPPED[model]
