"""A screenshot of the app's page for a diffusion pipeline (`app.py --diffusers FOLDER`): generate, choose a word.

    python scripts/words_screenshot.py [--out docs/screenshot-words.png]

The tiny Stable Diffusion pipeline of tests/test_diffusion.py (random weights, a vocabulary written there: nothing
is fetched), served in this process; in Chromium at 1440x900 the prompt "a red dog on grass" is generated with 4
steps and the word "dog" chosen. With random weights the image is noise and the maps show an untrained UNet.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshot-words.png"))
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    from vggattn.app import serve
    from vggattn.app.words import build_words_demo
    from vggattn.diffusion import load_pipeline

    sys.path.insert(0, str(ROOT / "tests"))
    from server import free_port  # noqa: E402
    from test_diffusion import tiny_pipeline  # noqa: E402

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_pipeline(Path(tmp))
        demo = build_words_demo(load_pipeline(folder), "tests/test_diffusion.py's tiny pipeline (random weights)")
        port = free_port()
        serve(demo, port=port, prevent_thread_lock=True, quiet=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                         args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#prompt textarea").fill("a red dog on grass")
            page.locator("#generate").click()
            page.wait_for_selector("#word label", timeout=120_000)
            page.locator("#word label", has_text="dog").click()
            page.wait_for_selector("#word-layer-0 img", timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
