"""Checkpoints: the project's safetensors format, and the article's plain `.pth` state_dicts.

Our format is one `.safetensors` file: the weights (article layout) and, in its metadata under
the key "vggattn", a JSON `meta` that describes the model fully:

    {"format": 1, "config": ModelConfig, "class_names": [...], "class_ids": [wnids...], "input_size": 128,
     "mean": [...], "std": [...], "training": {dataset, epochs, val_top1, ...}}

A `.pth` saved by the article's code (`torch.save(model.state_dict(), path)`), with or without
`module.` / `_orig_mod.` prefixes, is read with `torch.load(weights_only=True)` only; its config
is inferred from tensor shapes and it gets ImageNet defaults in `meta`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..cli import BAD_INPUT, CHECKPOINTS, DEFAULT_CHECKPOINT, IMAGENET_MEAN, IMAGENET_STD, SMALL_CHECKPOINT  # noqa: F401
from .vgg import ModelConfig, VGG16WithAttention

META_KEY = "vggattn"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says why in one sentence or a key list."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when present, else CPU; anything else is passed to torch.device."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' was asked for but no CUDA GPU is available")
    return device


def imagenet_meta(config: ModelConfig) -> dict:
    """Defaults for a checkpoint without metadata: 224 px, ImageNet mean/std and class names."""
    if config.num_classes == 1000:
        from torchvision.models import VGG16_Weights  # ships the names offline

        class_names = list(VGG16_Weights.IMAGENET1K_V1.meta["categories"])
    else:
        class_names = [f"class {i}" for i in range(config.num_classes)]
    return {"format": FORMAT_VERSION, "config": config.to_dict(), "class_names": class_names,
            "input_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "training": {}}


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def infer_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """Rebuild the ModelConfig of an article-layout state_dict from its tensor shapes."""
    needed = ("features.0.weight", "classifier.0.weight", "classifier.6.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"not an attention-VGG16 state_dict: missing keys {missing}")
    width = state["features.0.weight"].shape[0] / 64
    attention = any(k.endswith(".gamma") for k in state)
    batch_norm = any(k.endswith(".running_mean") for k in state)
    return ModelConfig(num_classes=int(state["classifier.6.weight"].shape[0]), width=width,
                       hidden=int(state["classifier.0.weight"].shape[0]),
                       attention=attention, batch_norm=batch_norm)


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict(strict=True), with an error naming missing, unexpected, mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if misshaped:
            parts.append(f"mis-shaped keys {misshaped}")
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path.name} is not a readable safetensors file ({e})") from None
    meta = json.loads(raw[META_KEY]) if META_KEY in raw else None
    return state, meta


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's pickle-protocol chatter
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e).strip()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if "Weights only load failed" in text:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            detail = f"it references {found.group(1)}, which is not a tensor type" if found else \
                "it is not a plain tensor checkpoint (or it is corrupt)"
            reason = f"{detail}; it was refused without running any of its code"
        else:
            reason = f"the file is truncated or corrupt ({lines[0] if lines else type(e).__name__})"
        raise CheckpointError(f"{path.name} could not be read as a weights-only torch checkpoint: {reason}") from None
    meta = None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        meta = obj.get("meta")  # our training state (train.py's last.pt)
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} does not hold a state_dict of tensors")
    return obj, meta


WEIGHTS_NAME = "model.safetensors"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name


def resolve(source: str | os.PathLike) -> Path:
    """A checkpoint file, a folder holding `model.safetensors` (`vggattn.models.hub.save_pretrained`), or a Hugging Face
    Hub id (fetched with huggingface_hub, into its cache) -> the local file."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{path} is a folder without {WEIGHTS_NAME}")
        return path / WEIGHTS_NAME
    if not HUB_ID.match(str(source)) or path.suffix in (".safetensors", ".pth", ".pt", ".bin"):
        raise CheckpointError(f"checkpoint not found: {source}")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(source), WEIGHTS_NAME))
    except Exception as e:  # offline, unknown repo, no such file, network: all one sentence
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not get {source} from the Hugging Face Hub (nothing at that path here either): "
                              f"{reason}") from None


def load_checkpoint(path: str | os.PathLike | None = None, device: str | torch.device = "auto",
                    ) -> tuple[VGG16WithAttention, dict]:
    """Load a checkpoint (ours or the article's `.pth`; a file, a folder saved by `vggattn.models.hub.save_pretrained`
    or a Hugging Face Hub id) -> (model in eval mode, meta)."""
    if path is None:
        path = DEFAULT_CHECKPOINT
    elif not Path(path).is_file():
        path = resolve(path)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name} is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(8)
    # safetensors starts with a little-endian u64 header length; zip/pickle files do not
    is_safetensors = path.suffix == ".safetensors" or (
        len(head) == 8 and 0 < int.from_bytes(head, "little") < 100_000_000 and not head.startswith(b"PK"))
    state, meta = _read_safetensors(path) if is_safetensors else _read_torch(path)
    state = clean_state_dict(state)
    config = ModelConfig.from_dict(meta["config"]) if meta else infer_config(state)
    if meta is None:
        meta = imagenet_meta(config)
    model = VGG16WithAttention.from_config(config)
    load_state_dict_strict(model, state)
    # channels_last: oneDNN's fastest conv layout on CPU (bench/model_speed.py); outputs are unchanged
    model.eval().to(resolve_device(device), memory_format=torch.channels_last)
    return model, meta


def save_checkpoint(model: VGG16WithAttention, meta: dict, path: str | os.PathLike) -> None:
    """Write weights + meta as one safetensors file, atomically (temp file, then os.replace)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {**meta, "format": FORMAT_VERSION, "config": model.config.to_dict()}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={META_KEY: json.dumps(meta)}))


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` on a temp file beside `path`, fsync it, then os.replace it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
