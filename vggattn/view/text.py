"""The words a person reads: notes, hints and markdown tables about a model, an image and a click.

Everything here turns numbers computed elsewhere (`vggattn.analysis`, `vggattn.attention.readouts`) into text;
nothing here computes a statistic. The app and the exports use it.
"""

from __future__ import annotations

import math

import numpy as np

from ..attention.readouts import SINK_DOMINATED

LIST_CLASSES = 20  # the app's header names at most this many of the classes (an ImageNet model has 1000)


def sink_note(row: np.ndarray, sink: tuple[int, float], threshold: float = SINK_DOMINATED) -> str:
    """One line saying that a block is sink-dominated on this image (its most attended cell takes at
    least `threshold` of all attention), so a map is not read as a finding about the clicked pixel.
    row: the clicked query's (kh, kw) attention; sink: (flat key cell, share) from `BlockResult.sink`."""
    index, share = sink
    if share < threshold:
        return ""
    w = row.shape[1]
    cell = f"({index // w}, {index % w})"
    on_sink = float(row.reshape(-1)[index])
    if int(row.argmax()) == index:
        return (f"query-independent here: {on_sink:.0%} of this row on cell {cell}, the cell most queries pick "
                f"({share:.0%} of all attention in this image)")
    return f"sink-dominated image: cell {cell} takes {share:.0%} of all attention; this row puts {on_sink:.0%} there"


def unsure_note(result, meta: dict) -> str:
    """One line when the top-1 probability is below the checkpoint's `unsure_below` threshold."""
    threshold = float(meta.get("unsure_below", 0.0))
    if result.probs is None or float(result.probs.max()) >= threshold:
        return ""
    return (f"⚠ Unsure: the top-1 probability {float(result.probs.max()):.0%} is below {threshold:.0%}, where this "
            "model's val top-1 precision falls under 50%.")


def model_notes(meta: dict, gammas: dict[str, float]) -> list[str]:
    """What a user must know about the model before reading its output: the only classes it can answer,
    and whether attention plays any part in its predictions (every block's γ 0). gammas: {block: γ} of the
    blocks that have one."""
    names = list(meta.get("class_names") or [])
    notes = []
    if names:
        shown = ", ".join(names[:LIST_CLASSES])
        if len(names) > LIST_CLASSES:
            shown += f", and {len(names) - LIST_CLASSES} more"
        notes.append(f"This model knows {len(names)} classes ({shown}); any image you give it gets one of them, "
                     "whatever it shows.")
    if gammas and all(g == 0.0 for g in gammas.values()):
        notes.append("⚠ Every γ is 0: attention does not affect this model's predictions, and the maps come from "
                     "untrained Q and K (a fresh or untrained model).")
    return notes


GAMMA_HINT = ("γ scales what attention adds to each position's features: y = γ · attention(x) + x. "
              "It starts at 0 (attention off) and is learned; its size says how much the block relies on attention.")


def gamma_markdown(result) -> str:
    """Per block with a γ: grid, γ and the mean effective contribution ‖y − x‖/‖x‖, as a markdown table."""
    rows = [f"| `{b.name}` | {b.maps.grid[0]}×{b.maps.grid[1]} | {b.gamma:+.4f} | "
            f"{'—' if b.contribution is None else f'{float(b.contribution.mean()):.3f}'} |"
            for b in result.blocks if b.gamma is not None]
    if not rows:
        return ""
    return "| block | grid | γ | mean ‖γ·attn‖/‖x‖ |\n|---|---|---|---|\n" + "\n".join(rows) + f"\n\n{GAMMA_HINT}"


def contribution_markdown(result) -> str:
    """Per block, the mean and largest ‖y − x‖/‖x‖ over positions (`BlockResult.contribution`)."""
    rows = [f"| `{b.name}` | {c.mean():.3f} | {c.max():.3f} |" if c is not None else
            f"| `{b.name}` | — (its output is not an update of its input) | — |"
            for b, c in zip(result.blocks, result.contributions())]
    return "| block | mean ‖y − x‖/‖x‖ | largest |\n|---|---|---|\n" + "\n".join(rows)


def dependence_markdown(result) -> str:
    """Per block, the mean JS divergence of the rows from the mean row (`Analysis.query_dependence`)."""
    rows = [f"| `{b.name}` | {jsd:.4f} | {jsd / math.log(2):.1%} |" if jsd is not None else
            f"| `{b.name}` | — (its rows are no distributions) | — |"
            for b, (_, jsd) in zip(result.blocks, result.query_dependence())]
    return ("| block | mean JSD of rows from the mean row (nats) | of the maximum ln 2 |\n|---|---|---|\n" +
            "\n".join(rows) + "\n\n0 means every position attends to the same place (the map does not depend on "
            "the query); the images show where attention goes on average.")
