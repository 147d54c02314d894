"""Which of transformers' vision models vggattn reads, checked against the library's own eager attention.

    python bench/transformers_coverage.py [--size 224] [MODEL_TYPE ...]

Every model type transformers maps to an image classifier, an object detector or a vision backbone (AutoModel) is
built from a small config (its defaults with the sizes shrunk where the config has them; random weights, nothing is
fetched), once with eager attention, once with SDPA where transformers offers it (same weights). vggattn finds its
blocks on the SDPA model (`find_blocks`, the model wrapped as `--hf` wraps it) and reads every block's rows; where
the eager model returns `attentions` (or a detector's `encoder_attentions`) with as many layers as blocks found, each
of our rows (its weights over the grid's cells, then the prefix tokens) must be one of the library's rows (the same
values, to 1e-4; where each key sits is checked by tests/test_transformers.py for the models listed there).

Prints a row per model and the counts: read (blocks found), checked (every row matched; "-" where the two do not
compare row for row: windows stacked on the batch axis, which tests/test_transformers.py places for Swin), skipped
(no attention over positions, with the reason), not built (transformers could not build or run it from the small
config nor from its defaults), crashed (vggattn raised). Dual image-text models are read through their vision tower,
as --hf reads them.
"""

import argparse
import logging
import time
import warnings

import torch

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, embed_dim=32,
             encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=64, decoder_ffn_dim=64, d_model=32, num_queries=5, use_pretrained_backbone=False,
             num_labels=3)


def small_config(config_cls, size: int):
    """The config's defaults with its sizes shrunk where it has them (lists keep their length)."""
    config = config_cls()
    for key, value in SMALL.items():
        if hasattr(config, key) and isinstance(getattr(config, key), (int, bool)):
            setattr(config, key, value)
    for key in ("depths", "num_heads", "hidden_sizes", "embed_dims", "num_attention_heads", "sr_ratios"):
        old = getattr(config, key, None)
        if isinstance(old, (list, tuple)):
            setattr(config, key, {"depths": [1] * len(old), "num_heads": [2] * len(old),
                                  "hidden_sizes": [16 * 2 ** i for i in range(len(old))],
                                  "embed_dims": [16 * 2 ** i for i in range(len(old))],
                                  "num_attention_heads": [1] * len(old), "sr_ratios": list(old)}[key])
    if isinstance(getattr(config, "image_size", None), int):
        config.image_size = size
    elif isinstance(getattr(config, "image_size", None), (list, tuple)):
        config.image_size = [size, size]
    for sub in ("vision_config", "backbone_config"):
        inner = getattr(config, sub, None)
        if inner is not None and sub == "vision_config":
            setattr(config, sub, small_config(type(inner), size))
    if hasattr(config, "use_timm_backbone") and getattr(config, "use_timm_backbone"):
        import transformers

        config.use_timm_backbone = False
        config.backbone = None
        config.backbone_config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64],
                                                           depths=[1, 1, 1, 1], out_features=["stage4"])
    return config


def _size(config, default: int) -> int:
    size = getattr(getattr(config, "vision_config", None) or config, "image_size", None) or default
    return int(size if isinstance(size, int) else size[0])


def candidates(only: list[str]) -> list[tuple[str, str]]:
    """(model type, model class name) of every vision classifier, detector and backbone transformers maps."""
    from transformers.models.auto import modeling_auto as auto

    out = []
    for mapping in (auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES):
        for model_type, cls in mapping.items():
            for name in (cls if isinstance(cls, (list, tuple)) else [cls]):
                out.append((model_type, name))
    for model_type in {t for t, _ in out}:  # their backbones
        base = auto.MODEL_MAPPING_NAMES.get(model_type)
        if isinstance(base, str):
            out.append((model_type, base))
    out = sorted(set(out))
    return [c for c in out if not only or c[0] in only or c[1] in only]


def matched(maps, eager: torch.Tensor) -> bool | None:
    """Every one of our rows (grid cells, then prefix tokens) is one of the library's rows, values to 1e-4; None
    where the two cannot be compared row for row (windows stacked on the batch axis: tests/test_transformers.py
    places them; attentions of another shape)."""
    if maps.window is not None or eager.shape[0] != 1 or eager.dim() != 4:
        return None
    rows = maps.rows()[0].double()  # (heads, N, M)
    if maps.prefix is not None:
        rows = torch.cat([rows, maps.prefix[0].double()], -1)
    a = eager[0].double()  # (heads, T, S)
    if a.shape[0] != rows.shape[0] or a.shape[-1] != rows.shape[-1]:
        return None
    ours, theirs = rows.sort(-1).values, a.sort(-1).values
    return bool((torch.cdist(ours, theirs).amin(-1) < 1e-4).all())


def main(argv=None) -> int:
    import transformers

    from vggattn.attention.adapters import find_blocks, locate_tokens
    from vggattn.attention.trace import watch
    from vggattn.models.output import ImageOutput, image_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224, help="input size")
    p.add_argument("only", nargs="*", help="model types or class names (default: all)")
    p.add_argument("--memory-gb", type=float, default=16, help="address space of this process (an allocation past it "
                   "is an error for that model, not the end of the sweep)")
    args = p.parse_args(argv)
    import resource

    limit = int(args.memory_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    counts = dict(read=0, checked=0, skipped=0, not_built=0, crashed=0)
    print("| model class | blocks | checked against eager | s | note |")
    print("|---|---|---|---|---|")
    for model_type, cls_name in candidates(args.only):
        t = time.perf_counter()
        cls = getattr(transformers, cls_name, None)
        config_cls = transformers.CONFIG_MAPPING[model_type] if model_type in transformers.CONFIG_MAPPING else None
        built = None
        for shrink in (True, False):  # the small config, else the defaults (some configs do not shrink together)
            try:
                config = small_config(config_cls, args.size) if shrink else config_cls()
                config._attn_implementation = "eager"
                with torch.device("meta"):  # counted before anything is allocated
                    if sum(p.numel() for p in cls(config).parameters()) > 200e6:
                        raise MemoryError("over 200 M parameters")
                torch.manual_seed(0)
                eager = cls(config).eval()
                size = args.size if shrink else _size(config, args.size)
                x = torch.randn(1, getattr(config, "num_channels", 3) or 3, size, size)
                tower = getattr(eager, "vision_model", None) if hasattr(eager, "text_model") else None
                with torch.no_grad():
                    out = (tower or eager)(pixel_values=x, output_attentions=True)
                built = (config, eager, x, out)
                break
            except Exception as e:  # noqa: BLE001 - a sweep reports and goes on
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        if built is None:
            counts["not_built"] += 1
            print(f"| {cls_name} | - | - | - | not built: {why} |")
            continue
        config, eager, x, out = built
        try:
            config._attn_implementation = "sdpa"
            model = cls(config).eval()
            model.load_state_dict(eager.state_dict())
        except Exception:  # noqa: BLE001 - no SDPA: read the eager model
            model = eager
        try:
            tower = getattr(model, "vision_model", None) if hasattr(model, "text_model") else None
            net = ImageOutput(tower, "pixel_values") if tower is not None else image_model(model)  # as --hf reads it
            blocks = find_blocks(net, example=x)
        except ValueError as e:
            counts["skipped"] += 1
            print(f"| {cls_name} | 0 | - | {time.perf_counter() - t:.1f} | skipped: {str(e)[:160]} |")
            continue
        except Exception as e:  # noqa: BLE001
            counts["crashed"] += 1
            print(f"| {cls_name} | - | - | {time.perf_counter() - t:.1f} | CRASHED: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:140]} |")
            continue
        try:
            names = [b[0] for b in blocks]
            with torch.no_grad():
                _, seen = watch(net, x, names, set(names))
            locate_tokens(net, x, blocks, {n: s.input for n, s in seen.items()})
            maps = [a.maps(m, seen[n].input, seen[n].events, seen[n].call) for n, m, a in blocks if n in seen]
            attentions = getattr(out, "encoder_attentions", None) or getattr(out, "attentions", None) or ()
            flat = [a for a in attentions if isinstance(a, torch.Tensor)]
            encoder = [m for (n, *_), m in zip(blocks, maps) if ".decoder." not in n]
            checked = "-"
            if flat and len(flat) == len(encoder):
                verdicts = [matched(m, a) for m, a in zip(encoder, flat)]
                checked = "NO" if False in verdicts else "yes" if all(verdicts) else "-"
            counts["read"] += 1
            counts["checked"] += checked == "yes"
            grids = sorted({f"{m.grid[0]}x{m.grid[1]}" + ("" if m.key_grid == m.grid else f"->{m.key_grid[0]}x"
                                                          f"{m.key_grid[1]}") for m in maps})
            print(f"| {cls_name} | {len(blocks)} | {checked} | {time.perf_counter() - t:.1f} | grids {', '.join(grids)} |")
        except Exception as e:  # noqa: BLE001
            counts["crashed"] += 1
            print(f"| {cls_name} | {len(blocks)} | - | {time.perf_counter() - t:.1f} | CRASHED reading: "
                  f"{type(e).__name__}: {str(e).splitlines()[0][:140]} |")
    print()
    print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
