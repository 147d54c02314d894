"""A detector's cross-attention at its size, beside a warm forward in the same process (median of --runs).

    python bench/cross_speed.py [--model checkpoints/shapes-detector] [--runs 5]

Loads the model as `--hf FOLDER` does, on the shapes example (assets/shapes/val-3.jpg), and prints one markdown
table: the forward alone; the first reading of its blocks (finding them, placing the tokens of every cross block:
what the app's start pays once); the Tokens tab's upload (`vggattn.tokens.token_maps`: one captured forward, every
query's rows and predictions); a choice of a query (its map in every layer drawn); the weights at a click.
"""

import argparse
import time
from pathlib import Path

from common import timed

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "checkpoints" / "shapes-detector"))
    p.add_argument("--image", default=str(ROOT / "assets" / "shapes" / "val-3.jpg"))
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    import torch

    from vggattn.app import tokens as tab
    from vggattn.data import open_image, preprocess
    from vggattn.models.byo import load_hf
    from vggattn.tokens import token_maps

    model, meta = load_hf(args.model)
    image = open_image(args.image)
    x = preprocess(image, meta)
    with torch.no_grad():
        model(x)
        forward = timed(lambda: model(x), args.runs)
    t = time.perf_counter()
    layers = tab.cross_blocks(model, meta)
    first = time.perf_counter() - t
    token_maps(model, meta, image)
    upload = timed(lambda: token_maps(model, meta, image), args.runs)
    state, *_ = tab.on_upload(model, meta, args.image)
    query = state["found"].names[0]
    choose = timed(lambda: tab.on_token(state, query), args.runs)

    class Click:
        index = [int(image.size[0] * 0.8), int(image.size[1] * 0.3)]
    click = timed(lambda: tab.on_click(state, Click()), args.runs)
    print(f"{len(layers)} cross-attention layers, {len(state['found'].names)} queries, input "
          f"{meta['input_size']} px, torch threads {torch.get_num_threads()}")
    print("| step | seconds | x the forward |")
    print("|---|---|---|")
    for name, v in [("forward", forward), ("first reading of the blocks (once a model)", first),
                    ("Tokens tab upload (token_maps)", upload), ("a query chosen (maps drawn)", choose),
                    ("a click (weights at the place)", click)]:
        print(f"| {name} | {v:.4f} | {v / forward:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
