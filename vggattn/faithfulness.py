"""Does a position's attention row say what its output is made of? Deletion and sink anatomy, per layer.

    per_image = image_faithfulness(block, x_in, y_out, tail, top_class, reinit)   # one image, one layer
    section = summarise(records, layers, n_boot, seed)                          # study.json's "faithfulness"

Query-conditioned deletion (no pixels are masked, so no shape leaks): for a query q, the values of the k keys a
selection names are replaced by the image's mean value, in q's weighted sum only, so q's block output changes by

    delta_q = gamma * sum_{j in S} A[q, j] * (mean_v - v_j)

measured relative to what attention adds there, |delta_q| / |y_q - x_q| (all queries; a closed form), and as the
change of the image's top-1 logit when only q's output changes (`QUERIES` sampled queries, the rest of the network
run on each). Selections: "top" (q's own k largest weights), against "random" k keys (what uniform rows would
pick), "bottom" (q's k smallest), "mean_row" (the image's query-averaged row's top k: the same keys for every
query) and "reinit_qk" (the top k of q's row after re-initialising conv_query/conv_key). A faithful map: "top"
far above the rest, and above "mean_row" where the rows differ between queries.

Sink anatomy: at the image's sink (the most attended key), the value's norm against the mean value norm, and the
share of each query's attention output that the sink term A[q, s] v_s makes up, |A[q, s] v_s| / |sum_j A[q, j]
v_j|, averaged over queries. A "nop" sink takes the attention and adds almost nothing (share < 0.1); a
"broadcast" sink adds one vector, v_s, to every position (share >= 0.5).
"""

from __future__ import annotations

import numpy as np
import torch

KS = (1, 4, 16)  # deleted keys
SELECTIONS = ("top", "random", "bottom", "mean_row", "reinit_qk")
QUERIES = 4  # sampled queries an image and layer for the logit change
NOP_BELOW, BROADCAST_FROM = 0.1, 0.5
BLOCK = 1 << 21  # attention weights alive at once


def _tokens(t: torch.Tensor) -> torch.Tensor:  # (1, C, h, w) -> (N, C)
    return t[0].flatten(1).transpose(0, 1)


def deletion_delta(rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gamma: float) -> torch.Tensor:
    """(R, C): gamma * sum_{j in keys[r]} rows[r, j] * (mean_v - v_j), the change of each row's block output when
    the values of its keys (R, k) are replaced by the mean value. rows (R, N), values (N, C)."""
    mean = values.mean(0)  # (C,)
    weights = rows.gather(1, keys)  # (R, k)
    return gamma * (weights[..., None] * (mean - values[keys])).sum(1)


@torch.no_grad()
def image_faithfulness(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       gamma: float, tail, top_class: int, reinit_qk: tuple[torch.Tensor, torch.Tensor],
                       seed: int = 0, ks=KS, queries: int = QUERIES) -> dict[str, float]:
    """One image and layer: q, k (N, C'), v, x, y (N, C) the block's Q, K, V, input and output (position-major);
    tail(y (B, N, C)) -> logits (B, classes), the network after the block; reinit_qk: (Q, K) with conv_query /
    conv_key re-initialised. -> {"del:<selection>:<k>": mean over queries of |delta_q| / |y_q - x_q|,
    "logit:<selection>:<k>": mean over the sampled queries of |change of the top-1 logit|, "sink_value_ratio",
    "sink_share", "sink_mass"}."""
    n = q.shape[0]
    kmax = min(max(ks), n)
    gen = torch.Generator().manual_seed(seed)
    random_keys = torch.stack([torch.randperm(n, generator=gen)[:kmax] for _ in range(n)]).to(q.device)  # (N, kmax)
    added = (y - x).float()  # gamma * attention output, (N, C)
    added_norm = added.norm(dim=1).clamp_min(1e-12)  # (N,)
    vf, kt, kt_r = v.float(), k.float().t(), reinit_qk[1].float().t()
    step = max(1, BLOCK // n)
    col_sum = torch.zeros(n, dtype=torch.float64, device=q.device)
    for s0 in range(0, n, step):
        col_sum += torch.softmax(q[s0:s0 + step].float() @ kt, -1).sum(0, dtype=torch.float64)
    mean_row = col_sum / n
    mean_top = mean_row.topk(kmax).indices  # the same keys for every query
    sink = int(mean_row.argmax())
    sums = {f"del:{sel}:{kk}": 0.0 for sel in SELECTIONS for kk in ks}
    sink_share = 0.0
    sampled = np.linspace(0, n - 1, min(queries, n)).round().astype(int).tolist()
    deltas = {}  # (query, selection, k) -> delta (C,), for the logit change
    for s0 in range(0, n, step):
        rows = torch.softmax(q[s0:s0 + step].float() @ kt, -1)  # (R, N)
        r = rows.shape[0]
        chosen = {"top": rows.topk(kmax, 1).indices, "bottom": rows.topk(kmax, 1, largest=False).indices,
                  "random": random_keys[s0:s0 + r], "mean_row": mean_top.expand(r, -1),
                  "reinit_qk": torch.softmax(reinit_qk[0][s0:s0 + step].float() @ kt_r, -1).topk(kmax, 1).indices}
        for sel, keys in chosen.items():
            for kk in ks:
                delta = deletion_delta(rows, keys[:, :min(kk, kmax)], vf, gamma)  # (R, C)
                sums[f"del:{sel}:{kk}"] += float((delta.norm(dim=1) / added_norm[s0:s0 + r]).double().sum())
                for qi in sampled:
                    if s0 <= qi < s0 + r:
                        deltas[(qi, sel, kk)] = delta[qi - s0]
        sink_share += float((rows[:, sink] * vf[sink].norm() * abs(gamma) / added_norm[s0:s0 + r]).double().sum())
    out = {key: value / n for key, value in sums.items()}
    # the logit change: every (query, selection, k) variant of y in one batch through the rest of the network
    order = list(deltas)
    batch = y.float()[None].repeat(len(order), 1, 1)  # (V, N, C)
    for b, (qi, _, _) in enumerate(order):
        batch[b, qi] += deltas[order[b]]
    base = tail(y.float()[None])[0, top_class]
    changed = torch.cat([tail(batch[s:s + 16])[:, top_class] for s in range(0, len(order), 16)])
    for sel in SELECTIONS:
        for kk in ks:
            picked = [abs(float(changed[b] - base)) for b, (_, s, c) in enumerate(order) if s == sel and c == kk]
            out[f"logit:{sel}:{kk}"] = float(np.mean(picked))
    norms = vf.norm(dim=1)
    out.update(sink_value_ratio=float(norms[sink] / norms.mean().clamp_min(1e-12)), sink_share=sink_share / n,
               sink_mass=float(mean_row[sink]))
    return out


def _ci(values: np.ndarray, n_boot: int, seed: int) -> list[float]:
    from .bootstrap import paired_bootstrap_ci

    return list(paired_bootstrap_ci(values, np.zeros_like(values), n_boot, seed))


def summarise(rec: dict[str, np.ndarray], layers: list[str], n_boot: int, seed: int, ks=KS) -> dict:
    """study.json's "faithfulness" section from the merged per-image records of the images it was measured on."""
    out = {"images": int(len(rec["index"])), "ks": list(ks), "selections": list(SELECTIONS), "queries_for_logit": QUERIES,
           "definitions": {
               "deletion": "values of the selected k keys replaced by the image's mean value in one query's weighted "
                           "sum; del: |change of that position's block output| / |what attention adds there|, mean "
                           "over all queries; logit: |change of the top-1 logit| with only that position changed, "
                           f"mean over {QUERIES} sampled queries",
               "selections": "top: the query's own k largest weights; random: k random keys (uniform rows' choice); "
                             "bottom: its k smallest; mean_row: the image's mean row's top k; reinit_qk: the top k "
                             "after re-initialising conv_query/conv_key",
               "sink": f"nop: the sink term is < {NOP_BELOW} of the attention output; broadcast: >= {BROADCAST_FROM}",
               "ci": f"percentile bootstrap over images, {n_boot} resamples, seed {seed}"},
           "layers": {}}
    for name in layers:
        layer = {"deletion": {}, "logit": {}}
        for what in ("del", "logit"):
            for sel in SELECTIONS:
                curve = []
                for kk in ks:
                    v = rec[f"{name}:{what}:{sel}:{kk}"]
                    curve.append({"k": kk, "mean": float(v.mean()), "ci95": _ci(v, n_boot, seed)})
                layer["deletion" if what == "del" else "logit"][sel] = curve
        top, rand = rec[f"{name}:del:top:{ks[1]}"], rec[f"{name}:del:random:{ks[1]}"]
        layer["top_minus_random"] = {"k": ks[1], "mean": float((top - rand).mean()), "ci95": _ci(top - rand, n_boot, seed)}
        share, ratio = rec[f"{name}:sink_share"], rec[f"{name}:sink_value_ratio"]
        dominated = rec[f"{name}:sink_mass"] >= 0.5
        layer["sink"] = {"value_norm_ratio": float(ratio.mean()), "value_norm_ratio_ci95": _ci(ratio, n_boot, seed),
                         "output_share": float(share.mean()), "output_share_ci95": _ci(share, n_boot, seed),
                         "sink_dominated_images": int(dominated.sum()),
                         "nop_share": float((share[dominated] < NOP_BELOW).mean()) if dominated.any() else None,
                         "broadcast_share": float((share[dominated] >= BROADCAST_FROM).mean()) if dominated.any() else None}
        out["layers"][name] = layer
    return out
