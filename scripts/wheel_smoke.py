"""Smoke test of an installed devise wheel, run by scripts/check_wheel.sh with the fresh virtual
environment's Python, in a folder outside the checkout.

Checks that devise is imported from the environment (not a checkout), that every file of the
package (code and package data) was installed, and runs catalog -> embed (--local) -> search on
generated images with the `devise` command the wheel installed.

usage: python -I wheel_smoke.py PACKAGE_FILES.txt
  PACKAGE_FILES.txt: the files under devise/ that the source tree tracks, one per line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["cat", "dog", "car"]
WORDS = ["cat", "dog", "car", "ship", "shoe"]


def fail(msg: str) -> None:
    print(f"check-wheel: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def devise_cmd(*args: str) -> str:
    """Run the installed `devise` entry point; return its stdout, fail with its stderr."""
    exe = Path(sysconfig.get_path("scripts")) / "devise"
    start = time.monotonic()
    out = subprocess.run([str(exe), *args], check=False, capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"devise {' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    print(f"  devise {args[0]}: {time.monotonic() - start:.1f} s")
    return out.stdout


def check_installed_files(listing: Path) -> Path:
    import devise

    pkg = Path(devise.__file__).resolve().parent
    site = Path(sysconfig.get_path("purelib")).resolve()
    if not pkg.is_relative_to(site):
        fail(f"devise was imported from {pkg}, not from the environment's {site}")
    wanted = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    missing = [f for f in wanted if not (pkg.parent / f).is_file()]
    if missing:
        fail(f"{len(missing)} package files are not in the wheel: {', '.join(missing[:10])}")
    data = [f for f in wanted if not f.endswith(".py")]
    print(f"installed from {pkg}: {len(wanted)} files ({len(data)} package data) all present")
    return pkg


def make_inputs(root: Path) -> tuple[Path, Path]:
    """ROOT/images/<class>/img_i.png (4 a class, distinct colours) and a seeded 8-d .vec table."""
    for c, name in enumerate(CLASSES):
        rng = np.random.default_rng(c)
        base = rng.integers(0, 255, size=3)
        for i in range(4):
            arr = np.clip(base + rng.normal(0, 15, (24, 24, 3)), 0, 255).astype(np.uint8)
            path = root / "images" / name / f"img_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
    vec = root / "words.vec"
    mat = np.random.default_rng(7).normal(size=(len(WORDS), 8))
    lines = [f"{len(WORDS)} 8"] + [
        w + " " + " ".join(f"{x:.5f}" for x in row) for w, row in zip(WORDS, mat)
    ]
    vec.write_text("\n".join(lines) + "\n")
    return root / "images", vec


def save_tiny_model(out: Path, vec: Path) -> Path:
    """A head on the seeded `tiny` backbone (no pretrained weights needed), saved as devise
    saves trained models."""
    import torch

    from devise.model import DeviseHead, HeadSpec, save_model
    from devise.vectors import load_vectors

    torch.manual_seed(0)
    wv = load_vectors(vec)
    spec = HeadSpec(
        in_dim=64, out_dim=8, backbone="tiny", image_size=32, vectors=str(vec),
        vectors_id=wv.vectors_id, class_names=CLASSES,
    )  # fmt: skip
    return save_model(out, DeviseHead(spec).eval())


def main() -> None:
    check_installed_files(Path(sys.argv[1]))
    work = Path.cwd()
    images, vec = make_inputs(work)
    n_images = sum(1 for _ in images.rglob("*.png"))
    devise_cmd("catalog", str(images), "--out", str(work / "catalog.parquet"))
    model = save_tiny_model(work / "run" / "model", vec)
    emb = work / "emb"
    devise_cmd(
        "embed", "--model", str(model), "--catalog", str(work / "catalog.parquet"),
        "--out", str(emb), "--local", "--batch-size", "4",
    )  # fmt: skip
    hits = json.loads(devise_cmd("search", "dog", "--embeddings", str(emb), "-k", "100", "--json"))
    found = {str(Path(h["path"]).resolve()) for h in hits}
    expected = {str(p.resolve()) for p in images.rglob("*.png")}
    if found != expected:
        fail(f"search returned {len(found)} of {n_images} embedded images: {sorted(found)[:5]}")
    scores = [h["score"] for h in hits]
    if scores != sorted(scores, reverse=True):
        fail(f"search scores are not in descending order: {scores}")
    print(f"catalog -> embed --local -> search: {n_images} images embedded and all found")


if __name__ == "__main__":
    main()
