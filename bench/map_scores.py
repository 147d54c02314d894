"""The map study's scoring an image (`vggattn.study.maps`), per kind, beside the study's faithfulness time an image
on the same model and images (`bench/study_time.py`'s `faithfulness_time`).

    python bench/map_scores.py [--images 8]      # the shipped ViT (vit-imagenette-96), evenly spaced val images

Per image, after one warm image: the faithfulness measures (`faithfulness.record`), then per kind of map its own
making (`class_token_maps`' seconds) plus its curves (`image_scores` on that kind alone: 3 x 11 forwards), and the
blank-out importance all kinds share (one forward a patch). Target: every kind but flow within 2x the faithfulness
time an image; flow's time reported.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import ROOT, report
from study_time import faithfulness_time

from vggattn.analysis import analyze
from vggattn.attention.adapters import find_blocks
from vggattn.data import collect_images, open_image, preprocess
from vggattn.models.byo import load_model
from vggattn.study import maps as map_study


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imagenette2-224" / "val"))
    args = p.parse_args()
    model, meta = load_model("vggattn.models.zoo:vit_imagenette", ROOT / "checkpoints" / "vit-imagenette-96.safetensors")
    paths = collect_images([args.data])
    paths = paths[:: max(1, len(paths) // (args.images + 1))][:args.images + 1]
    x = torch.cat([preprocess(open_image(q), meta) for q in paths])
    blocks = find_blocks(model, example=x[:1])
    faith = faithfulness_time(model, blocks, x)
    per: dict[str, list] = {k: [] for k in map_study.KINDS}
    for i, path in enumerate(paths):
        result = analyze(model, meta, open_image(path))
        maps, seconds, _ = map_study.class_token_maps(model, result, map_study.KINDS)
        target = int(result.probs.argmax())
        curves = []
        for kind in map_study.KINDS:
            t0 = time.perf_counter()
            map_study.image_scores(model, result.input, {kind: maps[kind]}, target)
            curves.append((kind, time.perf_counter() - t0))
        if i == 0:
            continue  # warm
        for kind, c in curves:
            per[kind].append(seconds[kind] + c)
    import vggattn

    article, ameta = vggattn.load_checkpoint(device="cpu")  # its faithfulness measures every block (the ViT's rows
    ax = torch.cat([preprocess(open_image(q), ameta) for q in paths])  # over the grid are no distributions: skipped)
    faith_article = faithfulness_time(article, find_blocks(article, example=ax[:1]), ax)
    rows = [[kind, f"{np.mean(v):.3f}", f"{np.mean(v) / faith:.1f}", f"{np.mean(v) / faith_article:.2f}"]
            for kind, v in per.items()]
    rows.append(["(faithfulness.record: the ViT, all blocks skipped)", f"{faith:.3f}", "1", ""])
    rows.append(["(faithfulness.record: the default checkpoint)", f"{faith_article:.3f}", "", "1.00"])
    report(f"The map study's scoring an image, per kind (its map made, blank-out and its curves), {args.images} val "
           "images, the shipped ViT", ["kind", "seconds an image", "x the ViT's faithfulness time",
                                        "x the default checkpoint's faithfulness time"], rows,
           ["Each kind's row includes the blank-out importance (one forward a patch), which a study over several "
            "kinds computes once per image."])


if __name__ == "__main__":
    main()
