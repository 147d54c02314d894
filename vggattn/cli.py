"""Every command line's flags, parsed before anything heavy is imported: this module needs the standard library
alone, so `vggattn-explain --help` (and every CLI's) answers without loading torch (`vggattn.launcher` runs a
command: its flags here first, then the module that does the work).

The defaults the flags show live here too, and the modules that use them import them from here.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS / "vgg16att-imagenette-w05-256.safetensors"  # 90.0% val top-1, 64x64 first grid
SMALL_CHECKPOINT = CHECKPOINTS / "vgg16att-imagenette-w025-128.safetensors"  # 85.7%, 10.6 MB, 0.84 vs 15.9 GFLOPs
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BAD_INPUT = 2  # every CLI's exit code for a bad flag, file or checkpoint (argparse's own, too)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")  # what a folder scan picks up
COLORMAPS = ("inferno", "viridis", "magma", "turbo", "jet", "hot")  # perceptually uniform first
SCOPES = ("each", "all", "none")  # study --interventions: each block and all at once, all at once only, none


def add_checkpoint_argument(parser, what: str = "checkpoint") -> None:
    """The same --checkpoint flag for every CLI: a file, a folder or a Hub id, the shipped checkpoint by default."""
    parser.add_argument("--checkpoint", help=f"{what}: a .safetensors or the article's .pth, a folder holding "
                        "model.safetensors, or a Hugging Face Hub id (default: the shipped "
                        f"{DEFAULT_CHECKPOINT.name}); with --model, that model's weights (none: random); a "
                        ".safetensors whose meta names a vggattn model builds that model")


def add_model_arguments(parser) -> None:
    """The flags that bring a model of your own, the same in every CLI that takes one."""
    own = parser.add_argument_group("your own model (instead of an attention-VGG16 checkpoint)")
    own.add_argument("--model", metavar="PKG.MODULE:FACTORY", help="a factory returning the model; --checkpoint "
                     "is then its weights (.pth state_dict or .safetensors), or give none for random weights")
    own.add_argument("--timm", metavar="NAME", help="a timm model (pretrained where timm's hub is reachable)")
    own.add_argument("--hf", metavar="NAME_OR_FOLDER", help="a transformers vision model: a folder saved with "
                     "save_pretrained, or a Hub id (a classifier, a backbone such as Dinov2Model, a detector's "
                     "encoder, or the vision tower of a CLIPModel or SiglipModel)")
    own.add_argument("--classes", help="class names file, one a line (timm's ImageNet models have theirs)")
    own.add_argument("--input-size", type=int, help="square input size for --model or --timm (default: the checkpoint's or timm's, "
                     "else 224)")
    own.add_argument("--mean", type=float, nargs=3, help="input normalisation mean (default: the checkpoint's, "
                     f"else ImageNet's {IMAGENET_MEAN})")
    own.add_argument("--std", type=float, nargs=3, help=f"input normalisation std (default: ImageNet's {IMAGENET_STD})")
    own.add_argument("--layers", nargs="+", metavar="NAME", help="the attention blocks by module name "
                     "(default: every attention block found, by its class or by what it computes)")


def parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--point takes X,Y (e.g. 120,80), got {text!r}") from None
    return x, y


def explain_args(argv=None) -> argparse.Namespace:
    """`vggattn-explain`'s flags."""
    p = argparse.ArgumentParser(prog="vggattn-explain", description="Figures and numbers for images and points, from the command line.")
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="images, or folders of images")
    add_checkpoint_argument(p)
    p.add_argument("--point", type=parse_point, action="append", default=[], metavar="X,Y",
                   help="a pixel of the original image (repeatable; default: the centre)")
    p.add_argument("--relative", action="store_true", help="points are fractions of width and height (0..1)")
    p.add_argument("--out", required=True, help="output folder (one subfolder per image)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-ablation", action="store_true", help="skip the per-layer ablation forwards")
    p.add_argument("--compare", metavar="B",
                   help="also write compare.html (A/B under one pointer, and B minus A per layer) and compare.json, "
                        "against B: another image file; reinit (every block's Q and K re-initialised); off, mean or "
                        "uniform (every block's attention intervened on); layers:NAME,NAME (two layers of this "
                        "model); or another model: a checkpoint file, timm:NAME or hf:NAME_OR_FOLDER")
    p.add_argument("--html", action="store_true",
                   help="also write view.html: the live view in one file (follows the pointer, pins clicks) that "
                        "opens in any browser with no server and no network (with --token: tokens.html; with "
                        "--diffusers: words.html, the tokens as tiles)")
    p.add_argument("--across", action="store_true",
                   help="a transformer: also write where its class token's output comes from over all layers: "
                        "attention rollout, flow and relevance for the top class (across.png, across.json, .npy)")
    p.add_argument("--token", action="append", default=[], metavar="NAME",
                   help='a token that is not a place on the image, e.g. a detector\'s "query 3" (repeatable): its map '
                        "in every cross-attention layer as .npy, tokens.png and tokens.json (its predicted box and "
                        "class, and its weight inside that box)")
    p.add_argument("--diffusers", metavar="FOLDER",
                   help="a diffusion pipeline saved with save_pretrained (no image inputs): generate from --prompt "
                        "and write each --word's cross-attention maps (per layer, per step, and DAAM's sum)")
    p.add_argument("--prompt", help="with --diffusers: the prompt")
    p.add_argument("--word", action="append", default=[], help="with --diffusers: a word of the prompt (repeatable)")
    p.add_argument("--steps", type=int, default=4, help="with --diffusers: denoising steps")
    p.add_argument("--seed", type=int, default=0, help="with --diffusers: the latents' seed")
    p.add_argument("--guidance", type=float, default=7.5, help="with --diffusers: classifier-free guidance scale")
    p.add_argument("--compare-prompt", metavar="PROMPT", help="with --diffusers: also generate from this prompt (same "
                   "seed) and write words-compare.html: each word's maps under both prompts and their difference")
    p.add_argument("--colormap", default=COLORMAPS[0], choices=COLORMAPS, help="colormap of the overlays")
    p.add_argument("--opacity", type=float, default=0.8, help="opacity of the most attended cells' tint")
    add_model_arguments(p)
    return p.parse_args(argv)


def study_args(argv=None) -> argparse.Namespace:
    """`vggattn-study`'s flags."""
    p = argparse.ArgumentParser(prog="vggattn-study", description="What each attention block of a model does over a whole dataset, and whether it matters.")
    add_checkpoint_argument(p, "checkpoint to study")
    p.add_argument("--data", help="ImageFolder split (one folder per class, by wnid or class name); with --tokens, "
                   "any folder of images")
    p.add_argument("--out", required=True, help="output folder (study.json, report.html, PNG figures)")
    p.add_argument("--limit", type=int, default=0, help="study an evenly spaced subset of N images (0 = all)")
    p.add_argument("--sanity-images", type=int, default=256, help="images for the randomisation check (0 = skip)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the randomised weights")
    p.add_argument("--ship", action="store_true", help="also copy study.json to <checkpoint stem>.study.json beside it")
    p.add_argument("--faithfulness-images", type=int, default=64, help="images for the deletion and sink "
                   "measures (vggattn.study.faithfulness; 0 = skip)")
    p.add_argument("--interventions", choices=SCOPES, default="each", help="each: every block alone and all at once "
                   "(off, mean, uniform); all: all blocks at once only (a transformer's many blocks); none: skip")
    p.add_argument("--resume", action="store_true", help="continue a study that was stopped: keep the per-image "
                   "records in OUT/records and study only the images they miss")
    p.add_argument("--tokens", action="store_true", help="a detector (--hf): per object query over the images in "
                   "--data, how often it finds an object and its attention's share inside its box per layer")
    p.add_argument("--diffusers", metavar="FOLDER", help="a diffusion pipeline (save_pretrained): per word over "
                   "--prompts, its share of the image's attention per layer")
    p.add_argument("--prompts", metavar="FILE", help="with --diffusers: a text file, one prompt a line")
    p.add_argument("--steps", type=int, default=4, help="with --diffusers: denoising steps a prompt")
    p.add_argument("--maps", metavar="KINDS", help="a vision transformer: score these kinds of map against what the "
                   "model does (weights,value,effect,rollout,flow,relevance: vggattn.study.maps) over --data")
    add_model_arguments(p)
    args = p.parse_args(argv)
    if args.diffusers and not args.prompts:
        p.error("--diffusers needs --prompts")
    if not args.diffusers and not args.data:
        p.error("give --data (or --diffusers with --prompts)")
    return args


def train_args(argv=None) -> argparse.Namespace:
    """`vggattn-train`'s flags."""
    p = argparse.ArgumentParser(prog="vggattn-train", description="Train an attention-VGG16 on an ImageFolder root (with train/ and val/).")
    p.add_argument("--data", required=True, help="ImageFolder root holding train/ and val/")
    p.add_argument("--out", required=True, help="run directory (last.pt, best.safetensors, log.jsonl)")
    p.add_argument("--names", help="class names file: lines 'folder name' or a markdown table '| folder | name |'")
    p.add_argument("--width", type=float, default=0.25, help="channel multiplier (1.0 = the article)")
    p.add_argument("--hidden", type=int, default=256, help="hidden classifier size (4096 = the article)")
    p.add_argument("--dropout", type=float, default=0.3, help="classifier dropout")
    p.add_argument("--input-size", type=int, default=128, help="square input size of the model (val and inference)")
    p.add_argument("--train-size", type=int, default=0, help="random-resized-crop size for training (0 = input size; smaller is faster, FixRes-style)")
    p.add_argument("--no-attention", action="store_true", help="same network without the three attention blocks (A/B baseline)")
    p.add_argument("--global-attention", action="store_true",
                   help="every attention row replaced by the image's query-averaged row (GCNet's query-independent block)")
    p.add_argument("--no-batch-norm", action="store_true", help="train without BatchNorm (the article's plain network)")
    p.add_argument("--init", default="random", metavar="random|imagenet|PATH",
                   help="imagenet: torchvision VGG16 weights (needs the network); PATH: warm start from a vggattn "
                        "checkpoint of the same width/hidden (e.g. a shipped one; BatchNorm is re-inserted as the identity)")
    p.add_argument("--epochs", type=int, default=30, help="number of epochs")
    p.add_argument("--batch-size", type=int, default=64, help="batch size per process")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="optimizer")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="weight decay")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--schedule", choices=["onecycle", "cosine"], default="onecycle", help="learning-rate schedule (per step)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="cosine warm-up epochs")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: fp16 AMP on CUDA; bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX), else fp32. "
                        "channels_last always")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--limit-per-class", type=int, default=0, help="use at most this many images per class and split (0 = all)")
    p.add_argument("--recalibrate-bn", type=int, default=0, metavar="N",
                   help="after the last epoch, re-estimate BatchNorm statistics on N training images seen as at "
                        "inference (whole image at --input-size); kept if val top-1 improves. Fixes the train/test "
                        "resolution gap of --train-size < --input-size (FixRes)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (with nothing left to train, "
                                                          "only the final steps run, e.g. --recalibrate-bn)")
    return p.parse_args(argv)


def evaluate_args(argv=None) -> argparse.Namespace:
    """`vggattn-evaluate`'s flags."""
    p = argparse.ArgumentParser(prog="vggattn-evaluate", description="Evaluate a checkpoint on an ImageFolder split, and count FLOPs and parameters.")
    add_checkpoint_argument(p, "checkpoint to evaluate")
    p.add_argument("--data", help="ImageFolder root of the split to evaluate (e.g. .../imagenette2-224/val)")
    p.add_argument("--out", help="directory for metrics.json and confusion.png")
    p.add_argument("--batch-size", type=int, default=64, help="batch size")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--limit-per-class", type=int, default=0, help="at most this many images per class (0 = all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--flops-only", action="store_true", help="only print the FLOPs comparison")
    return p.parse_args(argv)


def plots_args(argv=None) -> argparse.Namespace:
    """`vggattn-plots`'s flags."""
    p = argparse.ArgumentParser(prog="vggattn-plots", description="Plot each layer's gamma against epoch.")
    p.add_argument("sources", nargs="+", help="log.jsonl of python -m vggattn.training.train, its run folder, or checkpoints")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default="γ per attention layer", help="figure title")
    return p.parse_args(argv)


def app_args(argv=None) -> argparse.Namespace:
    """`vggattn-app`'s flags."""
    p = argparse.ArgumentParser(prog="vggattn-app", description="vggattn: click a pixel, see its attention in every block.")
    add_checkpoint_argument(p, "checkpoint to show (also shipped: checkpoints/vgg16att-imagenette-w025-128"
                               ".safetensors, 85.7%%, 128 px, 1/19 of the FLOPs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present, else CPU")
    # Hosts such as Hugging Face Spaces say where to listen through Gradio's variables (or PORT)
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="address to bind (default: $GRADIO_SERVER_NAME, else 127.0.0.1 = this machine only)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or 7860),
                   help="port to serve on (default: $GRADIO_SERVER_PORT, else $PORT, else 7860)")
    p.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    p.add_argument("--session-ttl", type=int, default=3600,
                   help="seconds a session's analysis is kept after it was made (default: an hour)")
    p.add_argument("--hover-dtype", default="float32", choices=["float32", "float16"],
                   help="how Q and K travel to the page for the maps under the pointer (float16: half the bytes, "
                        "rows differ by the error in bench/README.md)")
    p.add_argument("--concurrency", type=int, default=2, help="events of one kind that run at once (default 2)")
    p.add_argument("--threads", type=int, default=0,
                   help="PyTorch threads per forward (default: the cores divided among the events running at the "
                        "time, at least 1: a lone upload gets every core, concurrent ones do not oversubscribe them)")
    p.add_argument("--diffusers", metavar="FOLDER",
                   help="a diffusion pipeline saved with save_pretrained: a page that generates from a prompt and "
                        "shows where each word is attended to, by layer and step (instead of an image model)")
    add_model_arguments(p)
    return p.parse_args(argv)
