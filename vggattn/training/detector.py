"""A small Conditional DETR (transformers) trained on the seeded shapes (`vggattn.training.shapes`), so a detector's
object queries and their cross-attention can be looked at without a hub.

    python -m vggattn.training.detector --out ~/runs/detector --steps 6000           # resumable: run it again
    python -m vggattn.training.detector --out ~/runs/detector --evaluate-only         # AP50 and the box shares
    python -m vggattn.training.detector --out ~/runs/detector --export checkpoints/shapes-detector

The backbone is a small ResNet trained from scratch with the rest (transformers freezes a DETR backbone's BatchNorm,
so its statistics are set once from training images before the first step: each frozen norm normalises what it
gets). --out holds `last.pt` (model, optimizer, step: written atomically every --save-every steps), `log.jsonl` and,
after evaluation, `metrics.json`. --export writes the model with `save_pretrained` (loadable with `--hf FOLDER`), its
metrics and a card.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, atomic_write
from .shapes import CLASSES, SIZE, VAL_COUNT, sample

log = logging.getLogger("vggattn.training.detector")

GRID_STRIDE = 16  # the backbone's stride: SIZE / 16 = 12 x 12 keys for the decoder


def config(num_queries: int = 12):
    """The detector's transformers config: a ResNet of 4 small stages read at its third (stride 16, 128 channels), 2
    encoder and 3 decoder layers of width 128 with 4 heads, `num_queries` object queries, the shapes' classes."""
    from transformers import ConditionalDetrConfig, ResNetConfig

    backbone = ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 2, 1],
                            out_features=["stage3"])
    return ConditionalDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=128,
        encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=256, decoder_ffn_dim=256, num_queries=num_queries, auxiliary_loss=True, dropout=0.0,
        num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
        image_size=SIZE)


def build(num_queries: int = 12):
    """The detector, every parameter trained (transformers leaves a ResNet backbone's stem and first stage frozen,
    for a pretrained one; this one starts from nothing)."""
    from transformers import ConditionalDetrForObjectDetection

    model = ConditionalDetrForObjectDetection(config(num_queries))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def pixels(img) -> torch.Tensor:
    """(3, SIZE, SIZE) float: the image normalised as the model takes it (ImageNet mean and std)."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def target(t: dict) -> dict:
    """A shapes target as transformers' DETR loss takes it: class_labels and boxes (cx, cy, w, h) / SIZE."""
    b = torch.tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4) / SIZE
    return {"class_labels": torch.tensor(t["labels"], dtype=torch.long),
            "boxes": torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0],
                                  b[:, 3] - b[:, 1]], -1)}


def batch(split: str, indices) -> tuple[torch.Tensor, list[dict]]:
    items = [sample(split, int(i)) for i in indices]
    return torch.stack([pixels(img) for img, _ in items]), [t for _, t in items]


@torch.no_grad()
def set_frozen_norms(model, x: torch.Tensor) -> None:
    """Each frozen BatchNorm of the backbone, in the order the forward meets them, given the mean and variance of
    what it gets on x: at initialisation every norm then normalises (a from-scratch ResNet with identity norms
    does not train). Buffers only: they are saved with the model."""
    norms = [m for m in model.modules() if type(m).__name__.endswith("FrozenBatchNorm2d")]
    for norm in norms:
        seen = {}
        handle = norm.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        try:
            model.model.backbone.model(x)
        finally:
            handle.remove()
        got = seen["x"]
        norm.running_mean.copy_(got.mean((0, 2, 3)))
        norm.running_var.copy_(got.var((0, 2, 3)) + 1e-5)


def detections(logits: torch.Tensor, boxes: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image: (scores (K,), labels (K,), boxes (K, 4) x0 y0 x1 y1 in pixels) of every (query, class) pair,
    scores the sigmoid of its logit (Conditional DETR's focal classification: no "no object" class)."""
    prob = logits.sigmoid()  # (B, Q, C)
    out = []
    for p, b in zip(prob, boxes):
        cx, cy, w, h = b.unbind(-1)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * SIZE  # (Q, 4)
        q, c = p.shape
        out.append((p.reshape(-1).numpy(), np.tile(np.arange(c), q), xyxy.repeat_interleave(c, 0).numpy()))
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of boxes x0 y0 x1 y1."""
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.clip(area(a)[:, None] + area(b)[None, :] - inter, 1e-9, None)


def average_precision(dets: list, targets: list[dict], threshold: float = 0.5) -> dict:
    """PASCAL VOC's AP at an IoU threshold (all-point interpolated precision over recall), per class and their
    mean: every image's detections ranked by score within a class, each matched greedily to the unmatched ground
    truth box it overlaps most (IoU >= threshold), else a false positive."""
    per_class = {}
    for c in range(len(CLASSES)):
        scored, positives = [], 0
        for (scores, labels, boxes), t in zip(dets, targets):
            gt = np.array([b for b, k in zip(t["boxes"], t["labels"]) if k == c], dtype=np.float64).reshape(-1, 4)
            positives += len(gt)
            keep = labels == c
            for s, b in zip(scores[keep], boxes[keep]):
                scored.append((float(s), len(scored), b, gt))
        if positives == 0:
            continue
        scored.sort(key=lambda r: -r[0])
        used: dict[int, set] = {}
        tp = np.zeros(len(scored))
        for i, (_, _, b, gt) in enumerate(scored):
            if len(gt) == 0:
                continue
            iou = box_iou(b[None], gt)[0]
            taken = used.setdefault(id(gt), set())
            iou[list(taken)] = -1
            j = int(iou.argmax())
            if iou[j] >= threshold:
                tp[i] = 1
                taken.add(j)
        ctp = np.cumsum(tp)
        recall = ctp / positives
        precision = ctp / np.arange(1, len(tp) + 1)
        mrec = np.concatenate([[0], recall, [1]])
        mpre = np.concatenate([[0], precision, [0]])
        for i in range(len(mpre) - 2, -1, -1):
            mpre[i] = max(mpre[i], mpre[i + 1])
        steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
        per_class[CLASSES[c]] = float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    return {"ap": float(np.mean(list(per_class.values()))), "per_class": per_class}


@torch.no_grad()
def evaluate(model, count: int = VAL_COUNT, batch_size: int = 25) -> dict:
    """AP50 (and AP75) on the first `count` held-out images."""
    model.eval()
    dets, targets = [], []
    for start in range(0, count, batch_size):
        x, ts = batch("val", range(start, min(count, start + batch_size)))
        out = model(pixel_values=x)
        dets += detections(out.logits, out.pred_boxes)
        targets += ts
    ap50, ap75 = average_precision(dets, targets, 0.5), average_precision(dets, targets, 0.75)
    return {"images": count, "ap50": ap50["ap"], "ap50_per_class": ap50["per_class"], "ap75": ap75["ap"]}


@torch.no_grad()
def attention_report(model, count: int = VAL_COUNT, seed: int = 0) -> dict:
    """Where the last decoder layer's object queries look, on the first `count` held-out images: each ground-truth
    object is matched to the query whose predicted box overlaps it most (IoU >= 0.5, a query at most once), and
    that query's map (the mean over heads, `vggattn.tokens.token_maps`) is measured against the object's box
    (`vggattn.tokens.box_shares`: its weight inside the box, and on the band one cell either side of the box's
    edge, each beside that region's share of the image's cells). Means over the matched objects, each with a
    bootstrap 95% interval over them."""
    from ..models.byo import describe
    from ..tokens import box_shares, token_maps
    from .shapes import sample as shape

    model.eval()
    meta = describe("shapes detector", SIZE, list(CLASSES), IMAGENET_MEAN, IMAGENET_STD)
    rows, objects, last = [], 0, None
    for i in range(count):
        img, t = shape("val", i)
        found = token_maps(model, meta, img)
        last = list(found.rows)[-1]
        boxes = np.array([found.predictions[n]["box"] for n in found.names])
        taken = set()
        for box, label in zip(t["boxes"], t["labels"]):
            objects += 1
            iou = box_iou(np.array([box], dtype=np.float64), boxes)[0]
            iou[list(taken)] = -1
            q = int(iou.argmax())
            if iou[q] < 0.5:
                continue
            taken.add(q)
            grid_map = found.map(found.names[q])[last]
            rows.append({**box_shares(grid_map, box, found.input_wh), "class": CLASSES[label]})
    rng = np.random.default_rng(seed)

    def mean_ci(key):
        v = np.array([r[key] for r in rows])
        boot = [float(v[rng.integers(0, len(v), len(v))].mean()) for _ in range(2000)]
        return [round(float(v.mean()), 4), round(float(np.percentile(boot, 2.5)), 4),
                round(float(np.percentile(boot, 97.5)), 4)]
    return {"images": count, "objects": objects, "matched": len(rows), "layer": last,
            **({k: mean_ci(k) for k in rows[0] if k != "class"} if rows else {})}


def train(args) -> None:
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = build(args.queries)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    step = 0
    last = out / "last.pt"
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        log.info("resumed at step %d", step)
    else:
        x, _ = batch("train", range(10_000_000, 10_000_064))  # (indices no training step draws)
        set_frozen_norms(model, x)
    t0 = time.time()
    while step < args.steps:
        lr = args.lr * (0.1 if step >= int(args.steps * 0.8) else 1.0) * min(1.0, (step + 1) / 200)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        picks = np.random.default_rng([args.seed, step]).integers(0, args.train_images, size=args.batch_size)
        x, ts = batch("train", picks)  # (a function of the step: a resumed run draws what it would have)
        loss = model(pixel_values=x, labels=[target(t) for t in ts]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        step += 1
        if step % 50 == 0:
            line = {"step": step, "loss": round(float(loss), 4), "lr": lr, "seconds": round(time.time() - t0, 1)}
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            log.info("%s", line)
        if step % args.save_every == 0 or step == args.steps:
            atomic_write(last, lambda p: torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                     "step": step, "args": vars(args)}, p))
            if step % args.eval_every == 0 or step == args.steps:
                m = evaluate(model, count=args.eval_images)
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **m}) + "\n")
                log.info("step %d: AP50 %.3f on %d held-out images", step, m["ap50"], m["images"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run folder (resumed where it holds last.pt)")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--queries", type=int, default=12)
    p.add_argument("--train-images", type=int, default=20000, help="training images drawn from (seeded, on the fly)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-images", type=int, default=200)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--evaluate-only", action="store_true",
                   help="no training: AP50 and AP75 on the held-out split and where the matched queries look "
                        "(`attention_report`), into --out/metrics.json")
    p.add_argument("--export", metavar="FOLDER", help="no training: write the model (save_pretrained) and its "
                                                      "metrics.json (when evaluated) into FOLDER")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).expanduser()
    if args.evaluate_only or args.export:
        model = build(args.queries)
        state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        model.eval()
        if args.evaluate_only:
            t0 = time.time()
            metrics = {"step": state["step"], **evaluate(model), "attention": attention_report(model),
                       "seconds": None}
            metrics["seconds"] = round(time.time() - t0, 1)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            print(json.dumps(metrics, indent=2))
        if args.export:
            folder = Path(args.export)
            model.save_pretrained(folder)
            if (out / "metrics.json").exists():
                (folder / "metrics.json").write_text((out / "metrics.json").read_text())
        return 0
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
