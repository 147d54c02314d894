"""Screenshots of transformers' SegFormer, Swin and DETR (its encoder) in the app, each loaded as `--hf FOLDER` loads it.

    python scripts/hf_screenshots.py [--out docs/] [--names segformer swin detr]

Small random configs saved with save_pretrained into a temporary folder (nothing is fetched), the app served in this
process, the church photo uploaded and a point on the tower pinned in Chromium at 1440x900; one PNG a model,
docs/screenshot-hf-<name>.png.
"""

import argparse
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def configs():
    import transformers as T

    resnet = T.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                            out_features=["stage4"])
    return {
        "segformer": lambda: T.SegformerForImageClassification(T.SegformerConfig(
            image_size=224, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})),
        "swin": lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=224, embed_dim=48, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16], num_labels=3,
            id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})),
        "detr": lambda: T.DetrForObjectDetection(T.DetrConfig(
            use_timm_backbone=False, backbone_config=resnet, use_pretrained_backbone=False, d_model=64,
            encoder_layers=3, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=10)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder for the PNGs")
    p.add_argument("--names", nargs="+", default=["segformer", "swin", "detr"], help="which models")
    p.add_argument("--size", type=int, default=320, help="input size for DETR (no size in its config)")
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch
    from playwright.sync_api import sync_playwright

    from vggattn import app
    from vggattn.models.byo import load_hf

    sys_path = str(ROOT / "tests")
    import sys

    sys.path.insert(0, sys_path)
    from server import free_port  # noqa: E402

    church = ROOT / "assets" / "church.jpg"
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        for name in args.names:
            torch.manual_seed(0)
            folder = Path(tmp) / name
            configs()[name]().save_pretrained(folder)
            model, meta = load_hf(str(folder), input_size=args.size if name == "detr" else None)
            demo = app.build_demo(model, meta)
            port = free_port()
            app.serve(demo, port=port, prevent_thread_lock=True, quiet=True)
            try:
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
                page.locator("#input-image input[type=file]").set_input_files(str(church))
                page.wait_for_function("window.vggattnHover && window.vggattnHover.ready()", timeout=120_000)
                img = page.locator("#input-image img").first
                box = img.bounding_box()
                page.mouse.click(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.3)
                page.wait_for_function("document.querySelector('#status').innerText.includes('Pinned')",
                                       timeout=60_000)
                page.wait_for_timeout(1500)
                path = Path(args.out) / f"screenshot-hf-{name}.png"
                page.screenshot(path=str(path))
                print(path, page.locator("#status").inner_text()[:200])
                page.close()
            finally:
                demo.close()
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
