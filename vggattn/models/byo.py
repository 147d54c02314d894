"""Bring your own model: any CNN with non-local attention blocks (`vggattn.attention.adapters`), from a factory or timm.

    model, meta = load_model("mypkg.nets:discriminator", "weights.pth", classes="names.txt", input_size=128)
    model, meta = load_timm("botnet26t_256")        # timm's pretrained weights where its hub is reachable,
                                                    # else random weights and meta["warning"] says so
    model, meta = load_from_args(args)              # what a CLI's flags name: --model, --timm, --hf or a checkpoint

A model whose output is not one logit per class (a GAN discriminator) gets its score instead of a top-5.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from pathlib import Path

import torch
import torch.nn as nn

from ..analysis import blocks_of
from ..attention.adapters import NoAttention, example_input
from ..attention.deformable import sampling_points
from ..attention.trace import prepare_forward_ad
from .output import ImageOutput, image_model
from .checkpoint import (DEFAULT_CHECKPOINT, IMAGENET_MEAN, IMAGENET_STD, CheckpointError, clean_state_dict,
                         load_checkpoint, resolve_device)

log = logging.getLogger("vggattn.models.byo")


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One class name a line (blank lines skipped)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def describe(source: str, input_size: int, classes: list[str] | None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
             **extra) -> dict:
    """The meta of a brought model: what the app and the CLIs need to feed it and read its output."""
    return {"source": source, "input_size": int(input_size), "mean": list(mean), "std": list(std),
            "class_names": list(classes) if classes else None, **extra}


def load_weights(model: nn.Module, checkpoint: str | os.PathLike) -> dict:
    """A `.pth` state_dict (or a dict holding one under "state_dict" / "model") or a `.safetensors`, strictly.
    -> the meta a .safetensors carries (class names, input size, ...), else {}."""
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    meta = {}
    if path.suffix == ".safetensors":
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    missing, unexpected = model.load_state_dict(clean_state_dict(state), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path.name} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return meta


MOVED = {"vggattn.zoo": "vggattn.models.zoo"}  # factories' modules under their earlier names (checkpoints keep them)


def load_model(spec: str, checkpoint: str | os.PathLike | None = None, *, classes: str | None = None,
               input_size: int | None = None, mean=None, std=None) -> tuple[nn.Module, dict]:
    """`package.module:factory` called with no arguments -> the model (eval mode), its weights loaded when given.
    Class names, input size and normalisation: as given, else from the checkpoint's meta (.safetensors), else
    none, 224 and ImageNet's."""
    prepare_forward_ad()  # (in a thread, while the model is built: the first analysis needs it)
    module_name, _, factory = spec.partition(":")
    module_name = MOVED.get(module_name, module_name)  # a checkpoint saved before the module moved names the old one
    if not module_name or not factory:
        raise CheckpointError(f"--model must be package.module:factory, got {spec!r}")
    try:
        model = getattr(importlib.import_module(module_name), factory)()
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"cannot build {spec}: {e}") from None
    stored = load_weights(model, checkpoint) if checkpoint else {}
    names = read_class_names(classes) if classes else stored.get("class_names")
    return model.eval(), describe(spec, input_size or stored.get("input_size", 224), names,
                                  mean or stored.get("mean", IMAGENET_MEAN), std or stored.get("std", IMAGENET_STD),
                                  weights=str(checkpoint) if checkpoint else "random",
                                  class_ids=None if classes else stored.get("class_ids"))


def hub_reachable(host: str = "huggingface.co") -> bool:
    """False at once when offline (HF_HUB_OFFLINE, or the Hub's name does not resolve): no minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def load_timm(name: str, *, pretrained: bool = True, classes: str | None = None,
              input_size: int | None = None) -> tuple[nn.Module, dict]:
    """A timm model by name; ImageNet class names from timm's own tables when it has 1000 classes. input_size: the
    size it is fed (a transformer is built for it: timm resamples its position embeddings; default: timm's)."""
    prepare_forward_ad()  # (in a thread, while the model is built: the first analysis needs it)
    try:
        import timm
        from timm.data import ImageNetInfo, resolve_data_config
    except ImportError:
        raise CheckpointError('--timm needs timm: pip install "vggattn[timm]"') from None
    warning = None
    model = None

    def create(weights: bool):
        try:
            return timm.create_model(name, pretrained=weights, **({"img_size": input_size} if input_size else {}))
        except TypeError:  # a model with no img_size (a CNN takes any size as it is)
            return timm.create_model(name, pretrained=weights)
    if pretrained and hub_reachable():
        try:
            model = create(True)
        except Exception as e:  # no such weights, network: one sentence, then random weights
            warning = f"timm could not get pretrained weights for {name} ({str(e).splitlines()[0][:160]})"
    elif pretrained:
        warning = f"timm's hub is not reachable from here: {name} has random weights"
    if model is None:
        try:
            model = create(False)
        except Exception as e:
            raise CheckpointError(f"timm has no model {name!r}: {e}") from None
        warning = warning or f"{name} has random weights (pretrained off)"
        if "random weights" not in warning:
            warning += f"; {name} has random weights"
    config = resolve_data_config({}, model=model)
    names = read_class_names(classes) if classes else None
    ids = None
    if names is None and getattr(model, "num_classes", 0) == 1000:
        info = ImageNetInfo()
        names = [info.index_to_description(i).split(",")[0] for i in range(1000)]
        ids = [info.index_to_label_name(i) for i in range(1000)]  # wnids: ImageFolder splits map by them
    meta = describe(f"timm:{name}", input_size or config["input_size"][-1], names, config["mean"], config["std"],
                    weights="random" if warning else "pretrained", class_ids=ids)
    if warning:
        meta["warning"] = f"⚠ {warning}: the maps show an untrained model's attention."
        log.warning("%s", meta["warning"])
    return model.eval(), meta


def _hf_model(transformers, name: str):
    """The model a transformers folder or Hub id holds, as its config names it (an image classifier, a backbone, a
    detector, a dual image-text model), with SDPA where transformers offers it, else its eager attention."""
    config = transformers.AutoConfig.from_pretrained(name)
    arch = next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:  # no architecture saved: a classifier where its config has one, else the backbone
        cls = transformers.AutoModelForImageClassification if type(config) in \
            transformers.AutoModelForImageClassification._model_mapping else transformers.AutoModel
    for implementation in ("sdpa", "eager"):
        try:
            return cls.from_pretrained(name, attn_implementation=implementation)
        except ValueError as e:  # "... does not support an attention implementation through ...scaled_dot_product..."
            if implementation == "eager" or "attention implementation" not in str(e):
                raise


def _hf_size(transformers, name: str, model) -> int:
    """The size the model is used at: its config's image size (the vision tower's), else its preprocessor's."""
    config = getattr(model.config, "vision_config", None) or model.config
    size = getattr(config, "image_size", None)
    if size:
        return int(size if isinstance(size, int) else size[0])
    try:
        saved = transformers.AutoImageProcessor.from_pretrained(name).size
        return int(saved.get("height") or saved.get("shortest_edge") or 224)
    except Exception:  # noqa: BLE001 (no preprocessor saved)
        return 224


def load_hf(name: str, *, classes: str | None = None, input_size: int | None = None) -> tuple[nn.Module, dict]:
    """A transformers vision model from a folder saved with `save_pretrained` or a Hub id: an image classifier, a
    backbone (`Dinov2Model`, `CLIPVisionModel`: the study's no-classifier path), a detector (DETR, YOLOS) or the vision
    tower of a dual image-text model (`CLIPModel`, `SiglipModel`), with scaled_dot_product_attention where offered
    (vggattn reads its rows from the computation, where transformers returns none), else eager. Input size: given,
    else its config's, else its preprocessor's; mean and std from its preprocessor where saved."""
    prepare_forward_ad()  # (in a thread, while the model is built: the first analysis needs it)
    try:
        import transformers
    except ImportError:
        raise CheckpointError('--hf needs transformers: pip install "vggattn[hf]"') from None
    local = Path(name).is_dir()
    if not local and not hub_reachable():
        raise CheckpointError(f"the Hugging Face Hub is not reachable from here, so {name} cannot be fetched (not even "
                              "its config, so no random stand-in either); give a folder saved with save_pretrained")
    try:
        model = _hf_model(transformers, name)
    except Exception as e:  # noqa: BLE001 (one sentence, whatever transformers raises)
        raise CheckpointError(f"transformers could not load {name}: {str(e).splitlines()[0][:200]}") from None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name)
        mean, std = list(processor.image_mean), list(processor.image_std)
    except Exception:  # noqa: BLE001 (no preprocessor saved: ImageNet's normalisation)
        pass
    size = input_size or _hf_size(transformers, name, model)
    classifier = type(model).__name__.endswith("ForImageClassification") or \
        type(model).__name__.endswith("ForImageClassificationWithTeacher")
    labels = (getattr(model.config, "id2label", None) or {}) if classifier else {}
    names = read_class_names(classes) if classes else [labels[i] for i in sorted(labels)] if labels else None
    tower = getattr(model, "vision_model", None) if hasattr(model, "text_model") else None
    net = ImageOutput(tower, "pixel_values") if tower is not None else image_model(model)
    shows = "the vision tower's output" if tower is not None else "its logits" if classifier else "its output"
    meta = describe(f"hf:{name}", int(size), names, mean, std, weights=str(name), shows=shows)
    return net.eval(), meta


def model_meta(model: nn.Module, *, transform=None, class_names=None, input_size: int = 224, mean=IMAGENET_MEAN,
               std=IMAGENET_STD, source: str | None = None) -> dict:
    """The meta of a model in hand (`vggattn.launch`, `vggattn.show`). transform: PIL image -> (3, H, W) tensor
    (default: resize to input_size and normalise with mean and std)."""
    meta = describe(source or type(model).__name__, input_size, class_names, mean, std, weights="your")
    if transform is not None:
        meta["transform"] = transform
    return meta


def in_hand(model: nn.Module, *, transform=None, class_names=None, input_size: int | None = None
            ) -> tuple[nn.Module, dict]:
    """A model in hand (`vggattn.launch`, `vggattn.show`) as vggattn reads it, with its meta: one whose forward returns
    a ModelOutput, dict or dataclass is wrapped (`image_model`: its logits where it has them, else its embedding);
    a transformers model brings its input size and class names from its config where not given."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", None) if input_size is None else input_size
    size = int(size if isinstance(size, int) else size[0]) if size else 224
    if class_names is None and type(model).__name__.endswith(("ForImageClassification", "WithTeacher")):
        labels = getattr(config, "id2label", None) or {}
        class_names = [labels[i] for i in sorted(labels)] or None
    model = image_model(model.eval(), example_input(model, size))
    return model, model_meta(model, transform=transform, class_names=class_names, input_size=size)


def load_named(spec: str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A second model named in one string, as `--compare` and `vggattn.show` take it: "timm:NAME", "hf:NAME_OR_FOLDER",
    or a checkpoint file (the article's, or a .safetensors whose meta names a vggattn model)."""
    import argparse

    args = argparse.Namespace(checkpoint=None, model=None, timm=None, hf=None, classes=None, input_size=None,
                              mean=None, std=None, layers=None, device=device)
    kind, _, name = spec.partition(":")
    if kind in ("timm", "hf") and name:
        setattr(args, kind, name)
    else:
        args.checkpoint = spec
    return load_from_args(args)


def named_model(checkpoint) -> str | None:
    """The factory a .safetensors checkpoint's meta names ("model": "package.module:factory"), or None."""
    path = Path(checkpoint) if checkpoint else None
    if path is None or path.suffix != ".safetensors" or not path.is_file():
        return None
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            spec = json.loads((f.metadata() or {}).get("meta", "{}")).get("model")
    except Exception:  # unreadable: the loader that reads it says why
        return None
    return spec if isinstance(spec, str) and ":" in spec else None


def wants_own_model(args) -> bool:
    """--model, --timm, or a --checkpoint whose meta names its model: any CNN (not the article's VGG16)."""
    return bool(getattr(args, "model", None) or getattr(args, "timm", None) or getattr(args, "hf", None)
                or named_model(getattr(args, "checkpoint", None)))


def load_from_args(args) -> tuple[nn.Module, dict]:
    """The model and meta a CLI's flags name, on --device: --model / --timm with --checkpoint as --model's
    weights (none: random); a checkpoint whose meta names a vggattn factory builds it without --model (another
    package's factory must be named with --model: a checkpoint file does not choose code to run); else the
    article's model from --checkpoint (default: the shipped one). Its blocks are checked at once (none: one
    sentence naming what the model is made of; a model whose only attention is deformable passes, for its tokens)."""
    device = getattr(args, "device", "auto")
    if not wants_own_model(args):
        model, meta = load_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT, device=device)
    elif args.timm:
        model, meta = load_timm(args.timm, classes=args.classes, input_size=args.input_size)
    elif getattr(args, "hf", None):
        model, meta = load_hf(args.hf, classes=args.classes, input_size=getattr(args, "input_size", None))
    else:
        spec = args.model or named_model(args.checkpoint)
        if not args.model and not spec.startswith("vggattn."):
            raise CheckpointError(f"{args.checkpoint} names its model {spec}; give --model {spec} to build it "
                                  "(a checkpoint does not choose the code that runs)")
        model, meta = load_model(spec, args.checkpoint, classes=args.classes, input_size=args.input_size,
                                 mean=args.mean, std=args.std)
    model.to(resolve_device(device))
    try:
        blocks_of(model, meta, args.layers)
    except NoAttention:
        if not sampling_points(model, example_input(model, meta["input_size"])):  # deformable only: its tokens
            raise
    return model, meta
