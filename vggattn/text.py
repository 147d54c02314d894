"""The words a person reads: notes, hints and markdown tables about a model, an image and a click.

Everything here turns numbers computed elsewhere (`vggattn.analysis`, `vggattn.readouts`) into text;
nothing here computes a statistic. The app and the exports use it.
"""

from __future__ import annotations

import math

import numpy as np
import torch.nn as nn

from .readouts import SINK_DOMINATED

LIST_CLASSES = 20  # the app's header names at most this many of the classes (an ImageNet model has 1000)


def sink_note(row: np.ndarray, sink: tuple[int, float], threshold: float = SINK_DOMINATED) -> str:
    """One line saying that a layer is sink-dominated on this image (its most attended cell takes at
    least `threshold` of all attention), so a map is not read as a finding about the clicked pixel.
    row: the clicked query's (h, w) attention; sink: (flat index, share) from `Analysis.sinks`."""
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
    top = float(result.probs.max())
    if top >= threshold:
        return ""
    return (f"⚠ Unsure: the top-1 probability {top:.0%} is below {threshold:.0%}, where this model's val top-1 "
            "precision falls under 50%.")


def model_notes(model: nn.Module, meta: dict) -> list[str]:
    """What a user must know about the model before reading its output: the only classes it can answer,
    and whether attention plays any part in its predictions."""
    from .model import gammas

    names = list(meta["class_names"])
    shown = ", ".join(names[:LIST_CLASSES])
    if len(names) > LIST_CLASSES:
        shown += f", and {len(names) - LIST_CLASSES} more"
    notes = [f"This model knows {len(names)} classes ({shown}); any image you give it gets one of them, "
             "whatever it shows."]
    if all(g == 0.0 for g in gammas(model).values()):
        notes.append("⚠ Every γ is 0: attention does not affect this model's predictions, and the maps come from "
                     "untrained Q and K (a fresh or untrained model).")
    return notes


GAMMA_HINT = ("γ scales what attention adds to each position's features: y = γ · attention(x) + x. "
              "It starts at 0 (attention off) and is learned; its size says how much the layer relies on attention.")


def gamma_markdown(result) -> str:
    """Per layer: grid, γ and the mean effective contribution ‖γ·attn‖/‖x‖, as a markdown table."""
    rows = [f"| `{layer.name}` | {layer.grid[0]}×{layer.grid[1]} | {layer.gamma:+.4f} | {float(layer.contribution.mean()):.3f} |"
            for layer in result.layers]
    return "| layer | grid | γ | mean ‖γ·attn‖/‖x‖ |\n|---|---|---|---|\n" + "\n".join(rows) + f"\n\n{GAMMA_HINT}"


def readouts_markdown(panels) -> str:
    """Per layer, a clicked query's entropy, mean attention distance and top-5 cells, as a markdown
    table, with each layer's sink note (panels: `vggattn.analysis.Panel`s of one click)."""
    rows = []
    for p in panels:
        r = p.readouts
        cells = ", ".join(f"({c['row']},{c['col']}) {c['weight']:.3f}" for c in r["top_cells"][:5])
        rows.append(f"| `{p.layer}` | {p.query_index} | {r['entropy_nats']:.3f} | {r['entropy_fraction']:.2f} | "
                    f"{r['mean_distance_input_px']:.1f} | {cells} |")
    return ("| layer | query | entropy (nats) | entropy / log N | mean distance (input px) | top-5 cells (row,col) weight |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) +
            "\n\nEntropy / log N: 1 = the query looks everywhere equally, 0 = at one cell. "
            "Top-5 cells are numbered on the maps." + sink_notes_markdown(panels))


def sink_notes_markdown(panels) -> str:
    """Each sink-dominated layer's note (`vggattn.analysis.sink_note`) as a paragraph; "" when none is."""
    return "".join(f"\n\n⚠ `{p.layer}`: {p.sink_note}." for p in panels if p.sink_note)


def contribution_markdown(layers: list, contributions: list) -> str:
    """Per layer, the mean and largest ‖γ·attn‖/‖x‖ over positions (`Analysis.contributions`)."""
    rows = [f"| `{layer.name}` | {c.mean():.3f} | {c.max():.3f} |" for layer, c in zip(layers, contributions)]
    return "| layer | mean ‖γ·attn‖/‖x‖ | largest |\n|---|---|---|\n" + "\n".join(rows)


def dependence_markdown(layers: list, dependence: list[tuple]) -> str:
    """Per layer, the mean JS divergence of the rows from the mean row (`Analysis.query_dependence`)."""
    rows = [f"| `{layer.name}` | {jsd:.4f} | {jsd / math.log(2):.1%} |" for layer, (_, jsd) in zip(layers, dependence)]
    return ("| layer | mean JSD of rows from the mean row (nats) | of the maximum ln 2 |\n|---|---|---|\n" + "\n".join(rows) +
            "\n\n0 means every position attends to the same place (the map does not depend on the query); "
            "the images show where attention goes on average.")
