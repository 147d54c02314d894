"""Which map to believe: each kind of map of a vision transformer scored against what the model does with the
image, per image, with bootstrap CIs over images.

    python -m vggattn.study --model vggattn.models.zoo:vit_imagenette --checkpoint checkpoints/vit-imagenette-96.safetensors \
        --maps weights,value,effect,rollout,flow,relevance --data .../val --limit 200 --out maps/

Kinds, each a map over the patches (the key grid): the class token's row in the last block ("weights"), what each
key brings to it there ("value", Kobayashi et al. 2020) and the effect of removing each key ("effect",
`vggattn.attention.effect`); the class token's attention rollout and attention flow over all blocks (Abnar and
Zuidema 2020); relevance for the top class (Chefer et al. 2021) (`vggattn.analysis.across_layers`).

Scores, per image, for the top class's probability p (the model's softmax):
- positive perturbation: patches deleted (set to the dataset mean, 0 after normalisation) in the map's order, most
  important first, in steps of a tenth; the area under p over the fraction deleted (lower: the map found what
  matters first); negative perturbation: least important first (higher is better) (Chefer et al.);
- insertion: from a blurred image (Gaussian, sigma a patch), the patches put back most important first; the area
  under p (higher is better);
- blank-out: the Spearman correlation of the map with each patch's own importance, the fall of p when that patch
  alone is deleted (Abnar and Zuidema);
- weights and value only: the share of the class token's row on the prefix tokens (itself, registers) and on its
  most attended patch, under each (Kobayashi et al.: value norms take weight off such tokens).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

KINDS = ("weights", "value", "effect", "rollout", "flow", "relevance")
STEPS = 10  # tenths deleted or inserted
BATCH = 64


def class_token_maps(model, result, kinds) -> tuple[dict[str, np.ndarray], dict[str, float], dict]:
    """({kind: (gh, gw) map}, {kind: seconds}, the weights-against-value shares) of one analysed image."""
    from ..analysis import across_layers
    from ..attention.adapters import is_class_token
    from ..attention.effect import effect, value_weighted

    last = result.blocks[-1]
    names = last.maps.prefix_names or []
    if last.maps.prefix is None or not any(map(is_class_token, names)):
        raise ValueError("the map study needs a vision transformer with a class token")
    gh, gw = last.maps.key_grid
    n = gh * gw
    cls = n + next(i for i, p in enumerate(names) if is_class_token(p))
    maps, seconds, shares = {}, {}, {}
    if any(k in kinds for k in ("weights", "value", "effect")):
        t0 = time.perf_counter()
        rows = full_rows_heads(last.maps, cls)  # (heads, M + P)
        weights = rows.mean(0)
        seconds["weights"] = time.perf_counter() - t0
        maps["weights"] = weights[:n].numpy().reshape(gh, gw)
        u, why = last.keys_contributions()
        if u is None:
            raise ValueError(f"{last.name}: {why}")
        for kind, fn in (("value", value_weighted), ("effect", effect)):
            if kind in kinds:
                t0 = time.perf_counter()
                v = fn(rows, u)
                seconds[kind] = time.perf_counter() - t0
                maps[kind] = v[:n].numpy().reshape(gh, gw)
                if kind == "value":
                    value = v / v.sum()
                    sink = int(weights[:n].argmax())
                    shares = {"prefix_weights": float(weights[n:].sum()), "prefix_value": float(value[n:].sum()),
                              "sink_weights": float(weights[sink]), "sink_value": float(value[sink])}
        maps = {k: v for k, v in maps.items() if k in kinds}
    across = [k for k in ("rollout", "flow", "relevance") if k in kinds]
    if across:
        got = across_layers(model, result, kinds=tuple(across))
        if "not_offered" in got:
            raise ValueError(got["not_offered"])
        for k in across:
            if k not in got:
                raise ValueError(f"{k}: {got.get(f'{k}_not_offered', 'not offered')} (leave it out of --maps)")
            maps[k], seconds[k] = got[k]["map"], got[k]["seconds"]
    return maps, seconds, shares


def full_rows_heads(maps, query: int) -> torch.Tensor:
    """(heads, M + P) float64: token `query`'s own row (a prefix token: its index past the grid) per head."""
    n = maps.grid[0] * maps.grid[1]
    if query >= n:
        return maps.prefix_rows[0, :, query - n].double()
    from ..attention.effect import full_rows

    return full_rows(maps, query)


@torch.no_grad()
def _probs(model, xs: torch.Tensor, target: int) -> np.ndarray:
    out = []
    for s in range(0, len(xs), BATCH):
        logits = model(xs[s:s + BATCH])
        logits = getattr(logits, "logits", logits)
        out.append(torch.softmax(logits.float(), -1)[:, target])
    return torch.cat(out).cpu().numpy()


def _patch_masks(grid: tuple[int, int], size: int) -> torch.Tensor:
    """(n, 1, size, size) bool: each patch's pixels."""
    gh, gw = grid
    ys = torch.arange(size) * gh // size
    xs = torch.arange(size) * gw // size
    cell = ys[:, None] * gw + xs[None, :]
    return (cell[None] == torch.arange(gh * gw)[:, None, None])[:, None]


def image_scores(model, x: torch.Tensor, maps: dict[str, np.ndarray], target: int) -> dict:
    """Per kind: pos, neg, ins (areas under p) and spearman (against blank-out); for one image x (1, 3, S, S)."""
    from scipy.stats import spearmanr

    grid = next(iter(maps.values())).shape
    n = grid[0] * grid[1]
    masks = _patch_masks(grid, x.shape[-1]).to(x.device)  # (n, 1, S, S)
    sigma = x.shape[-1] / grid[1]
    k = int(2 * round(2 * sigma) + 1)
    blurred = _blur(x, k, sigma)
    base = float(_probs(model, x, target)[0])
    blank = base - _probs(model, x * ~masks, target)  # (n,): p's fall with each patch alone deleted
    counts = [round(n * s / STEPS) for s in range(STEPS + 1)]
    out = {}
    for kind, m in maps.items():
        order = torch.as_tensor(np.argsort(-m.ravel(), kind="stable").copy())
        keep = []
        for first in (order, order.flip(0)):
            deleted = torch.stack([masks[first[:c]].any(0) if c else torch.zeros_like(masks[0]) for c in counts])
            keep.append(x * ~deleted)  # (steps + 1, 3, S, S)
        shown = torch.stack([masks[order[:c]].any(0) if c else torch.zeros_like(masks[0]) for c in counts])
        inserted = torch.where(shown, x, blurred)
        p = _probs(model, torch.cat(keep + [inserted]), target).reshape(3, STEPS + 1)
        area = np.trapezoid(p, dx=1.0 / STEPS, axis=1)
        rho = spearmanr(m.ravel(), blank).statistic
        out[kind] = {"pos": float(area[0]), "neg": float(area[1]), "ins": float(area[2]),
                     "spearman": float(rho) if np.isfinite(rho) else 0.0}
    return out


def _blur(x: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    t = torch.arange(k, dtype=x.dtype, device=x.device) - k // 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="replicate"), g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode="replicate"), g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def mean_ci(values, n_boot: int, rng) -> list[float]:
    v = np.asarray(values, dtype=np.float64)
    boot = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    return [float(v.mean()), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]


def diff_ci(a, b, n_boot: int, rng) -> list[float]:
    """Mean of a - b over images (paired), with its bootstrap 95% interval."""
    return mean_ci(np.asarray(a) - np.asarray(b), n_boot, rng)


def maps_study(model, meta: dict, images: list, kinds=KINDS, n_boot: int = 2000, seed: int = 0) -> dict:
    """Every kind's scores over the images (paths), means with bootstrap CIs, the papers' orderings tested (paired
    differences with CIs), and the time each kind took per image."""
    from ..analysis import analyze
    from ..data import open_image

    per: dict[str, dict[str, list]] = {k: {"pos": [], "neg": [], "ins": [], "spearman": []} for k in kinds}
    seconds: dict[str, list] = {k: [] for k in kinds}
    shares: dict[str, list] = {}
    scoring = []
    device = next(model.parameters()).device
    for path in images:
        result = analyze(model, meta, open_image(path))
        maps, took, share = class_token_maps(model, result, kinds)
        for k, v in share.items():
            shares.setdefault(k, []).append(v)
        target = int(result.probs.argmax())
        t0 = time.perf_counter()
        scores = image_scores(model, result.input.to(device), maps, target)
        scoring.append(time.perf_counter() - t0)
        for kind in kinds:
            seconds[kind].append(took[kind])
            for s, v in scores[kind].items():
                per[kind][s].append(v)
    rng = np.random.default_rng(seed)
    table = {k: {s: mean_ci(v, n_boot, rng) for s, v in per[k].items()} for k in kinds}
    orderings = []

    def claim(text, a, b, score, better):  # a ahead of b on `score` (better: "lower" or "higher")
        if a in per and b in per:
            d = diff_ci(per[a][score], per[b][score], n_boot, rng)
            holds = d[2] < 0 if better == "lower" else d[1] > 0
            against = d[1] > 0 if better == "lower" else d[2] < 0
            orderings.append({"claim": text, "difference": d, "verdict": "holds" if holds else
                              "reversed" if against else "not separated"})
    claim("rollout correlates with blank-out better than raw weights (Abnar and Zuidema)", "rollout", "weights",
          "spearman", "higher")
    claim("flow correlates with blank-out better than raw weights (Abnar and Zuidema)", "flow", "weights",
          "spearman", "higher")
    for other in ("rollout", "weights"):
        claim(f"relevance ahead of {other} on positive perturbation (Chefer et al.)", "relevance", other, "pos", "lower")
        claim(f"relevance ahead of {other} on negative perturbation (Chefer et al.)", "relevance", other, "neg",
              "higher")
    if shares:
        for what in ("prefix", "sink"):
            d = diff_ci(shares[f"{what}_value"], shares[f"{what}_weights"], n_boot, rng)
            orderings.append({"claim": f"value norms take weight off the {'prefix tokens' if what == 'prefix' else 'most attended patch'} (Kobayashi et al.)",
                              "difference": d, "verdict": "holds" if d[2] < 0 else "reversed" if d[1] > 0 else
                              "not separated"})
    return {"images": len(images), "kinds": list(kinds), "steps": STEPS, "scores": table, "orderings": orderings,
            "shares": {k: mean_ci(v, n_boot, rng) for k, v in shares.items()},
            "seconds_per_image": {k: float(np.mean(v)) for k, v in seconds.items()},
            "scoring_seconds_per_image": float(np.mean(scoring)) if scoring else 0.0}
