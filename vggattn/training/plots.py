"""Figures from a training run: each layer's gamma against epoch (and val top-1, where logged).

    python -m vggattn.training.plots ~/runs/w025-att --out gamma.png             # the run's log.jsonl
    python -m vggattn.training.plots ~/runs/w025-att/log.jsonl --out gamma.png
    python -m vggattn.training.plots epoch*.safetensors --out gamma.png          # gammas read from checkpoints

From checkpoints, the epoch is the one their meta records (training.epochs), else their order.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m: the flags first, so --help needs none of the imports below
    from vggattn.cli import plots_args

    plots_args()

import json
import logging
from pathlib import Path

from ..cli import plots_args
from ..models.checkpoint import BAD_INPUT, CheckpointError
from ..models.vgg import ARTICLE_ATTENTION_NAMES

log = logging.getLogger("vggattn.training.plots")


def read_log(path: str | Path) -> list[dict]:
    """The JSON lines train.py writes, one per epoch."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def history_from_checkpoints(paths: list[str | Path]) -> list[dict]:
    """One record per checkpoint: its epoch and its model's gammas (read from the weights)."""
    from ..models.checkpoint import load_checkpoint
    from ..models.vgg import gammas

    records = []
    for i, path in enumerate(paths, start=1):
        model, meta = load_checkpoint(path, device="cpu")
        records.append({"epoch": meta.get("training", {}).get("epochs", i), "gammas": gammas(model)})
    return sorted(records, key=lambda r: r["epoch"])


def read_history(sources: list[str | Path]) -> list[dict]:
    """A log.jsonl, a run folder holding one, or checkpoint files."""
    if len(sources) == 1 and Path(sources[0]).is_dir():
        sources = [Path(sources[0]) / "log.jsonl"]
    if len(sources) == 1 and Path(sources[0]).suffix == ".jsonl":
        return read_log(sources[0])
    return history_from_checkpoints(sources)


def gamma_series(history: list[dict]) -> dict[str, list[float]]:
    """{layer: [gamma per epoch]}; logs keyed by BatchNorm-shifted names are mapped by order."""
    series: dict[str, list[float]] = {}
    for record in history:
        values = list(record.get("gammas", {}).values())
        names = list(record.get("gammas", {}))
        if names and names != list(ARTICLE_ATTENTION_NAMES) and len(names) == len(ARTICLE_ATTENTION_NAMES):
            names = list(ARTICLE_ATTENTION_NAMES)
        for name, value in zip(names, values):
            series.setdefault(name, []).append(value)
    return series


def plot_gamma_history(history: list[dict], path: str | Path, title: str = "γ per attention layer") -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    epochs = [r["epoch"] for r in history]
    evaluated = [(r["epoch"], r["val_top1"]) for r in history if "val_top1" in r]
    if evaluated:  # a second panel: the learning curve
        fig = Figure(figsize=(11, 3.5))
        ax, acc = fig.subplots(1, 2)
        acc.plot(*zip(*[(e, 100 * v) for e, v in evaluated]), marker="o", ms=3, color="black")
        acc.set_xlabel("epoch")
        acc.set_ylabel("val top-1 (%)")
        acc.set_title(f"val top-1 (last {100 * evaluated[-1][1]:.2f}%)")
        acc.grid(alpha=0.3)
    else:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.subplots()
    for name, values in gamma_series(history).items():
        ax.plot(epochs, values, marker="o", ms=3, label=name)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("γ")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


parse_args = plots_args


def main(argv=None) -> int:
    """0 when the figure is written; 2 when a source cannot be read."""
    args = parse_args(argv)
    try:
        history = read_history(args.sources)
    except (OSError, ValueError, CheckpointError) as e:
        logging.basicConfig(format="%(message)s")
        log.error("error: %s", e)
        return BAD_INPUT
    plot_gamma_history(history, args.out, args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
