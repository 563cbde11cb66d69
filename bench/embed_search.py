"""Embedding throughput and search latency, side by side with the notebook's way.

Embedding: `devise.embed.embed` end to end (Ray Data: blocks, decode tasks, actor pool, parquet
commit; Ray start-up timed apart) against a single-process torch DataLoader loop doing decode +
transform + backbone + head per batch on the same files, backbone and head.
Search: exact top-10 over 1M stored 300-d unit embeddings, ours (matrix product + argpartition)
against scipy's cdist(..., 'cosine') + a full argsort, and the floor: one matrix-vector product.

    python bench/embed_search.py [--per-class 30] [--backbone efficientnet_lite0] [--size 64]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _random_head(out: Path, backbone: str, image_size: int, dim: int = 100) -> Path:
    import torch

    from devise.backbones import backbone_info
    from devise.model import DeviseHead, HeadSpec, save_model

    torch.manual_seed(0)
    spec = HeadSpec(
        in_dim=backbone_info(backbone).feature_dim,
        out_dim=dim,
        backbone=backbone,
        image_size=image_size,
        vectors="glove-100d",
    )
    return save_model(out, DeviseHead(spec).eval())


def notebook_embed(paths: list[str], model_dir: Path, batch_size: int = 64) -> np.ndarray:
    """The notebook's loop: a Dataset opening each file with PIL, torchvision transforms, a
    single-process DataLoader, backbone + head per batch. Returns (N, D) embeddings."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from devise.backbones import load_backbone
    from devise.model import load_model

    head = load_model(model_dir)
    spec = head.spec
    backbone = load_backbone(spec.backbone, spec.backbone_weights)
    transform = T.Compose(
        [T.Resize(spec.image_size), T.CenterCrop(spec.image_size), T.ToTensor()]
    )  # the backbone module normalises [0, 1] floats itself

    class Files(Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int):
            return transform(Image.open(paths[i]).convert("RGB"))

    out = []
    with torch.inference_mode():
        for x in DataLoader(Files(), batch_size=batch_size, num_workers=0):
            out.append(head(backbone(x)).numpy())
    return np.concatenate(out)


def run_embed(
    per_class: int = 30,
    backbone: str = "efficientnet_lite0",
    image_size: int = 64,
    batch_size: int = 64,
    num_workers: int = 2,
    cpus_per_worker: float = 0.5,
    workdir: str | Path | None = None,
) -> dict:
    """Images/s of our Ray job (end to end) and of the notebook loop on the same files."""
    import ray

    from devise.assets import fashion_mnist_tree
    from devise.config import EmbedConfig, Resources
    from devise.embed import embed
    from devise.images import is_image_path
    from devise.runtime import init_ray

    tree = fashion_mnist_tree(per_class=per_class)
    paths = sorted(str(p) for p in tree.rglob("*") if is_image_path(p.name))
    work = Path(workdir or tempfile.mkdtemp(prefix="devise-bench-embed-"))
    model = _random_head(work / "model", backbone, image_size)

    t0 = time.perf_counter()
    nb = notebook_embed(paths, model, batch_size)
    notebook_s = time.perf_counter() - t0

    started_here = not ray.is_initialized()
    t0 = time.perf_counter()
    init_ray()
    ray_start_s = time.perf_counter() - t0
    out = work / "emb"
    shutil.rmtree(out, ignore_errors=True)
    config = EmbedConfig(
        model_dir=str(model),
        out=str(out),
        images=str(tree),
        resources=Resources(num_workers, cpus_per_worker, cpus_per_worker, batch_size=batch_size),
    )
    result = embed(config)
    if started_here:
        ray.shutdown()
    return {
        "images": len(paths),
        "backbone": f"{backbone}@{image_size}",
        "ours_s": result.seconds,
        "ours_ips": len(paths) / result.seconds,
        "ray_start_s": ray_start_s,
        "notebook_s": notebook_s,
        "notebook_ips": len(paths) / notebook_s,
        "rows": result.rows,
        "errors": result.errors,
        "notebook_rows": len(nb),
    }


def run_search(n: int = 1_000_000, dim: int = 300, k: int = 10, repeat: int = 5) -> dict:
    """ms per query: ours (top_k), the notebook's cdist + argsort, and one matrix-vector
    product (the floor), over n x dim float32 unit rows; also a batch of 16 queries."""
    from scipy.spatial.distance import cdist

    from devise.search import normalize_rows, top_k

    rng = np.random.default_rng(0)
    matrix = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, 100_000):
        matrix[a : a + 100_000] = normalize_rows(rng.standard_normal((min(100_000, n - a), dim)))
    queries = normalize_rows(rng.standard_normal((16, dim)))
    q = queries[:1]

    def notebook(qs):
        return np.argsort(cdist(qs, matrix, "cosine"), axis=1)[:, :k]

    # Same answer before timing anything.
    _, ours_idx = top_k(matrix, q, k)
    assert np.array_equal(ours_idx, notebook(q)), "top-k differs from cdist + argsort"
    top_k(matrix, q, k)  # warm-up
    return {
        "n": n,
        "dim": dim,
        "k": k,
        "ours_ms": 1e3 * _median_time(lambda: top_k(matrix, q, k), repeat),
        "notebook_ms": 1e3 * _median_time(lambda: notebook(q), max(1, repeat // 2)),
        "floor_ms": 1e3 * _median_time(lambda: matrix @ q[0], repeat),
        "ours_batch16_ms": 1e3 * _median_time(lambda: top_k(matrix, queries, k), repeat) / 16,
        "notebook_batch16_ms": 1e3 * _median_time(lambda: notebook(queries), 1) / 16,
    }


def markdown(embed_r: dict | None, search_r: dict | None) -> str:
    lines = [
        "| measurement | devise | notebook way | devise / notebook |",
        "| --- | --- | --- | --- |",
    ]
    if embed_r:
        e = embed_r
        lines.append(
            f"| embed {e['images']} images, {e['backbone']}, end to end (images/s) | "
            f"{e['ours_ips']:.1f} ({e['ours_s']:.1f} s) | {e['notebook_ips']:.1f} "
            f"({e['notebook_s']:.1f} s) | {e['ours_ips'] / e['notebook_ips']:.2f}x |"
        )
        lines.append(f"| Ray start-up, not in the above (s) | {e['ray_start_s']:.1f} | - | - |")
    if search_r:
        s = search_r
        what = f"top-{s['k']} of {s['n']:,} x {s['dim']}"
        lines.append(
            f"| {what}, 1 query (ms) | {s['ours_ms']:.1f} | {s['notebook_ms']:.1f} | "
            f"{s['notebook_ms'] / s['ours_ms']:.1f}x faster |"
        )
        lines.append(
            f"| {what}, batch of 16 (ms per query) | {s['ours_batch16_ms']:.1f} | "
            f"{s['notebook_batch16_ms']:.1f} | "
            f"{s['notebook_batch16_ms'] / s['ours_batch16_ms']:.1f}x faster |"
        )
        lines.append(
            f"| floor: one matrix-vector product (ms) | {s['floor_ms']:.1f} | - | "
            f"ours = {s['ours_ms'] / s['floor_ms']:.2f}x floor |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=300)
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    args = p.parse_args(argv)
    e = None
    if not args.skip_embed:
        e = run_embed(
            args.per_class,
            args.backbone,
            args.size,
            args.batch_size,
            args.num_workers,
            args.cpus_per_worker,
        )
    s = None if args.skip_search else run_search(args.rows, args.dim)
    print(markdown(e, s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
