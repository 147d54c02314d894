"""Train on one CUDA GPU with the whole dataset in GPU memory: the 224 px candidate and the A/B arms.

    python scripts/pack_gpu_data.py --data ../shared/data/imagenette2-224 --out .gpu     # here
    PYTHONPATH=. python scripts/gpu_train.py --data .gpu --out OUT --deadline-s 480     # there (vggattn not installed)

Decodes the packed WebP files once (scripts/pack_gpu_data.py), then
1. `--ab`: the A/B arms (attention / none / query-averaged "global"), `--seeds` each, one process per
   run sharing the GPU, at the CPU A/B scale (quarter width, 96 px crops, 128 px input, 16 epochs);
2. the main run: width 0.5 (hidden 128) at 224 px, 192 px crops, epochs chosen from a measured step
   time so that it ends before the deadline; BatchNorm folded on export (the article's layout);
   temperature fitted on 5% of train held out from training (every 20th image).
bf16 autocast, channels_last, random-resized crop and flip done on the GPU. Val numbers here come
from the WebP copies; the card's numbers come from `vggattn.training.evaluate` on the original JPEGs.
Writes into OUT: main.log.jsonl, ab.log.jsonl, summary.json, and the main checkpoint split in two
files (main.features.safetensors, main.rest.safetensors: each under the tool's 16 MiB per file);
`--join` puts them back together.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vggattn.models.checkpoint import IMAGENET_MEAN, IMAGENET_STD, save_checkpoint
from vggattn.training.evaluate import expected_calibration_error, fit_temperature
from vggattn.models.vgg import ARTICLE_ATTENTION_NAMES, VGG16WithAttention, fold_batchnorm, gammas

NAMES = ["tench", "English springer", "cassette player", "chain saw", "church", "French horn", "garbage truck",
         "gas pump", "golf ball", "parachute"]  # ../shared/data/README.md, in wnid order
ARMS = {"attention": True, "none": False, "global": "global"}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a quick check of this script


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# -- data ------------------------------------------------------------------------------------------

def decode(blob: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB"))


def load_packed(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """-> (images (n, H, W, 3) uint8, labels (n,), classes, files), all parts concatenated."""
    images, labels, files, classes = [], [], [], None
    for path in paths:
        z = np.load(path)
        blob, offsets = z["blob"].tobytes(), z["offsets"]
        with ThreadPoolExecutor(16) as pool:
            images += list(pool.map(decode, [blob[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]))
        labels.append(z["labels"].astype(np.int64))
        files += z["files"].tolist()
        classes = z["classes"].tolist()
    return np.stack(images), np.concatenate(labels), classes, files


def find_parts(dirs: list[Path], pattern: str) -> list[Path]:
    found = {}
    for d in dirs:
        for p in sorted(d.glob(pattern)):
            found.setdefault(p.name, p)
    return [found[k] for k in sorted(found)]


MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in 0..255 -> normalised, channels_last."""
    return ((x - MEAN.to(x.device)) / STD.to(x.device)).contiguous(memory_format=torch.channels_last)


def random_resized_crop(images: torch.Tensor, size: int, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop + horizontal flip, per image, on the GPU: (B, H, W, 3) uint8 ->
    (B, 3, size, size) normalised. One affine grid per image (bilinear, no antialiasing)."""
    B = images.shape[0]
    dev = images.device
    area = torch.empty(B, device=dev).uniform_(*scale)
    log_r = torch.empty(B, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)  # crop width as a fraction of the side
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    cx = (torch.rand(B, device=dev) * 2 - 1) * (1 - w)  # crop centre in [-1, 1] coordinates
    cy = (torch.rand(B, device=dev) * 2 - 1) * (1 - h)
    flip = torch.where(torch.rand(B, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    return normalize(F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False))


def whole_image(images: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view (vggattn.data.eval_transform): the whole image resized to size x size."""
    x = images.permute(0, 3, 1, 2).float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x.round().clamp(0, 255))  # torchvision resizes uint8 to uint8


# -- training --------------------------------------------------------------------------------------

@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, size: int, batch: int = 250) -> torch.Tensor:
    model.eval()
    out = []
    for s in range(0, len(images), batch):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out.append(model(whole_image(images[s:s + batch], size)).float())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    top5 = logits.topk(5, dim=1).indices
    per_class = [float((top5[labels == c, 0] == c).float().mean()) for c in range(logits.shape[1])]
    return {"top1": float((top5[:, 0] == labels).float().mean()), "top5": float((top5 == labels[:, None]).any(1).float().mean()),
            "per_class": per_class}


def build(cfg: dict) -> tuple[VGG16WithAttention, torch.optim.Optimizer]:
    """The run's model (BatchNorm, channels_last, seeded) and its AdamW (no decay on biases, BatchNorm, gamma)."""
    torch.manual_seed(cfg["seed"])
    model = VGG16WithAttention(len(NAMES), width=cfg["width"], hidden=cfg["hidden"], dropout=cfg["dropout"],
                               attention=ARMS[cfg["arm"]], batch_norm=True).to(DEVICE).to(memory_format=torch.channels_last)
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=cfg["lr"], fused=DEVICE == "cuda")


def train(cfg: dict, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
          log_file: Path, deadline: float | None = None) -> tuple[VGG16WithAttention, list[dict]]:
    """One run of the recipe in `cfg`; one JSON line per epoch into log_file."""
    steps = max(1, len(train_x) // cfg["batch_size"])
    epochs = cfg["epochs"]
    if epochs == "auto":  # measure a step on a throw-away model, then fit the schedule into the time left
        probe, probe_opt = build(cfg)
        probe_model_step(probe, probe_opt, train_x, train_y, cfg, 5)
        sync()
        t = time.perf_counter()
        probe_model_step(probe, probe_opt, train_x, train_y, cfg, 20)
        sync()
        step_s = (time.perf_counter() - t) / 20
        budget = deadline - time.perf_counter()
        epochs = int(max(1, min(cfg["max_epochs"], budget / (step_s * steps * 1.08 + 0.6))))
        log(f"{cfg['name']}: {step_s * 1000:.1f} ms/step, {budget:.0f} s left -> {epochs} epochs")
        del probe, probe_opt
    model, opt = build(cfg)
    cfg["epochs_run"] = epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=epochs * steps, pct_start=0.25)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    history = []
    g = torch.Generator(device=DEVICE).manual_seed(cfg["seed"])
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train_x), device=DEVICE, generator=g)
        loss_sum = torch.zeros((), device=DEVICE)
        for s in range(steps):
            idx = order[s * cfg["batch_size"]:(s + 1) * cfg["batch_size"]]
            x, y = random_resized_crop(train_x[idx], cfg["train_size"]), train_y[idx]
            with torch.autocast(DEVICE, dtype=torch.bfloat16):
                loss = criterion(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach()
        sync()
        record = {"run": cfg["name"], "epoch": epoch + 1, "train_loss": float(loss_sum) / steps,
                  "epoch_s": time.perf_counter() - t0, "images_per_s": steps * cfg["batch_size"] / (time.perf_counter() - t0),
                  "lr": opt.param_groups[0]["lr"], "gammas": dict(zip(ARTICLE_ATTENTION_NAMES, gammas(model).values()))}
        if (epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == epochs:
            record.update({f"val_{k}": v for k, v in accuracy(logits_of(model, val_x, cfg["input_size"]), val_y).items()
                           if k != "per_class"})
        history.append(record)
        with open(log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if cfg.get("verbose"):
            log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}))
    return model.eval(), history


def probe_model_step(model, opt, train_x, train_y, cfg, n):
    criterion = nn.CrossEntropyLoss()
    model.train()
    for _ in range(n):
        idx = torch.randint(0, len(train_x), (cfg["batch_size"],), device=DEVICE)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = criterion(model(random_resized_crop(train_x[idx], cfg["train_size"])).float(), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


AB_RECIPE = {"width": 0.25, "hidden": 256, "dropout": 0.3, "input_size": 128, "train_size": 96, "epochs": 16,
             "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05, "label_smoothing": 0.1, "eval_every": 4}
MAIN_RECIPE = {"name": "main", "arm": "attention", "seed": 0, "width": 0.5, "hidden": 128, "dropout": 0.3,
               "input_size": 224, "train_size": 192, "epochs": "auto", "max_epochs": 80, "batch_size": 128, "lr": 2e-3,
               "weight_decay": 0.05, "label_smoothing": 0.1, "eval_every": 5, "verbose": True}


def export_split(model: VGG16WithAttention, meta: dict, out: Path) -> None:
    """Fold BatchNorm, then save the checkpoint as two files (features / the rest), each < 16 MiB."""
    from safetensors.torch import save_file

    folded = fold_batchnorm(model.eval().float()).eval().to(memory_format=torch.contiguous_format)
    full = out / "main.tmp.safetensors"
    save_checkpoint(folded, meta, full)
    from safetensors import safe_open

    with safe_open(str(full), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v for k, v in state.items() if k.startswith("features.")}, str(out / "main.features.safetensors"),
              metadata=metadata)
    save_file({k: v for k, v in state.items() if not k.startswith("features.")}, str(out / "main.rest.safetensors"),
              metadata=metadata)
    full.unlink()


def join(parts: list[Path], target: Path) -> None:
    """Put the two exported halves back into one checkpoint file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    state, metadata = {}, None
    for p in parts:
        with safe_open(str(p), framework="pt") as f:
            metadata = metadata or f.metadata()
            state.update({k: f.get_tensor(k) for k in f.keys()})
    save_file(state, str(target), metadata=metadata)


def ab_worker(args) -> int:
    """One A/B run in its own process (several share the GPU)."""
    arm, seed = args.ab_run.split(":")
    data = np.load(args.shm / "train.npz")
    vdata = np.load(args.shm / "val.npz")
    tx, ty = torch.from_numpy(data["x"]).to(DEVICE), torch.from_numpy(data["y"]).to(DEVICE)
    vx, vy = torch.from_numpy(vdata["x"]).to(DEVICE), torch.from_numpy(vdata["y"]).to(DEVICE)
    cfg = {**AB_RECIPE, "name": f"ab-{arm}-seed{seed}", "arm": arm, "seed": int(seed), "epochs": args.ab_epochs}
    t0 = time.perf_counter()
    model, history = train(cfg, tx, ty, vx, vy, args.out / f"ab-{arm}-seed{seed}.jsonl")
    summary = {"run": cfg["name"], "arm": arm, "seed": int(seed), "val_top1": history[-1]["val_top1"],
               "val_top5": history[-1]["val_top5"], "wall_s": time.perf_counter() - t0, "recipe": cfg,
               "gammas": history[-1]["gammas"]}
    (args.out / f"ab-{arm}-seed{seed}.summary.json").write_text(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, nargs="+", default=[Path(".gpu")], help="folders holding the packed .npz files")
    p.add_argument("--out", type=Path, help="output folder")
    p.add_argument("--deadline-s", type=float, default=480, help="the main run ends (exported) within this many seconds")
    p.add_argument("--ab", action="store_true", help="run the A/B arms first (3 arms x --seeds, concurrently)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per A/B arm")
    p.add_argument("--ab-deadline-s", type=float, default=200, help="A/B runs still going after this are stopped")
    p.add_argument("--ab-epochs", type=int, default=16, help="epochs of each A/B run")
    p.add_argument("--main-epochs", default="auto", help="epochs of the main run (auto: fit the deadline)")
    p.add_argument("--limit", type=int, default=0, help="use the first N images of each split (a quick check)")
    p.add_argument("--ab-run", help=argparse.SUPPRESS)  # arm:seed, a worker process
    p.add_argument("--shm", type=Path, default=Path("/dev/shm/vggattn"), help=argparse.SUPPRESS)
    p.add_argument("--join", nargs=3, type=Path, metavar=("FEATURES", "REST", "TARGET"), help="join the exported halves")
    args = p.parse_args(argv)
    if args.join:
        join(args.join[:2], args.join[2])
        return 0
    if args.ab_run:
        return ab_worker(args)
    start = time.perf_counter()
    deadline = start + args.deadline_s
    args.out.mkdir(parents=True, exist_ok=True)
    log(f"torch {torch.__version__}, {device_name()}")
    train_np, train_y, classes, train_files = load_packed(find_parts(args.data, "train-*.npz"))
    val_np, val_y, _, _ = load_packed(find_parts(args.data, "val.npz"))
    if args.limit:
        train_np, train_y, val_np, val_y = train_np[:args.limit], train_y[:args.limit], val_np[:args.limit], val_y[:args.limit]
    log(f"decoded {len(train_np)} train / {len(val_np)} val images in {time.perf_counter() - start:.1f} s")
    order = np.argsort(train_files) if len(train_files) == len(train_np) else np.arange(len(train_np))
    train_np, train_y = train_np[order], train_y[order]  # file order, whatever the parts
    hold = np.arange(len(train_np)) % 20 == 0  # held out of training: the temperature is fitted on these
    procs = []
    if args.ab:
        args.shm.mkdir(parents=True, exist_ok=True)
        np.savez(args.shm / "train.npz", x=train_np, y=train_y)
        np.savez(args.shm / "val.npz", x=val_np, y=val_y)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for arm in ARMS:
            for seed in range(args.seeds):
                procs.append(subprocess.Popen([sys.executable, __file__, "--ab-run", f"{arm}:{seed}", "--out", str(args.out),
                                               "--shm", str(args.shm), "--ab-epochs", str(args.ab_epochs)], env=env))
        for proc in procs:  # A/B runs get at most --ab-deadline-s; the main run needs the rest
            try:
                proc.wait(timeout=max(1.0, start + args.ab_deadline_s - time.perf_counter()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log(f"A/B runs done in {time.perf_counter() - start:.0f} s: exit codes {[pr.returncode for pr in procs]}")
    tx, ty = torch.from_numpy(train_np[~hold]).to(DEVICE), torch.from_numpy(train_y[~hold]).to(DEVICE)
    hx, hy = torch.from_numpy(train_np[hold]).to(DEVICE), torch.from_numpy(train_y[hold]).to(DEVICE)
    vx, vy = torch.from_numpy(val_np).to(DEVICE), torch.from_numpy(val_y).to(DEVICE)
    cfg = {**MAIN_RECIPE, "epochs": args.main_epochs if args.main_epochs == "auto" else int(args.main_epochs)}
    model, history = train(cfg, tx, ty, vx, vy, args.out / "main.log.jsonl", deadline - 25)
    held = logits_of(model, hx, cfg["input_size"])
    temperature = fit_temperature(held, hy)
    val_logits = logits_of(model, vx, cfg["input_size"])
    val = accuracy(val_logits, vy)
    calib = {"temperature": temperature, "heldout_images": int(hold.sum()),
             "val_ece": expected_calibration_error(val_logits.softmax(1), vy),
             "val_ece_scaled": expected_calibration_error((val_logits / temperature).softmax(1), vy)}
    log(f"main: val (WebP copy) top-1 {val['top1']:.4f}, top-5 {val['top5']:.4f}; {calib}")
    meta = {"class_names": NAMES, "class_ids": classes, "input_size": cfg["input_size"], "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "temperature": temperature,
            "training": {"dataset": "imagenette2-224", "recipe": cfg, "epochs": len(history),
                         "device": device_name(), "torch": torch.__version__,
                         "wall_s": sum(h["epoch_s"] for h in history), "val_top1_webp": val["top1"],
                         "val_top5_webp": val["top5"], "calibration": calib,
                         "gammas": history[-1]["gammas"], "trained_with_batch_norm_folded": True,
                         "data_note": "train/val decoded from WebP q72 copies of imagenette2-224 (scripts/pack_gpu_data.py)"}}
    export_split(model, meta, args.out)
    summary = {"main": {"val": val, "calibration": calib, "epochs": len(history), "recipe": cfg,
                        "wall_s": time.perf_counter() - start}}
    summary["ab"] = [json.loads(p.read_text()) for p in sorted(args.out.glob("ab-*.summary.json"))]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if summary["ab"]:  # one file for all A/B logs (the tool brings back at most 8 files)
        with open(args.out / "ab.log.jsonl", "w") as f:
            for path in sorted(args.out.glob("ab-*.jsonl")):
                f.write(path.read_text())
        for path in list(args.out.glob("ab-*.jsonl")) + list(args.out.glob("ab-*.summary.json")):
            path.unlink()
        with open(args.out / "ab.summary.json", "w") as f:
            json.dump(summary["ab"], f, indent=1)
    log(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
