"""Bring your own model: any CNN with non-local attention blocks (`vggattn.adapters`), from a factory or timm.

    model, meta = load_model("mypkg.nets:discriminator", "weights.pth", classes="names.txt", input_size=128)
    model, meta = load_timm("botnet26t_256")        # timm's pretrained weights where its hub is reachable,
                                                    # else random weights and meta["warning"] says so
    result = analyze_any(model, meta, pil_image)    # one forward: predictions (or the score), every block's maps
    result.blocks[0].row_map((120, 80))             # (heads, kh, kw): where that pixel's position looks

A model whose output is not one logit per class (a GAN discriminator) gets its score instead of a top-5.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from .adapters import Adapter, BlockMaps, TracedAdapter, example_input, find_blocks
from .trace import record_model
from .analysis import display_copy
from .checkpoint import IMAGENET_MEAN, IMAGENET_STD, CheckpointError, clean_state_dict
from .data import eval_transform, query_index, to_rgb

log = logging.getLogger("vggattn.byo")


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


def load_model(spec: str, checkpoint: str | os.PathLike | None = None, *, classes: str | None = None,
               input_size: int | None = None, mean=None, std=None) -> tuple[nn.Module, dict]:
    """`package.module:factory` called with no arguments -> the model (eval mode), its weights loaded when given.
    Class names, input size and normalisation: as given, else from the checkpoint's meta (.safetensors), else
    none, 224 and ImageNet's."""
    module_name, _, factory = spec.partition(":")
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


def load_timm(name: str, *, pretrained: bool = True, classes: str | None = None) -> tuple[nn.Module, dict]:
    """A timm model by name; ImageNet class names from timm's own tables when it has 1000 classes."""
    try:
        import timm
        from timm.data import ImageNetInfo, resolve_data_config
    except ImportError:
        raise CheckpointError('--timm needs timm: pip install "vggattn[timm]"') from None
    warning = None
    model = None
    if pretrained and hub_reachable():
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as e:  # no such weights, network: one sentence, then random weights
            warning = f"timm could not get pretrained weights for {name} ({str(e).splitlines()[0][:160]})"
    elif pretrained:
        warning = f"timm's hub is not reachable from here: {name} has random weights"
    if model is None:
        try:
            model = timm.create_model(name, pretrained=False)
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
    meta = describe(f"timm:{name}", config["input_size"][-1], names, config["mean"], config["std"],
                    weights="random" if warning else "pretrained", class_ids=ids)
    if warning:
        meta["warning"] = f"⚠ {warning}: the maps show an untrained model's attention."
        log.warning("%s", meta["warning"])
    return model.eval(), meta


def add_model_arguments(parser) -> None:
    """The flags that bring a model of your own, the same in every CLI that takes one."""
    own = parser.add_argument_group("your own model (instead of an attention-VGG16 checkpoint)")
    own.add_argument("--model", metavar="PKG.MODULE:FACTORY", help="a factory returning the model; --checkpoint "
                     "is then its weights (.pth state_dict or .safetensors), or give none for random weights")
    own.add_argument("--timm", metavar="NAME", help="a timm model (pretrained where timm's hub is reachable)")
    own.add_argument("--classes", help="class names file, one a line (timm's ImageNet models have theirs)")
    own.add_argument("--input-size", type=int, help="square input size for --model (default: the checkpoint's, "
                     "else 224)")
    own.add_argument("--mean", type=float, nargs=3, help="input normalisation mean (default: the checkpoint's, "
                     f"else ImageNet's {IMAGENET_MEAN})")
    own.add_argument("--std", type=float, nargs=3, help=f"input normalisation std (default: ImageNet's {IMAGENET_STD})")
    own.add_argument("--layers", nargs="+", metavar="NAME", help="the attention blocks by module name "
                     "(default: every attention block found, by its class or by what it computes)")


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
    return bool(getattr(args, "model", None) or getattr(args, "timm", None)
                or named_model(getattr(args, "checkpoint", None)))


def load_from_args(args) -> tuple[nn.Module, dict]:
    """The model and meta that --model / --timm name, with --checkpoint as --model's weights (none: random); a
    checkpoint whose meta names a vggattn factory builds it without --model (another package's factory must be
    named with --model: a checkpoint file does not choose code to run). Its blocks are checked at once (none: one
    sentence naming what the model is made of)."""
    if args.timm:
        model, meta = load_timm(args.timm, classes=args.classes)
    else:
        spec = args.model or named_model(args.checkpoint)
        if not args.model and not spec.startswith("vggattn."):
            raise CheckpointError(f"{args.checkpoint} names its model {spec}; give --model {spec} to build it "
                                  "(a checkpoint does not choose the code that runs)")
        model, meta = load_model(spec, args.checkpoint, classes=args.classes, input_size=args.input_size,
                                 mean=args.mean, std=args.std)
    blocks_of(model, meta, args.layers)
    return model, meta


def blocks_of(model: nn.Module, meta: dict, layers: list[str] | None = None) -> list:
    """`find_blocks` on an input of the model's size (the first call per model finds traced blocks and keeps them)."""
    return find_blocks(model, layers, example=example_input(model, meta.get("input_size")))


@dataclass
class BlockResult:
    """One block's attention on one image (batch of one)."""

    name: str
    adapter: Adapter
    maps: BlockMaps
    image_size: tuple[int, int]  # (width, height) of the original image

    @property
    def family(self) -> str:
        return self.adapter.family

    def query_index(self, xy: tuple[float, float]) -> int:
        return query_index(xy, self.image_size, self.maps.grid)

    def row_map(self, xy: tuple[float, float]) -> np.ndarray:
        """(heads, kh, kw) float64: where the position under pixel xy looks (per-image maps: the map itself)."""
        with torch.no_grad():
            rows = self.maps.rows(None if self.maps.per_image else [self.query_index(xy)])[0, :, 0]  # (heads, M)
        return rows.double().cpu().reshape(self.maps.heads, *self.maps.key_grid).numpy()

    def padding_share(self, xy: tuple[float, float]) -> float | None:
        """The share of the row under pixel xy that falls on padding (mean over heads), or None where none can."""
        if self.maps.padding is None:
            return None
        q = 0 if self.maps.per_image else self.query_index(xy)
        return float(self.maps.padding[0, :, q].double().mean())


@dataclass
class AnyAnalysis:
    size: tuple[int, int]  # (width, height) of the image
    output: torch.Tensor  # the model's raw output for the image
    class_names: list[str] | None
    blocks: list[BlockResult] = field(default_factory=list)
    display: np.ndarray | None = None  # (h, w, 3) uint8 copy to draw on (vggattn.analysis.display_copy)
    display_jpeg: bytes | None = None  # the same picture as the JPEG the page gets
    input: torch.Tensor | None = None  # the model's input (1, 3, S, S), for ablation forwards

    def top_k(self, k: int = 5) -> dict[str, float] | None:
        """{class: probability} when the output is one logit per class, else None (see `score`)."""
        out = self.output.reshape(-1)
        if not self.class_names or out.numel() != len(self.class_names):
            return None
        p, i = torch.softmax(out.float(), dim=0).topk(min(k, out.numel()))
        return {self.class_names[j]: float(v) for v, j in zip(p.tolist(), i.tolist())}

    def score(self) -> list[float]:
        """The raw output values (a discriminator's real/fake score)."""
        return [float(v) for v in self.output.reshape(-1)[:16]]


@torch.no_grad()
def analyze_any(model: nn.Module, meta: dict, image: Image.Image, layers: list[str] | None = None) -> AnyAnalysis:
    """One forward with every block's input kept (forward pre-hooks, removed on exit), then each block's maps."""
    image = to_rgb(image)
    blocks = blocks_of(model, meta, layers)
    device = next(model.parameters()).device
    x = (meta.get("transform") or eval_transform(meta))(image).unsqueeze(0).to(device)
    inputs: dict[str, torch.Tensor] = {}
    handles = [module.register_forward_pre_hook(lambda m, args, n=name: inputs.__setitem__(n, args[0].detach()))
               for name, module, _ in blocks]
    traced = {name for name, _, adapter in blocks if isinstance(adapter, TracedAdapter)}
    try:  # traced blocks: their weights recorded as the model runs (one forward, no block run twice)
        output, events = record_model(model, x, traced) if traced else (model(x), {})
    finally:
        for h in handles:
            h.remove()
    if isinstance(output, (tuple, list)):  # e.g. a discriminator returning (score, features)
        output = output[0]
    result = AnyAnalysis(image.size, output.detach().cpu(), meta.get("class_names"), [], *display_copy(image), x)
    for name, module, adapter in blocks:
        if name in inputs:
            maps = adapter.maps(module, inputs[name], events[name]) if name in events else adapter.maps(module, inputs[name])
            result.blocks.append(BlockResult(name, adapter, maps, image.size))
    return result
