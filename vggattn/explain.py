"""Figures and numbers for images and points, from the command line.

    python -m vggattn.explain photo.jpg more/ --point 120,80 --point 10,200 --out explained/
    python -m vggattn.explain photos/ --relative --point 0.5,0.5 --out explained/ --checkpoint my.safetensors
    python -m vggattn.explain photo.jpg --model mypkg.nets:discriminator --checkpoint d.pth --input-size 128 --out o/
    python -m vggattn.explain photo.jpg --timm botnet26t_256 --out o/     # any model with non-local blocks
    python -m vggattn.explain shapes.jpg --hf checkpoints/shapes-detector --token "query 3" --out o/  # a detector's query
    python -m vggattn.explain --diffusers my-pipeline --prompt "a red dog" --word dog --out o/     # a prompt's word

The article's model (the shipped checkpoint, or --checkpoint) or any model with attention blocks (--model,
--timm). Writes, per image, into OUT/<image stem>/ (`vggattn.view.export.write_result`):
- `figure.png`: the image with each point, every block's attention for each point, Grad-CAM of the top
  class, each block's effective contribution and query-averaged map;
- `<block>_attention.npy` (points, key rows, key columns: the mean over heads; `_attention_heads.npy` per head),
  `<block>_contribution.npy` and `<block>_mean_attention.npy`, `gradcam.npy`;
- `result.json`: predictions (or the model's score), γ, each block's family, grids and what its numbers are,
  for each point its query cell and readouts in every block (and the share of the row on padding where
  windows have halos), per block the mean contribution and query dependence, and the top-5 with each block
  switched off (ablation: one extra forward per block);
- with `--html`, `view.html`: the live view in one self-contained file (the picture, each block's queries and keys,
  the app's page script; the first point pinned) that follows the pointer and pins clicks offline, in any browser.
- with `--token NAME` (a detector's "query 3"): `<block>_<token>.npy` of each cross-attention layer,
  `tokens.png` and `tokens.json` (`vggattn.view.export.write_tokens`).
- with `--diffusers FOLDER --prompt P --word W`: the generated `image.png`, and per word `<word>.npy` (DAAM's map on
  the latent grid), `<word>_steps.npy`, `<word>_<layer>.npy`, `words.png` and `words.json`.
A folder is run as a batch with a progress bar; an image that cannot be read is reported and skipped.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m: the flags first, so --help needs none of the imports below
    from vggattn.cli import explain_args

    explain_args()

import logging
from pathlib import Path

from tqdm import tqdm

from .analysis import analyze, switched_off
from .cli import explain_args
from .attention.adapters import NoAttention
from .models.byo import load_from_args, load_named
from .models.checkpoint import BAD_INPUT, CheckpointError
from .data import IMAGE_SUFFIXES, ImageLoadError, collect_images, open_image
from .view.export import write_result
from .view.hover import pages
from .view.live import about_model

log = logging.getLogger("vggattn.explain")


def unique_dirs(images: list[Path], out: Path) -> list[Path]:
    """OUT/<stem>, with -2, -3, ... where two images share a stem."""
    seen: dict[str, int] = {}
    dirs = []
    for image in images:
        seen[image.stem] = seen.get(image.stem, 0) + 1
        dirs.append(out / (image.stem if seen[image.stem] == 1 else f"{image.stem}-{seen[image.stem]}"))
    return dirs


parse_args = explain_args


def compare_side(args, model, meta) -> dict:
    """What --compare names, as {"label", and "image" (a path), "kind" (`vggattn.analysis.COMPARE_KINDS`), or "model"
    and "meta" (another model)}."""
    from .analysis import COMPARE_KINDS as KINDS

    what = args.compare
    if what in KINDS:
        return {"label": KINDS[what], "kind": what}
    if what.startswith("layers:"):  # two layers of this model, side by side on the same image
        return {"label": what, "layers": what}
    path = Path(what)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return {"label": path.name, "image": path}
    model_b, meta_b = load_named(what, args.device)
    return {"label": about_model(meta_b, None if what.startswith(("timm:", "hf:")) else what), "model": model_b,
            "meta": meta_b}


def write_compare(result, model, meta, other: dict, image, image_path: Path, point, target: Path, args) -> None:
    """compare.html and compare.json (`vggattn.view.compare.numbers`) for one image."""
    import json

    from .analysis import analysed_b
    from .view.compare import Side, compare_html, layer_sides, numbers

    layers_a = pages(result)
    if "layers" in other:  # A: the first layer alone, B: the second, both of this analysis
        a, b = layer_sides(result, layers_a, other["layers"])
        (target / "compare.html").write_text(compare_html(a, b, title=image_path.name, pin=point), encoding="utf-8")
        (target / "compare.json").write_text(json.dumps(numbers(a, b, point), indent=2))
        return
    if "image" in other:
        result_b = analyze(model, meta, open_image(other["image"]), args.layers)
    elif "kind" in other:
        result_b = analysed_b(model, meta, image, other["kind"], args.layers)
    else:
        result_b = analyze(other["model"], other["meta"], image)
    a = Side(image_path.name if "image" in other else about_model(meta, args.checkpoint), result, layers_a)
    b = Side(other["label"], result_b, pages(result_b))
    (target / "compare.html").write_text(compare_html(a, b, title=image_path.name, pin=point), encoding="utf-8")
    (target / "compare.json").write_text(json.dumps(numbers(a, b, point), indent=2))
    log.info("%s: compare.html against %s", image_path.name, other["label"])


def explain_words(args) -> int:
    """--diffusers: generate from the prompt and write each word's maps (`vggattn.view.export.write_words`)."""
    from .diffusion import generate, load_pipeline
    from .view.export import write_words

    if not args.prompt or not args.word:
        log.error("error: --diffusers needs --prompt and at least one --word")
        return BAD_INPUT
    try:
        pipe = load_pipeline(args.diffusers)
        run = generate(pipe, args.prompt, steps=args.steps, seed=args.seed, guidance=args.guidance)
        write_words(run, args.word, args.out, opacity=args.opacity, colormap=args.colormap)
        if args.html or args.compare_prompt:
            from .view.tokens_page import tokens_html

            found = run.token_maps()
            first = found.names[found.index(args.word[0])] if args.word[0] in found.names else None
            about = f"{args.diffusers}: {args.steps} steps, seed {args.seed}, guidance {args.guidance:g}"
            if args.html:
                (Path(args.out) / "words.html").write_text(tokens_html(
                    found, run.image, title=args.prompt, about=about, colormap=args.colormap, opacity=args.opacity,
                    first=first), encoding="utf-8")
            if args.compare_prompt:
                run_b = generate(pipe, args.compare_prompt, steps=args.steps, seed=args.seed, guidance=args.guidance)
                (Path(args.out) / "words-compare.html").write_text(tokens_html(
                    found, run.image, title=f"{args.prompt} | {args.compare_prompt}", about=about,
                    other=(run_b.token_maps(), run_b.image), labels=(args.prompt, args.compare_prompt),
                    colormap=args.colormap, opacity=args.opacity, first=first), encoding="utf-8")
    except (OSError, ValueError, ImportError) as e:
        log.error("error: %s", e)
        return BAD_INPUT
    log.info("wrote the maps of %s to %s", ", ".join(args.word), args.out)
    return 0


def explain_tokens(model, meta, image, image_path: Path, target: Path, args, other: dict | None) -> None:
    """--token: the tokens' maps (`write_tokens`); with --html, tokens.html (`vggattn.view.tokens_page`); with
    --compare naming another model or image, tokens-compare.html (A/B: per layer A, B, and B minus A)."""
    from .tokens import token_maps
    from .view.export import write_tokens
    from .view.tokens_page import tokens_html

    found = token_maps(model, meta, image)
    write_tokens(found, args.token, image, target, opacity=args.opacity, colormap=args.colormap)
    first = found.names[found.index(args.token[0])]
    about = about_model(meta, args.checkpoint)
    if args.html:
        (target / "tokens.html").write_text(tokens_html(found, image, title=image_path.name, about=about,
                                                        colormap=args.colormap, opacity=args.opacity, first=first),
                                            encoding="utf-8")
    if other is not None and ("model" in other or "image" in other):
        image_b = open_image(other["image"]) if "image" in other else image
        found_b = token_maps(other.get("model", model), other.get("meta", meta), image_b)
        page = tokens_html(found, image, title=image_path.name, about=f"A: {about}; B: {other['label']}",
                           other=(found_b, image_b), labels=("A", "B"), colormap=args.colormap,
                           opacity=args.opacity, first=first)
        (target / "tokens-compare.html").write_text(page, encoding="utf-8")
    elif other is not None:
        log.info("%s: --compare %s is not offered for tokens (another model or image is)", image_path.name,
                 args.compare)


def main(argv=None) -> int:
    """0 when every image was explained; 2 for a bad checkpoint or input (bad images are skipped, each named)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.diffusers:
        return explain_words(args)
    if not args.inputs:
        log.error("error: give images or folders of images (or --diffusers FOLDER with --prompt and --word)")
        return BAD_INPUT
    try:
        model, meta = load_from_args(args)
        images = collect_images(args.inputs)
    except (CheckpointError, OSError, ValueError) as e:
        log.error("error: %s", e)
        return BAD_INPUT
    if not images:
        log.error("error: no images found")
        return BAD_INPUT
    failed = 0
    other = None  # --compare's B, made at the first image
    out = Path(args.out)
    for image_path, target in tqdm(list(zip(images, unique_dirs(images, out))), desc="explain", unit="image",
                                   disable=len(images) == 1):
        try:
            image = open_image(image_path)
            w, h = image.size
            points = [(min(x * w, w - 1), min(y * h, h - 1)) if args.relative else (x, y)
                      for x, y in args.point] or [(w / 2, h / 2)]
            bad = [xy for xy in points if not (0 <= xy[0] < w and 0 <= xy[1] < h)]
            if bad:
                raise ValueError(f"point(s) {bad} outside the {w}x{h} image")
            if args.token:
                if args.compare and other is None:
                    other = compare_side(args, model, meta)
                explain_tokens(model, meta, image, image_path, target, args, other)
            try:
                result = analyze(model, meta, image, args.layers)
            except NoAttention:
                if not args.token:
                    raise
                log.info("%s: only the tokens written (the model has no attention over positions to draw)", image_path)
                continue
            if args.across:
                from .analysis import across_layers
                from .view.export import write_across

                write_across(across_layers(model, result), result, target, opacity=args.opacity,
                             colormap=args.colormap)
            write_result(result, points, target, None if args.no_ablation else switched_off(model, result),
                         source=str(image_path),
                         opacity=args.opacity, colormap=args.colormap, live=args.html, about=about_model(meta, args.checkpoint))
            if args.compare:
                if other is None:
                    other = compare_side(args, model, meta)
                write_compare(result, model, meta, other, image, image_path, points[0], target, args)
        except (ImageLoadError, ValueError, CheckpointError) as e:
            failed += 1
            log.error("%s: %s (skipped)", image_path, e)
    log.info("wrote %d of %d images to %s", len(images) - failed, len(images), out)
    return BAD_INPUT if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
