"""Image folders -> a catalog table (path, label, class_name, split, size, mtime) in parquet."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from devise.errors import DeviseError
from devise.fsutil import atomic_path, check_output_file, name_problem, printable
from devise.images import is_image_path

SPLITS = ("train", "test", "unseen")
COLUMNS = ["path", "label", "class_name", "split", "size_bytes", "mtime_ns", "source"]


class CatalogError(DeviseError, ValueError):
    """A data folder or option that cannot make a catalog; str() says what to do."""


def detect_layout(root: str | os.PathLike) -> str:
    """'tiny-imagenet' when root has wnids.txt and train/, else 'folder'."""
    root = Path(root)
    if (root / "wnids.txt").exists() and (root / "train").is_dir():
        return "tiny-imagenet"
    return "folder"


def count_classes(root: str | os.PathLike) -> int:
    """How many classes a data folder holds (wnids.txt lines, or sub-folders), without a scan."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CatalogError(f"Data folder {root} does not exist or is not a folder.")
    if detect_layout(root) == "tiny-imagenet":
        return len([w for w in (root / "wnids.txt").read_text().split() if w.strip()])
    return sum(1 for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _walk_images(folder: Path, skipped: list | None = None) -> list[Path]:
    """Image files below folder, sorted. A name that cannot be catalogued safely (not UTF-8, a
    control character such as a newline) is left out and appended to skipped as (path, reason)."""
    out = []
    for p in folder.rglob("*"):
        if not (p.is_file() and is_image_path(p.name)):
            continue
        problem = name_problem(p)
        if problem is None:
            out.append(p)
        elif skipped is not None:
            skipped.append((str(p), problem))
    return sorted(out)


def scan_folder(root: str | os.PathLike, skipped: list | None = None) -> pd.DataFrame:
    """Folder layout: every sub-folder of root is a class named after it (underscores become
    spaces); its images may sit at any depth below it. Files (or class folders) whose names
    cannot be catalogued are appended to skipped as (path, reason)."""
    from devise.labels import class_name, folder_classes

    root = Path(root)
    rows = []
    class_dirs = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        problem = name_problem(d)
        if problem is None:
            class_dirs.append(d)
        elif skipped is not None:
            skipped.append((str(d), f"class folder skipped: {problem}"))
    infos = folder_classes(d.name for d in class_dirs)
    for d, info in zip(class_dirs, infos):
        for p in _walk_images(d, skipped):
            rows.append((str(p.resolve()), d.name, class_name(info), "folder"))
    return pd.DataFrame(rows, columns=["path", "label", "class_name", "source"])


def scan_tiny_imagenet(root: str | os.PathLike, skipped: list | None = None) -> pd.DataFrame:
    """Tiny ImageNet: train/<wnid>/images/*.JPEG and val/images + val/val_annotations.txt.

    The unlabelled test/ folder is not part of the catalog (use `devise embed --images`).
    """
    from devise.labels import class_name, read_tiny_imagenet_classes

    root = Path(root)
    names = {c.key: class_name(c) for c in read_tiny_imagenet_classes(root)}
    rows = []
    for wnid in sorted(names):
        for p in _walk_images(root / "train" / wnid, skipped):
            rows.append((str(p.resolve()), wnid, names[wnid], "train"))
    ann = root / "val" / "val_annotations.txt"
    if ann.exists():
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in names:
                continue
            p = root / "val" / "images" / parts[0]
            rows.append((str(p.resolve()), parts[1], names[parts[1]], "val"))
    return pd.DataFrame(rows, columns=["path", "label", "class_name", "source"])


def _pick_holdout(
    labels: Sequence[str],
    names: dict[str, str],
    holdout: Iterable[str] | None,
    holdout_count: int | None,
    seed: int,
) -> list[str]:
    """Resolve --holdout NAME,... (label keys or class names) or --holdout-count N to keys."""
    if holdout and holdout_count:
        raise CatalogError("Give either --holdout or --holdout-count, not both.")
    if holdout:
        by_name = {v: k for k, v in names.items()}
        keys = []
        for h in holdout:
            h = h.strip()
            key = h if h in names else by_name.get(h) or by_name.get(h.replace("_", " "))
            if key is None:
                raise CatalogError(
                    f"Holdout class {h!r} is not in the data; classes are: "
                    + ", ".join(sorted(names.values())[:20])
                )
            keys.append(key)
        if set(keys) >= set(labels):
            raise CatalogError(
                "--holdout names every class, which leaves no training class; hold out fewer."
            )
        return sorted(set(keys))
    if holdout_count:
        if holdout_count >= len(labels):
            raise CatalogError(f"--holdout-count {holdout_count} leaves no training class.")
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(sorted(labels), size=holdout_count, replace=False).tolist())
    return []


def assign_splits(
    df: pd.DataFrame,
    test_fraction: float = 0.2,
    holdout: Iterable[str] | None = None,
    holdout_count: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Add a split column: whole holdout classes -> unseen; per class, a seeded test_fraction
    -> test, the rest -> train. Every row gets exactly one split."""
    if not 0.0 <= test_fraction < 1.0:
        raise CatalogError(f"--test-fraction must be in [0, 1), got {test_fraction}.")
    df = df.sort_values("path", kind="stable").reset_index(drop=True)
    names = dict(zip(df["label"], df["class_name"]))
    held = set(_pick_holdout(sorted(names), names, holdout, holdout_count, seed))
    split = np.full(len(df), "train", dtype=object)
    rng = np.random.default_rng(seed)
    for label, idx in df.groupby("label", sort=True).indices.items():
        if label in held:
            split[idx] = "unseen"
            continue
        n_test = round(len(idx) * test_fraction)
        split[rng.permutation(idx)[:n_test]] = "test"
    df["split"] = split
    return df


def build_catalog(
    root: str | os.PathLike,
    layout: str = "auto",
    test_fraction: float = 0.2,
    holdout: Iterable[str] | None = None,
    holdout_count: int | None = None,
    seed: int = 0,
    skipped: list | None = None,
) -> pd.DataFrame:
    """Scan root and return the catalog table (columns: COLUMNS). Files left out for their
    names are appended to skipped as (path, reason)."""
    root = Path(root)
    if not root.is_dir():
        raise CatalogError(f"Data folder {root} does not exist or is not a folder.")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "tiny-imagenet":
        df = scan_tiny_imagenet(root, skipped)
    elif layout == "folder":
        df = scan_folder(root, skipped)
    else:
        raise CatalogError(f"Unknown layout {layout!r}; choose auto, tiny-imagenet or folder.")
    if df.empty:
        raise CatalogError(
            f"No images found under {root} (layout {layout}): expected one sub-folder per class."
        )
    df = assign_splits(df, test_fraction, holdout, holdout_count, seed)
    stats = [os.stat(p) for p in df["path"]]
    df["size_bytes"] = np.array([s.st_size for s in stats], dtype=np.int64)
    df["mtime_ns"] = np.array([s.st_mtime_ns for s in stats], dtype=np.int64)
    return df[COLUMNS]


def write_catalog(df: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write the catalog parquet atomically (temp file, then rename)."""
    out = Path(out)
    check_out(out)
    try:
        with atomic_path(out) as tmp:
            df.to_parquet(tmp, index=False)
    except OSError as e:
        raise CatalogError(
            f"Cannot write the catalog {out}: {e.strerror}; give --out a file you can write."
        ) from None
    return out


def check_out(out: Path) -> None:
    """Refuse an --out that is a folder, a device or inside an embeddings store, before any
    scanning."""
    if out.is_dir():
        raise CatalogError(f"--out {out} is a folder; give the path of the catalog file to write.")
    check_output_file(out, "--out")


def write_skipped(skipped: list[tuple[str, str]], out: str | os.PathLike) -> Path:
    """The files left out of a catalog, next to it (OUT.skipped.parquet): path (printable, with
    escapes), path_bytes (the exact file-system bytes) and reason."""
    out = Path(out)
    out = out.with_name(out.name.removesuffix(".parquet") + ".skipped.parquet")
    table = pa.table(
        {
            "path": pa.array([printable(p) for p, _ in skipped], pa.string()),
            "path_bytes": pa.array([os.fsencode(p) for p, _ in skipped], pa.binary()),
            "reason": pa.array([r for _, r in skipped], pa.string()),
        }
    )
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return out


def read_catalog(path: str | os.PathLike, splits: Iterable[str] | None = None) -> pd.DataFrame:
    """Read a catalog parquet, optionally keeping only some splits."""
    path = Path(path)
    if not path.exists():
        raise CatalogError(f"Catalog {path} does not exist; build one with `devise catalog ROOT`.")
    if path.is_dir():
        raise CatalogError(f"Catalog {path} is a folder; give the catalog parquet file.")
    try:
        df = pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError):
        raise CatalogError(
            f"Catalog {path} is not a readable parquet file; build one with "
            "`devise catalog ROOT --out FILE`."
        ) from None
    missing = {"path", "label", "split"} - set(df.columns)
    if missing:
        raise CatalogError(f"{path} is not a devise catalog (missing {sorted(missing)}).")
    if splits is not None:
        splits = list(splits)
        unknown = set(splits) - set(SPLITS)
        if unknown:
            raise CatalogError(f"Unknown split(s) {sorted(unknown)}; choose from {SPLITS}.")
        df = df[df["split"].isin(splits)].reset_index(drop=True)
    return df
