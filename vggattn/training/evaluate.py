"""Evaluate a checkpoint on an ImageFolder split, and count FLOPs and parameters.

    python -m vggattn.training.evaluate --checkpoint checkpoints/vgg16att-imagenette-w025-128.safetensors \
        --data ../shared/data/imagenette2-224/val --out ~/runs/eval
    python -m vggattn.training.evaluate --flops-only          # the article's model vs plain VGG16 at 224 px

Prints top-1, top-5 and per-class accuracy, writes `metrics.json` and `confusion.png` into --out,
and reports FLOPs (torch.utils.flop_counter; one multiply-add = 2 FLOPs) of the checkpoint at its
input size and of the article's full VGG16WithAttention vs torchvision's VGG16 at 224 px.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m: the flags first, so --help needs none of the imports below
    from vggattn.cli import evaluate_args

    evaluate_args()

import argparse
import json
import logging
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ..attention.adapters import replaced_forward
from ..models.checkpoint import BAD_INPUT, CheckpointError, load_checkpoint
from ..cli import evaluate_args
from ..data import eval_transform, load_rgb, per_class_subset
from ..models.vgg import GlobalAttention, VGG16WithAttention

log = logging.getLogger("vggattn.training.evaluate")


@torch.no_grad()
def predict_folder(model: nn.Module, meta: dict, root: str | Path, batch_size: int = 64, workers: int = 2,
                   limit_per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> (targets (n,), top-5 predictions (n, k)) over an ImageFolder root, in file order."""
    targets, logits = predict_logits(model, meta, root, batch_size, workers, limit_per_class)
    return targets, logits.topk(min(5, logits.shape[1]), dim=1).indices.numpy()


def expected_calibration_error(probs: torch.Tensor, targets, bins: int = 15) -> float:
    """ECE of the top-1 probability: sum over equal-width confidence bins of |accuracy - confidence|
    weighted by the bin's share of images. targets: (n,) array or tensor."""
    conf, pred = probs.max(1)
    correct = (pred == torch.as_tensor(targets, device=probs.device)).double()
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += float(m.double().mean() * (conf[m].double().mean() - correct[m].mean()).abs())
    return ece


def fit_temperature(logits: torch.Tensor, targets) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017), by L-BFGS on log T."""
    targets = torch.as_tensor(targets, device=logits.device)
    logits = logits.detach().float()
    log_t = torch.zeros(1, device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


def calibration(logits: torch.Tensor, targets: np.ndarray, temperature: float = 1.0) -> dict:
    """ECE before and after the checkpoint's temperature (meta["temperature"]; 1 = none)."""
    return {"temperature": temperature, "ece": expected_calibration_error(logits.softmax(1), targets),
            "ece_with_temperature": expected_calibration_error((logits / temperature).softmax(1), targets)}


@torch.no_grad()
def predict_logits(model: nn.Module, meta: dict, root: str | Path, batch_size: int = 64, workers: int = 2,
                   limit_per_class: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """-> (targets (n,), logits (n, num_classes) float32 on the CPU) over an ImageFolder root, in file order."""
    from torchvision.datasets import ImageFolder  # (torchvision: 2 s to import, only here)

    ds = ImageFolder(root, transform=eval_transform(meta), loader=load_rgb)
    if len(ds.classes) != len(meta["class_names"]):
        raise ValueError(f"{root} has {len(ds.classes)} class folders but the checkpoint has "
                         f"{len(meta['class_names'])} classes")
    ds = per_class_subset(ds, limit_per_class)
    device = next(model.parameters()).device
    targets, logits = [], []
    for x, y in tqdm(DataLoader(ds, batch_size, num_workers=workers), desc="evaluate", leave=False):
        logits.append(model(x.to(device)).float().cpu())  # (B, num_classes)
        targets.append(y)
    return torch.cat(targets).numpy(), torch.cat(logits)


def metrics(targets: np.ndarray, top5: np.ndarray, class_names: list[str]) -> dict:
    n = len(class_names)
    confusion = np.zeros((n, n), dtype=np.int64)  # rows: true class, columns: predicted
    np.add.at(confusion, (targets, top5[:, 0]), 1)
    per_class = {name: float(confusion[i, i] / max(confusion[i].sum(), 1)) for i, name in enumerate(class_names)}
    return {"n": int(len(targets)), "top1": float((top5[:, 0] == targets).mean()),
            "top5": float((top5 == targets[:, None]).any(1).mean()), "per_class": per_class,
            "confusion": confusion.tolist()}


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: str | Path, title: str = "") -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    confusion = np.asarray(confusion)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for i, j in np.ndindex(confusion.shape):
        if confusion[i, j]:
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@torch.no_grad()
def count_flops(model: nn.Module, input_size: int) -> int:
    """FLOPs of one forward of a (1, 3, S, S) input (multiply-add = 2; convs, matmuls, attention bmm).

    Attention is counted as the article's math (`GlobalAttention.forward_reference`): the fused
    kernel the model runs pads Q and K with zeros and is not seen by the counter on every device.
    Query-averaged blocks (attention="global") are counted as they run.
    """
    model = model.eval()
    x = torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter, ExitStack() as stack:
        for block in model.modules():  # query-averaged blocks ("global") are counted as they run
            if isinstance(block, GlobalAttention) and not block.query_averaged:
                stack.enter_context(replaced_forward(block, block.forward_reference))
        model(x)
    return counter.get_total_flops()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def article_flops_comparison(size: int = 224) -> dict:
    """The article's full VGG16WithAttention vs torchvision's plain VGG16 at `size` px."""
    from torchvision.models import vgg16

    with torch.device("meta"):  # shapes only: no 0.5 GB of weights allocated
        ours, plain = VGG16WithAttention(1000), vgg16(weights=None)
    f_att, f_plain = count_flops(ours, size), count_flops(plain, size)
    return {"input_size": size, "attention_vgg16_gflops": f_att / 1e9, "vgg16_gflops": f_plain / 1e9,
            "added_percent": 100.0 * (f_att - f_plain) / f_plain,
            "attention_vgg16_params": count_params(ours), "vgg16_params": count_params(plain)}


parse_args = evaluate_args


def main(argv=None) -> int:
    """The command line: 0 on success, 2 when the checkpoint cannot be loaded."""
    try:
        run(parse_args(argv))
    except CheckpointError as e:
        log.error("error: %s", e)
        return BAD_INPUT
    return 0


def run(args: argparse.Namespace) -> dict:
    """FLOPs, and with --data the metrics; written to --out when given. -> the report dict."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report: dict = {"article_vs_vgg16": article_flops_comparison(224)}
    a = report["article_vs_vgg16"]
    log.info("FLOPs at 224 px: article's VGG16WithAttention %.2f G vs VGG16 %.2f G: attention adds %.1f%% "
             "(the article claims 15-20%%); params %.1f M vs %.1f M", a["attention_vgg16_gflops"], a["vgg16_gflops"],
             a["added_percent"], a["attention_vgg16_params"] / 1e6, a["vgg16_params"] / 1e6)
    if args.flops_only:
        return report
    model, meta = load_checkpoint(args.checkpoint, device=args.device)
    report["checkpoint"] = {"gflops": count_flops(model, meta["input_size"]) / 1e9, "params": count_params(model),
                            "input_size": meta["input_size"]}
    c = report["checkpoint"]
    log.info("checkpoint: %.3f GFLOPs at %d px, %.2f M params", c["gflops"], c["input_size"], c["params"] / 1e6)
    if args.data:
        targets, logits = predict_logits(model, meta, args.data, args.batch_size, args.workers, args.limit_per_class)
        m = metrics(targets, logits.topk(min(5, logits.shape[1]), dim=1).indices.numpy(), meta["class_names"])
        m["calibration"] = calibration(logits, targets, float(meta.get("temperature", 1.0)))
        report["metrics"] = m
        log.info("%d images: top-1 %.2f%%, top-5 %.2f%%; ECE %.4f, with temperature %.3f: %.4f", m["n"], 100 * m["top1"],
                 100 * m["top5"], m["calibration"]["ece"], m["calibration"]["temperature"],
                 m["calibration"]["ece_with_temperature"])
        for name, acc in m["per_class"].items():
            log.info("  %-20s %.2f%%", name, 100 * acc)
        if args.out:
            out = Path(args.out).expanduser()
            out.mkdir(parents=True, exist_ok=True)
            plot_confusion(np.array(m["confusion"]), meta["class_names"], out / "confusion.png",
                           f"top-1 {100 * m['top1']:.1f}% on {Path(args.data).name} ({m['n']} images)")
            (out / "metrics.json").write_text(json.dumps(report, indent=2))
            log.info("wrote %s and %s", out / "metrics.json", out / "confusion.png")
    return report


if __name__ == "__main__":
    raise SystemExit(main())
