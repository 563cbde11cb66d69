"""Screenshot the search page on an embeddings folder (docs/serve-page.png, shown in docs/serve.md).

    python scripts/page_screenshot.py [--embeddings runs/demo/embeddings] [--query sandal]

Runs the service's FastAPI app in this process (devise.serve.local_app under uvicorn, no Ray) on a
free loopback port, searches in headless Chromium, saves the PNG.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--embeddings", default=str(ROOT / "runs" / "demo" / "embeddings"))
    p.add_argument("--query", default="sandal")
    p.add_argument("-k", type=int, default=12)
    p.add_argument("--out", default=str(ROOT / "docs" / "serve-page.png"))
    args = p.parse_args(argv)
    exe = next(
        (shutil.which(b) for b in ("chromium-headless-shell", "chromium") if shutil.which(b)), None
    )
    if exe is None:
        sys.exit("No chromium found; run scripts/install_browser.sh as root.")
    if not Path(args.embeddings).is_dir():
        sys.exit(f"{args.embeddings} does not exist; run `make demo` first or pass --embeddings.")
    from playwright.sync_api import sync_playwright

    from devise.config import ServiceConfig
    from devise.serve import serve_locally

    config = ServiceConfig(embeddings=str(Path(args.embeddings).resolve()))
    with serve_locally(config) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(f"{url}/")
        page.fill("#q", args.query)
        page.fill("#k", str(args.k))
        page.press("#q", "Enter")
        page.wait_for_function(
            "document.querySelectorAll('#grid img').length > 0 && [...document.querySelectorAll"
            "('#grid img')].every(i => i.complete && i.naturalWidth > 0)",
            timeout=120_000,  # the first query may load the text encoder
        )
        page.wait_for_function(
            "!document.getElementById('info').textContent.includes('loading')", timeout=120_000
        )
        page.screenshot(path=args.out)
        browser.close()
    print(f"Wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
