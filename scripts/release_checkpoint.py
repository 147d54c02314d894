"""Turn a finished training run into the shipped checkpoint and the model card's figures.

    python scripts/release_checkpoint.py --run ~/runs/w025-att --baseline ~/runs/w025-noatt \
        --data ../shared/data/imagenette2-224/val --out checkpoints

Evaluates the run's best.safetensors (BatchNorm already folded) on the val split, checks its
top-1 against the top-1 the unfolded BatchNorm model scored in training, copies it to
OUT/vgg16att-imagenette-w025-128.safetensors with the evaluation added to its meta, and writes
OUT/gamma.png, OUT/confusion.png and OUT/card.json (every number the card quotes).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np


from vggattn import load_checkpoint, save_checkpoint
from vggattn.training.evaluate import article_flops_comparison, count_flops, count_params, metrics, plot_confusion, predict_folder
from vggattn.training.plots import gamma_series, plot_gamma_history, read_log

log = logging.getLogger("release")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="training run directory (best.safetensors, log.jsonl)")
    p.add_argument("--baseline", help="the --no-attention run trained with the identical recipe")
    p.add_argument("--data", required=True, help="val ImageFolder root")
    p.add_argument("--out", default="checkpoints", help="where the checkpoint and figures go")
    p.add_argument("--name", default="vgg16att-imagenette-w025-128.safetensors", help="checkpoint file name")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run, out = Path(args.run).expanduser(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    history = read_log(run / "log.jsonl")
    model, meta = load_checkpoint(run / "best.safetensors", device="cpu")
    targets, top5 = predict_folder(model, meta, args.data)
    m = metrics(targets, top5, meta["class_names"])
    trained = meta["training"]  # written by train.py's export from the unfolded BatchNorm model
    best_epoch = trained["best_epoch"]
    gammas = {k: v[best_epoch - 1] for k, v in gamma_series(history).items()}
    card = {
        "val": {k: m[k] for k in ("n", "top1", "top5", "per_class")},
        "val_top1_unfolded_batchnorm_model": trained["val_top1"],
        "bn_recalibration_images": trained.get("bn_recalibration_images", 0),
        "val_top1_per_epoch_before_recalibration": [r["val_top1"] for r in history],
        "best_epoch": best_epoch, "epochs": len(history),
        "wall_s": sum(r["epoch_s"] for r in history),
        "train_images_per_s_mean": float(np.mean([r["images_per_s"] for r in history])),
        "gammas": gammas, "params": count_params(model),
        "gflops": count_flops(model, meta["input_size"]) / 1e9,
        "article_vs_vgg16_224": article_flops_comparison(224),
        "recipe": meta["training"].get("recipe"),
    }
    log.info("folded model top-1 %.4f vs unfolded (training) %.4f", m["top1"], trained["val_top1"])
    if args.baseline:
        base = read_log(Path(args.baseline).expanduser() / "log.jsonl")
        _, base_meta = load_checkpoint(Path(args.baseline).expanduser() / "best.safetensors", device="cpu")
        bt = base_meta["training"]
        card["baseline_no_attention"] = {"epochs_done": len(base), "best_epoch": bt["best_epoch"],
                                         "val_top1": bt["val_top1"], "val_top5": bt["val_top5"],
                                         "bn_recalibration_images": bt.get("bn_recalibration_images", 0),
                                         "wall_s": sum(r["epoch_s"] for r in base),
                                         "val_top1_per_epoch_before_recalibration": [r["val_top1"] for r in base]}

    meta["training"] = {**trained, "gammas": gammas, "val_top1": m["top1"], "val_top5": m["top5"],
                        "val_per_class": m["per_class"], "wall_s": card["wall_s"]}
    save_checkpoint(model, meta, out / args.name)
    plot_gamma_history(history, out / "gamma.png", "γ per attention layer over training")
    plot_confusion(np.array(m["confusion"]), meta["class_names"], out / "confusion.png",
                   f"val top-1 {100 * m['top1']:.1f}% ({m['n']} images)")
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
