"""Epoch time of head training: cached backbone features vs the notebook's online way.

Same data, same head, same Ray Train settings, one process: Fashion-MNIST (the embedded asset,
PER_CLASS images a class), EfficientNet-Lite0 at 64 px, GloVe-100d. `online` decodes, augments
and runs the backbone on every image every epoch (as the notebook did); `cached` computes the
features once (reported separately as the one-off feature stage) and then trains on them.

    python bench/train_epoch.py [--per-class 60] [--epochs 4] [--backbone efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _epoch_times(metrics: list[dict]) -> tuple[float, float]:
    """(first epoch seconds, median of the later epochs)."""
    times = [m["epoch_s"] for m in metrics]
    later = times[1:] or times
    return times[0], statistics.median(later)


def run(
    per_class: int = 60,
    epochs: int = 4,
    backbone: str = "efficientnet_lite0",
    image_size: int = 64,
    vectors: str = "glove-100d",
    num_workers: int = 1,
    cpus_per_worker: float | None = None,
    batch_size: int = 64,
    out: str | None = None,
) -> dict:
    """Train the same head both ways on the same catalog; returns timings per mode and the
    ratio of median later-epoch times (online / cached)."""
    from devise import assets
    from devise.catalog import build_catalog, write_catalog
    from devise.config import Resources, TrainConfig
    from devise.runtime import init_ray
    from devise.training import train

    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="devise-bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tree = assets.fashion_mnist_tree(per_class=per_class)
    catalog = write_catalog(
        build_catalog(tree, test_fraction=0.2, holdout=["sneaker", "coat"], seed=0),
        work / "catalog.parquet",
    )
    init_ray()
    results: dict = {
        "per_class": per_class,
        "images": per_class * 10,
        "backbone": backbone,
        "image_size": image_size,
        "epochs": epochs,
        "num_workers": num_workers,
        "modes": {},
    }
    for mode in ("cached", "online"):
        config = TrainConfig(
            catalog=str(catalog),
            out=str(work / f"run-{mode}-{stamp}"),
            vectors=vectors,
            backbone=backbone,
            image_size=image_size,
            epochs=epochs,
            batch_size=batch_size,
            mode=mode,
            resources=Resources(num_workers, cpus_per_worker),
            feature_cache=str(work / f"features-{stamp}"),  # fresh: the one-off cost is real
            embed_workers=1,
        )
        start = time.perf_counter()
        result = train(config)
        total = time.perf_counter() - start
        first, later = _epoch_times(result.metrics)
        results["modes"][mode] = {
            "first_epoch_s": first,
            "epoch_s": later,
            "total_s": total,
            "train_rows": sum(m["rank0_train_rows"] for m in result.metrics[:1]),
            "test_hit1": result.metrics[-1]["test_hit1"],
            "test_hit5": result.metrics[-1]["test_hit5"],
        }
    cached, online = results["modes"]["cached"], results["modes"]["online"]
    results["ratio"] = online["epoch_s"] / max(cached["epoch_s"], 1e-9)
    return results


def format_table(r: dict) -> str:
    title = (
        f"Head training, {r['images']} Fashion-MNIST images ({r['per_class']} a class, 2 held "
        f"out), {r['backbone']} @ {r['image_size']}px, {r['epochs']} epochs, "
        f"{r['num_workers']} Ray Train worker(s)"
    )
    header = (
        "| mode | first epoch (s) | later epochs, median (s) | whole run incl. startup (s) "
        "| test hit@1 | test hit@5 |"
    )
    lines = [title, "", header, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for mode, m in r["modes"].items():
        lines.append(
            f"| {mode} | {m['first_epoch_s']:.3f} | {m['epoch_s']:.4f} | {m['total_s']:.1f} "
            f"| {m['test_hit1']:.3f} | {m['test_hit5']:.3f} |"
        )
    lines += ["", f"Per epoch after the first, cached is {r['ratio']:.0f}x faster than online."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--vectors", default="glove-100d")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--out", default=None, help="working folder (default: a temp folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = run(
        per_class=args.per_class,
        epochs=args.epochs,
        backbone=args.backbone,
        image_size=args.image_size,
        vectors=args.vectors,
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        out=args.out,
    )
    print(format_table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
