"""Train an attention-VGG16 on an ImageFolder root (with train/ and val/).

    python -m vggattn.training.train --data ../shared/data/imagenette2-224 --names ../shared/data/README.md \
        --width 0.25 --hidden 256 --input-size 128 --epochs 30 --out ~/runs/w025
    torchrun --nproc_per_node=2 -m vggattn.training.train ...        # DistributedDataParallel (gloo/nccl)

Writes into --out: `last.pt` (full resumable state, every epoch), `best.safetensors` (the best
epoch by val top-1, BatchNorm folded into the convs: the article's exact layout) and `log.jsonl`
(one JSON line per epoch, with the three gammas). All files are written atomically; only rank 0
writes. `--resume` continues after the last saved epoch with optimizer and scheduler state.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m: the flags first, so --help needs none of the imports below
    from vggattn.cli import train_args

    train_args()

import argparse
import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..models.checkpoint import (BAD_INPUT, IMAGENET_MEAN, IMAGENET_STD, CheckpointError, atomic_write, load_checkpoint, resolve_device,
                         save_checkpoint)
from ..cli import train_args
from ..data import eval_transform, load_rgb, per_class_subset, train_transform
from ..models.vgg import (ARTICLE_ATTENTION_NAMES, ModelConfig, VGG16WithAttention, fold_batchnorm, from_torchvision, gammas,
                    unfold_batchnorm)

log = logging.getLogger("vggattn.training.train")


# What a resumed run must share with the run it continues (the schedule and model depend on them)
RECIPE_KEYS = ("width", "hidden", "dropout", "input_size", "train_size", "no_attention", "global_attention", "no_batch_norm", "init",
               "epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "schedule", "warmup_epochs",
               "label_smoothing", "seed", "limit_per_class")


class TrainingError(RuntimeError):
    """A run that cannot start or must stop (bad flags, offline --init imagenet, NaN loss)."""


def shareable_recipe(args) -> dict:
    """The flags a checkpoint records: paths of this machine (data, out, names, init) as their last part only."""
    paths = ("data", "out", "names", "init")
    return {k: (Path(v).name if k in paths and v else v) for k, v in vars(args).items() if k != "resume"}


parse_args = train_args


def read_class_names(path: str | None, folders: list[str]) -> list[str]:
    """Human class names in folder order, from a names file; folder names where none is given."""
    if not path:
        return list(folders)
    mapping = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") \
            else line.strip().split(None, 1)
        if len(cells) == 2 and cells[0] in folders:
            mapping[cells[0]] = cells[1]
    missing = [f for f in folders if f not in mapping]
    if missing:
        raise TrainingError(f"names file {path} has no name for folders {missing}")
    return [mapping[f] for f in folders]


def model_config(args, num_classes: int) -> ModelConfig:
    """The network the flags describe, built once per run (what `build_model` and the checkpoint use)."""
    if args.no_attention and args.global_attention:
        raise TrainingError("--no-attention and --global-attention exclude each other")
    attention = "global" if args.global_attention else not args.no_attention
    if args.init == "imagenet":  # torchvision's VGG16: full width, the article's classifier, no BatchNorm
        return ModelConfig(num_classes, 1.0, 4096, 0.5, attention, batch_norm=False)
    return ModelConfig(num_classes, args.width, args.hidden, args.dropout, attention, batch_norm=not args.no_batch_norm)


def build_model(config: ModelConfig, init: str = "random", init_batch: torch.Tensor | None = None) -> VGG16WithAttention:
    """A fresh model of `config`; init "imagenet": torchvision's VGG16 weights with a new head; a path:
    warm-started from that checkpoint (`init_batch` sets BatchNorms it folded away; None on resume)."""
    if init == "imagenet":
        from torchvision.models import VGG16_Weights, vgg16

        try:
            tv = vgg16(weights=VGG16_Weights.IMAGENET1K_V1)
        except Exception as e:
            raise TrainingError(f"--init imagenet could not get torchvision's VGG16 weights (offline?): {e}") from None
        model = from_torchvision(tv)
        model.classifier[6] = nn.Linear(model.config.hidden, config.num_classes)
        model.config.num_classes = config.num_classes
        return model
    model = VGG16WithAttention(**config.to_dict())
    if init != "random" and init_batch is not None:  # a resumed run loads last.pt instead
        model = warm_start(model, init, init_batch)
    return model


def warm_start(model: VGG16WithAttention, path: str, batch: torch.Tensor) -> VGG16WithAttention:
    """Load a vggattn checkpoint (--init PATH) into the freshly built model of the same shape.

    `batch`: training images that set the statistics of BatchNorms the checkpoint has folded away.
    """
    try:
        source, _ = load_checkpoint(path, device="cpu")
    except (CheckpointError, OSError) as e:
        raise TrainingError(f"--init {path}: {e}") from None
    want = {k: getattr(model.config, k) for k in ("num_classes", "width", "hidden", "attention")}
    have = {k: getattr(source.config, k) for k in want}
    if want != have:
        raise TrainingError(f"--init {path} is a model with {have}; these flags build {want}")
    if model.config.batch_norm and not source.config.batch_norm:
        source = unfold_batchnorm(source, batch)
    elif source.config.batch_norm != model.config.batch_norm:
        source = fold_batchnorm(source.eval())
    model.load_state_dict(source.state_dict())
    return model


def make_optimizer(args, model: nn.Module, steps_per_epoch: int):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # biases, BN, gamma: no weight decay
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=args.lr)
    else:
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    total = args.epochs * steps_per_epoch
    if args.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.25)
    else:
        warm = max(1, int(args.warmup_epochs * steps_per_epoch))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, total - warm)))))
    return opt, sched


@torch.no_grad()
def evaluate_split(model: nn.Module, loader: DataLoader, device: torch.device, autocast, num_classes: int) -> dict:
    """Loss, top-1, top-5 and per-class counts over a loader (summed over DDP ranks)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss*n, top1, top5, n
    per_class = torch.zeros(2, num_classes, dtype=torch.float64)  # correct, total
    for x, y in loader:
        x, y = to_device(x, y, device)
        with autocast():
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices  # (B, k)
        hit1 = (topk[:, 0] == y)
        sums += torch.tensor([nn.functional.cross_entropy(logits, y, reduction="sum").item(), hit1.sum().item(),
                              (topk == y[:, None]).any(1).sum().item(), len(y)], dtype=torch.float64)
        per_class[0].index_add_(0, y.cpu(), hit1.cpu().double())
        per_class[1].index_add_(0, y.cpu(), torch.ones(len(y), dtype=torch.float64))
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(per_class)
    n = max(sums[3].item(), 1)
    return {"loss": sums[0].item() / n, "top1": sums[1].item() / n, "top5": sums[2].item() / n, "n": int(sums[3].item()),
            "per_class": (per_class[0] / per_class[1].clamp(min=1)).tolist()}


def article_named_gammas(model: VGG16WithAttention) -> dict[str, float]:
    """Gammas keyed by the article's layer names (BatchNorm shifts the indices while training)."""
    if not model.config.attention:
        return {}
    return dict(zip(ARTICLE_ATTENTION_NAMES, gammas(model).values()))


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX; elsewhere bf16 autocast is emulated and slower than fp32
    (measured on an AVX2 EPYC: checkpoints/README.md, the quarter-width card)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def to_device(x, y, device):
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def save_training_state(path: Path, model, opt, sched, scaler, epoch: int, best: dict, history: list, meta: dict, args) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch, "best": best,
             "history": history, "meta": meta, "args": vars(args)}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def write_log(path: Path, history: list[dict]) -> None:
    text = "".join(json.dumps(h) + "\n" for h in history)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def run(argv=None) -> dict:
    """Parse the flags, join the DDP group when launched by torchrun, train -> {"best", "history"}."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = resolve_device(args.device)
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        return train(args, device, rank, world)
    finally:
        if distributed:
            dist.destroy_process_group()


def main(argv=None) -> int:
    """The `vggattn-train` command: 0 when training ends, 2 with one line when it cannot start or must stop."""
    try:
        run(argv)
    except TrainingError as e:
        log.error("error: %s", e)
        return BAD_INPUT
    return 0


@dataclass
class Run:
    """Everything one training run holds, made once by `setup` (timm's train script keeps these as locals)."""

    args: argparse.Namespace
    config: ModelConfig
    device: torch.device
    rank: int
    world: int
    out: Path
    root: Path
    train_ds: object
    train_loader: DataLoader
    val_loader: DataLoader
    sampler: object
    generator: torch.Generator
    model: nn.Module  # DDP-wrapped when world > 1
    raw_model: VGG16WithAttention
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    autocast: object
    meta: dict
    start_epoch: int = 0
    best: dict = field(default_factory=lambda: {"top1": -1.0, "epoch": -1})
    history: list = field(default_factory=list)


def train(args, device: torch.device, rank: int, world: int) -> dict:
    """Epochs from `setup`'s start to --epochs (train, validate, keep the best), then the final steps."""
    job = setup(args, device, rank, world)
    for epoch in range(job.start_epoch, args.epochs):
        t0 = time.perf_counter()
        stats = train_one_epoch(job, epoch)
        val = evaluate_split(job.model, job.val_loader, device, job.autocast, job.config.num_classes)
        job.history.append({"epoch": epoch + 1, **stats, "val_loss": val["loss"], "val_top1": val["top1"],
                            "val_top5": val["top5"], "lr": job.opt.param_groups[0]["lr"],
                            "epoch_s": time.perf_counter() - t0, "gammas": article_named_gammas(job.raw_model)})
        if rank == 0:
            log.info(json.dumps(job.history[-1]))
            if val["top1"] > job.best["top1"]:
                job.best = {"top1": val["top1"], "top5": val["top5"], "epoch": epoch + 1, "per_class": val["per_class"]}
                export(job.raw_model, job.meta, job.history, job.best, job.out / "best.safetensors")
            save_training_state(job.out / "last.pt", job.raw_model, job.opt, job.sched, job.scaler, epoch, job.best,
                                job.history, job.meta, args)
            write_log(job.out / "log.jsonl", job.history)
        if world > 1:
            dist.barrier()
    if args.recalibrate_bn and job.raw_model.config.batch_norm and job.history:
        recalibrate_and_export(job)
    if world > 1:
        check_ranks_agree(job.raw_model, rank, world)
    return {"best": job.best, "history": job.history}


def setup(args, device: torch.device, rank: int, world: int) -> Run:
    """Check the flags and data, then build the datasets, loaders, model, optimizer and schedule, and
    restore them from OUT/last.pt with --resume."""
    from torchvision.datasets import ImageFolder  # (torchvision: 2 s to import, only here)

    out, root = Path(args.out).expanduser(), Path(args.data)
    if args.init not in ("random", "imagenet") and not Path(args.init).is_file():
        raise TrainingError(f"--init {args.init}: no such file (use random, imagenet or a checkpoint path)")
    if args.init == "imagenet" and (args.width != 1.0 or not args.no_batch_norm or args.no_attention):
        raise TrainingError("--init imagenet needs --width 1 --no-batch-norm (torchvision's VGG16 layout) and attention on")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise TrainingError(f"{root / split} is not a directory: --data needs an ImageFolder root with train/ and val/")
    if args.resume and not (out / "last.pt").is_file():
        raise TrainingError(f"--resume: {out / 'last.pt'} does not exist")
    torch.manual_seed(args.seed)

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    train_ds = ImageFolder(root / "train", transform=train_transform(args.train_size or args.input_size, mean, std), loader=load_rgb)
    class_names, class_ids = read_class_names(args.names, train_ds.classes), list(train_ds.classes)
    config = model_config(args, len(class_names))
    val_ds = ImageFolder(root / "val", transform=eval_transform({"input_size": args.input_size, "mean": mean, "std": std}),
                         loader=load_rgb)
    if val_ds.classes != train_ds.classes:
        raise TrainingError("train/ and val/ have different class folders")
    train_ds, val_ds = per_class_subset(train_ds, args.limit_per_class), per_class_subset(val_ds, args.limit_per_class)
    val_shard = Subset(val_ds, list(range(rank, len(val_ds), world)))  # exact split, no padding

    init_batch = None
    if args.init not in ("random", "imagenet") and not args.resume:  # BatchNorm statistics for a warm start
        init_batch = torch.stack([train_ds[i][0] for i in torch.randperm(len(train_ds))[:256].tolist()])
    raw_model = build_model(config, args.init, init_batch).to(device).to(memory_format=torch.channels_last)
    model = raw_model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    use_amp = args.precision == "bf16" or (args.precision == "auto" and (device.type == "cuda" or cpu_has_native_bf16()))
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16

    sampler = torch.utils.data.DistributedSampler(train_ds, world, rank, shuffle=True, seed=args.seed) if world > 1 else None
    generator = torch.Generator().manual_seed(args.seed)
    loader_kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda")  # fresh workers each epoch: seeded from generator
    train_loader = DataLoader(train_ds, args.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
                              drop_last=len(train_ds) >= args.batch_size * world * 2, **loader_kw)
    val_loader = DataLoader(val_shard, args.batch_size * 2, shuffle=False, **loader_kw)
    opt, sched = make_optimizer(args, raw_model, len(train_loader))
    meta = {"class_names": class_names, "class_ids": class_ids,
            "input_size": args.input_size, "mean": mean, "std": std, "config": raw_model.config.to_dict(),
            "training": {"dataset": root.name, "recipe": shareable_recipe(args)}}
    job = Run(args, config, device, rank, world, out, root, train_ds, train_loader, val_loader, sampler, generator, model, raw_model,
            opt, sched, torch.amp.GradScaler("cuda") if (use_amp and device.type == "cuda") else None,
            (lambda: torch.autocast(device.type, dtype=amp_dtype)) if use_amp else contextlib.nullcontext, meta)
    if args.resume:
        resume(job)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # a run killed mid-write leaves its temp file; the real files are whole
            stale.unlink()
        log.info("model %s, %d train / %d val images, %d classes, device %s, world %d, %s", raw_model.config,
                 len(train_ds), len(val_ds), config.num_classes, device, world, f"autocast {amp_dtype}" if use_amp else "fp32")
    return job


def resume(job: Run) -> None:
    """Restore model, optimizer, schedule, scaler, best and history from OUT/last.pt (same recipe only)."""
    state = torch.load(job.out / "last.pt", map_location="cpu", weights_only=True)
    changed = [f"--{k.replace('_', '-')} {state['args'][k]} -> {getattr(job.args, k)}" for k in RECIPE_KEYS
               if k in state["args"] and state["args"][k] != getattr(job.args, k)]
    if changed:
        raise TrainingError(f"--resume with a different recipe than {job.out / 'last.pt'} was trained with: "
                            f"{', '.join(changed)}")
    job.raw_model.load_state_dict(state["model"])
    job.opt.load_state_dict(state["optimizer"])
    job.sched.load_state_dict(state["scheduler"])
    if job.scaler is not None and state["scaler"]:
        job.scaler.load_state_dict(state["scaler"])
    job.start_epoch, job.best, job.history = state["epoch"] + 1, state["best"], state["history"]
    job.meta["training"]["wall_s_before_resume"] = sum(h["epoch_s"] for h in job.history)
    if job.rank == 0:
        log.info("resumed from %s at epoch %d (best top-1 %.4f at epoch %d)", job.out / "last.pt", job.start_epoch,
                 job.best["top1"], job.best["epoch"])


def train_one_epoch(job: Run, epoch: int) -> dict:
    """One pass over the training set -> {"train_loss", "train_top1", "images_per_s"} (over all ranks)."""
    # Seed per epoch (shuffle, augmentation, dropout), so a resumed run repeats an uninterrupted one
    torch.manual_seed(job.args.seed * 100_003 + epoch)
    job.generator.manual_seed(job.args.seed * 100_003 + epoch)
    if job.sampler is not None:
        job.sampler.set_epoch(epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=job.args.label_smoothing)
    job.model.train()
    t0 = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(job.train_loader, desc=f"epoch {epoch + 1}/{job.args.epochs}", disable=job.rank != 0, mininterval=2.0, leave=False)
    for x, y in bar:
        x, y = to_device(x, y, job.device)
        with job.autocast():
            logits = job.model(x)
            loss = criterion(logits.float(), y)
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1}; stopping. "
                                f"The last good checkpoint is kept in {job.out} (try a lower --lr)")
        job.opt.zero_grad(set_to_none=True)
        if job.scaler is not None:
            job.scaler.scale(loss).backward()
            job.scaler.step(job.opt)
            job.scaler.update()
        else:
            loss.backward()
            job.opt.step()
        job.sched.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                        img_s=f"{seen * job.world / (time.perf_counter() - t0):.0f}")
    train_s = time.perf_counter() - t0
    stats = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
    if job.world > 1:
        dist.all_reduce(stats)
    return {"train_loss": stats[0].item() / stats[2].item(), "train_top1": stats[1].item() / stats[2].item(),
            "images_per_s": stats[2].item() / train_s}


def recalibrate_and_export(job: Run) -> None:
    """--recalibrate-bn: BatchNorm statistics re-estimated on training images seen as at inference;
    the result is exported as best.safetensors when it beats the best epoch."""
    args = job.args
    meta_eval = {"input_size": args.input_size, "mean": job.meta["mean"], "std": job.meta["std"]}
    recalibrate_batchnorm(job.raw_model, limit_total(train_ds_plain(job.root, meta_eval, args), args.recalibrate_bn, args.seed),
                          job.device, job.autocast, args.batch_size, args.workers)
    val = evaluate_split(job.model, job.val_loader, job.device, job.autocast, job.config.num_classes)
    job.history[-1].update({"val_top1_bn_recalibrated": val["top1"], "val_top5_bn_recalibrated": val["top5"],
                          "bn_recalibration_images": args.recalibrate_bn})
    if job.rank == 0:
        log.info("BatchNorm recalibrated at %d px on %d train images: val top-1 %.4f (was %.4f at epoch %d)",
                 args.input_size, args.recalibrate_bn, val["top1"], job.history[-1]["val_top1"], job.history[-1]["epoch"])
        if val["top1"] > job.best["top1"]:
            job.best = {"top1": val["top1"], "top5": val["top5"], "epoch": job.history[-1]["epoch"],
                      "per_class": val["per_class"], "bn_recalibrated": args.recalibrate_bn}
            export(job.raw_model, job.meta, job.history, job.best, job.out / "best.safetensors")
        write_log(job.out / "log.jsonl", job.history)


def check_ranks_agree(model: nn.Module, rank: int, world: int) -> None:
    """DDP must leave every rank with the same weights; check rather than trust."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).cpu()
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    if rank == 0:
        agree = all(torch.equal(t, gathered[0]) for t in gathered)
        log.info("DDP: parameters of all %d ranks %s (checksums %s)", world, "agree" if agree else "DIFFER",
                 [f"{t.item():.10g}" for t in gathered])
        if not agree:
            raise TrainingError("DDP ranks ended with different weights")


def train_ds_plain(root: Path, meta_eval: dict, args):
    """The training images as the model sees them at inference (whole image at the input size)."""
    from torchvision.datasets import ImageFolder  # (torchvision: 2 s to import, only here)

    return ImageFolder(root / "train", transform=eval_transform(meta_eval), loader=load_rgb)


def limit_total(ds, n: int, seed: int) -> Subset:
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:n].tolist())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, ds, device, autocast, batch_size: int, workers: int) -> None:
    """Re-estimate every BatchNorm's running mean/var as a plain average over `ds` (weights untouched)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for x, _ in DataLoader(ds, batch_size, num_workers=workers):
        with autocast():
            model(x.to(device).contiguous(memory_format=torch.channels_last))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()


def export(model: VGG16WithAttention, meta: dict, history: list, best: dict, path: Path) -> None:
    """Fold BatchNorm (exact in eval mode) and save the article-layout model with its meta."""
    was_training = model.training
    model.eval()
    folded = fold_batchnorm(model).eval().to(memory_format=torch.contiguous_format)
    model.train(was_training)
    last = history[-1]
    training = {**meta["training"], "epochs": len(history), "best_epoch": best["epoch"],
                "val_top1": best["top1"], "val_top5": best["top5"], "val_per_class": best["per_class"],
                "wall_s": sum(h["epoch_s"] for h in history), "gammas": last["gammas"],
                "bn_recalibration_images": best.get("bn_recalibrated", 0),
                "trained_with_batch_norm_folded": model.config.batch_norm}
    save_checkpoint(folded, {**meta, "config": folded.config.to_dict(), "training": training}, path)


if __name__ == "__main__":
    raise SystemExit(main())
