"""Checkpoints as folders and on the Hugging Face Hub, in the project's own format.

    model, meta = vggattn.load_checkpoint("someone/vgg16att-birds")   # a Hub id, a folder or a file
    save_pretrained(model, meta, "out/")          # out/model.safetensors (+ meta) and out/README.md
    push_to_hub(model, meta, "me/vgg16att-birds") # the same folder, uploaded

A folder holds `model.safetensors` (vggattn's safetensors with its `meta`) and a model card whose
YAML header follows the Hub's conventions (library, tags, dataset, the measured val top-1). A Hub id
is fetched with `huggingface_hub` (its cache, so a fetched id loads offline); anything that cannot be
fetched is one sentence (a `CheckpointError`), never a traceback.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .checkpoint import HUB_ID, WEIGHTS_NAME, imagenet_meta, resolve, save_checkpoint  # noqa: F401 (hub.resolve, hub.HUB_ID)
from .vgg import VGG16WithAttention

def from_pretrained(source: str | os.PathLike, device: str = "cpu") -> VGG16WithAttention:
    """A checkpoint file, a folder saved by `save_pretrained` or a Hugging Face Hub id -> the model
    (eval mode), with its description in `model.meta` (class names, input size, ...)."""
    from .checkpoint import load_checkpoint

    model, meta = load_checkpoint(source, device=device)
    model.meta = meta
    return model


def model_card(meta: dict) -> str:
    """README.md of a saved folder: the Hub's YAML header, then what the checkpoint is."""
    t = meta.get("training", {})
    c = meta["config"]
    lines = ["---", "library_name: vggattn", "pipeline_tag: image-classification",
             "tags:", "- attention", "- vgg16", "- non-local", "- vggattn"]
    if t.get("dataset"):
        lines += ["datasets:", f"- {t['dataset']}"]
    if "val_top1" in t:
        lines += ["model-index:", "- name: vggattn", "  results:", "  - task:", "      type: image-classification",
                  "    dataset:", f"      name: {t.get('dataset', 'val')}", f"      type: {t.get('dataset', 'val')}",
                  "    metrics:", "    - type: accuracy", f"      value: {t['val_top1']:.4f}",
                  "      name: val top-1"]
    lines += ["---", "", f"# Attention-VGG16 (width ×{c['width']:g}, {len(meta['class_names'])} classes)", "",
              f"The article's VGG16 with a self-attention block in conv blocks 3, 4 and 5, {meta['input_size']} px "
              f"input. Classes: {', '.join(meta['class_names'])}.", "",
              "```python\nimport vggattn\nmodel, meta = vggattn.load_checkpoint(\"<this repo id or folder>\")\n```", ""]
    return "\n".join(lines)


def save_pretrained(model: VGG16WithAttention, meta: dict | None, folder: str | os.PathLike) -> Path:
    """Write `folder/model.safetensors` (weights + meta) and `folder/README.md` -> the folder. What meta lacks
    (class names, input size, normalisation) is what a checkpoint without metadata loads with
    (`vggattn.models.checkpoint.imagenet_meta`); the config is always the model's own."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**imagenet_meta(model.config), **(meta or {}), "config": model.config.to_dict()}
    save_checkpoint(model, meta, folder / WEIGHTS_NAME)
    (folder / "README.md").write_text(model_card(meta), encoding="utf-8")
    return folder


def push_to_hub(model: VGG16WithAttention, meta: dict, repo_id: str, *, private: bool = False,
                token: str | None = None) -> str:
    """save_pretrained into a temporary folder and upload it to `repo_id` (created if needed) -> its URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, meta, tmp)
        api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message="vggattn checkpoint")
    return f"https://huggingface.co/{repo_id}"
