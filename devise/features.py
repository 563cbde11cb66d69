"""Backbone features computed once: catalog rows -> image pipeline (Ray Data, or this process with
the local executor) -> float16 cache on disk.

A cache entry is keyed by everything that changes the numbers: backbone name, weights file
identity, image size, augmentation settings and every catalog row's (path, size, mtime). The
engine that ran the backbone (torch or onnxruntime, devise.engines) is not in the key on purpose:
both give the same features to cosine 0.9999 (tests/test_engines.py), far below what training
or search can tell apart, so an entry written by either serves both. A later
run with the same settings reads the entry instead of running the backbone again. Broken images
are kept in the entry's errors table (and counted in a warning), never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from devise.assets import devise_home
from devise.backbones import backbone_info, weights_file
from devise.config import PipelineConfig
from devise.console import progress
from devise.errors import DeviseError
from devise.fsutil import normal_mode
from devise.pipeline import run_images

log = logging.getLogger(__name__)

# Bump when the cache layout, the transforms or the augmentation change: old entries then miss.
CACHE_FORMAT = 1
AUGMENTATION = "hflip+rot15+gray0.25"  # backbones.prepare_transform(augment=True)
FEATURES_FILE = "features.npy"
ROWS_FILE = "rows.parquet"
ERRORS_FILE = "errors.parquet"
META_FILE = "meta.json"
ROW_COLUMNS = ["path", "label", "class_name", "split", "view"]


class FeatureError(DeviseError, ValueError):
    """A feature cache or request that cannot be used; str() says what to do."""


def default_cache_dir() -> Path:
    """$DEVISE_HOME/features (see assets.devise_home)."""
    return devise_home() / "features"


@dataclass
class FeatureSet:
    """Backbone features of catalog rows, row-aligned arrays (N rows that decoded fine).

    features (N, F) float16; labels, class_names, paths, splits (N,) str; views (N,) int
    (0 = the plain image, k > 0 = the k-th augmented copy). errors: one row per image that
    could not be decoded (path, label, split, view, error).
    """

    features: np.ndarray
    labels: np.ndarray
    class_names: np.ndarray
    paths: np.ndarray
    splits: np.ndarray
    views: np.ndarray
    errors: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=[*ROW_COLUMNS]))
    key: str = ""
    path: Path | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def mask(
        self, splits: Iterable[str] | None = None, views: Iterable[int] | None = None
    ) -> np.ndarray:
        """Boolean (N,) selecting rows of the given splits and views (None: all)."""
        keep = np.ones(len(self), dtype=bool)
        if splits is not None:
            keep &= np.isin(self.splits, list(splits))
        if views is not None:
            keep &= np.isin(self.views, list(views))
        return keep

    def select(
        self, splits: Iterable[str] | None = None, views: Iterable[int] | None = None
    ) -> FeatureSet:
        """A FeatureSet with only the rows of the given splits and views."""
        keep = self.mask(splits, views)
        return replace(
            self,
            features=self.features[keep],
            labels=self.labels[keep],
            class_names=self.class_names[keep],
            paths=self.paths[keep],
            splits=self.splits[keep],
            views=self.views[keep],
        )


def weights_identity(backbone: str, weights: str | os.PathLike | None) -> dict:
    """What identifies a backbone's weights in a cache key: the resolved file's path, size and
    mtime (a backbone that needs no file, like the seeded test one, has none)."""
    path = weights_file(backbone, weights)
    if path is None:
        return {"file": None, "note": "seeded random"}
    path = path.resolve()
    if not path.exists():
        raise FeatureError(f"Weights file {path} does not exist; pass --weights PATH.")
    st = path.stat()
    return {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def expand_views(
    catalog: pd.DataFrame, augment_views: int, augment_splits: Sequence[str]
) -> pd.DataFrame:
    """One row per (image, view): view 0 for every row, views 1..K for rows in augment_splits."""
    base = catalog.assign(view=0)
    if augment_views <= 0:
        return base
    extra = catalog[catalog["split"].isin(list(augment_splits))]
    copies = [extra.assign(view=k) for k in range(1, augment_views + 1)]
    return pd.concat([base, *copies], ignore_index=True)


def _file_stats(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.full(len(paths), -1, dtype=np.int64)
    mtimes = np.full(len(paths), -1, dtype=np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            continue  # a missing file: decoding records the error; the key still differs
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def cache_key(
    catalog: pd.DataFrame,
    backbone: str,
    weights: str | os.PathLike | None,
    image_size: int,
    augment_views: int,
    seed: int,
    augment_splits: Sequence[str] = ("train",),
) -> str:
    """Hex digest of the settings and catalog rows (path, label, split, size, mtime).

    Sizes and mtimes are read from the files now (not trusted from the catalog), so an image
    edited after cataloguing gets new features.
    """
    h = hashlib.sha256()
    settings = {
        "format": CACHE_FORMAT,
        "backbone": backbone,
        "weights": weights_identity(backbone, weights),
        "image_size": int(image_size),
        "augment_views": int(augment_views),
        "augmentation": AUGMENTATION if augment_views > 0 else None,
        "augment_splits": sorted(augment_splits) if augment_views > 0 else None,
        "seed": int(seed) if augment_views > 0 else None,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    paths = catalog["path"].astype(str).tolist()
    sizes, mtimes = _file_stats(paths)
    rows = pd.DataFrame(
        {
            "path": paths,
            "label": catalog["label"].astype(str).to_numpy(),
            "split": catalog["split"].astype(str).to_numpy(),
            "size": sizes,
            "mtime": mtimes,
        }
    ).sort_values(["path", "split"], kind="stable")
    h.update(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
    return h.hexdigest()


def entry_name(backbone: str, image_size: int, augment_views: int, key: str) -> str:
    """Readable cache folder name: backbone-SIZEpx-vK-<key prefix>."""
    return f"{backbone}-{image_size}px-v{augment_views}-{key[:16]}"


def load_feature_set(path: str | os.PathLike) -> FeatureSet:
    """Read a cache entry folder written by extract_features (features memory-mapped)."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        features = np.load(path / FEATURES_FILE, mmap_mode="r")
        rows = pd.read_parquet(path / ROWS_FILE)
        errors = pd.read_parquet(path / ERRORS_FILE)
    except (OSError, ValueError) as e:
        raise FeatureError(
            f"Feature cache {path} is unreadable ({e}); delete it to rebuild."
        ) from e
    if len(rows) != features.shape[0]:
        raise FeatureError(f"Feature cache {path} is inconsistent; delete it to rebuild.")
    return FeatureSet(
        features=features,
        labels=rows["label"].to_numpy(dtype=str),
        class_names=rows["class_name"].to_numpy(dtype=str),
        paths=rows["path"].to_numpy(dtype=str),
        splits=rows["split"].to_numpy(dtype=str),
        views=rows["view"].to_numpy(dtype=np.int64),
        errors=errors,
        key=meta.get("key", ""),
        path=path,
        meta=meta,
    )


def _write_entry(
    final: Path, features: np.ndarray, rows: pd.DataFrame, errors: pd.DataFrame, meta: dict
) -> Path:
    """Write into a temp folder next to final, then rename: readers never see half an entry."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        np.save(tmp / FEATURES_FILE, features)
        rows.to_parquet(tmp / ROWS_FILE, index=False)
        errors.to_parquet(tmp / ERRORS_FILE, index=False)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        normal_mode(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / META_FILE).exists():  # not a concurrent writer's complete entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _run_pipeline(
    table: pd.DataFrame, config: PipelineConfig, seed: int, dim: int, local: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Features (N, F) float16 and error strings (N,) for every table row, in table order."""
    features = np.zeros((len(table), dim), dtype=np.float16)
    errors = np.full(len(table), "", dtype=object)
    seen = np.zeros(len(table), dtype=bool)
    if local:
        from devise.executors import run_local as runner
    else:
        runner = run_images
    batches = runner(table[["path", "view", "_row"]], config, seed)
    for batch in progress(batches, len(table), "backbone features"):
        idx = batch["_row"].astype(np.int64)
        features[idx] = batch["feature"]
        errors[idx] = batch["error"]
        seen[idx] = True
    if not seen.all():  # the pipeline promises every row back; fail loudly if it did not
        raise FeatureError(f"The image pipeline lost {int((~seen).sum())} rows; rerun the job.")
    return features, errors.astype(str)


def _view_rows(
    catalog: pd.DataFrame, augment_views: int, augment_splits: Sequence[str]
) -> pd.DataFrame:
    """The rows to compute: each image once per view (path, label, class_name, split, view),
    numbered in _row, the order the pipeline's features come back in."""
    table = catalog.reset_index(drop=True).copy()
    if "class_name" not in table.columns:
        table["class_name"] = table["label"]
    table = expand_views(
        table[["path", "label", "class_name", "split"]], augment_views, augment_splits
    )
    table["_row"] = np.arange(len(table), dtype=np.int64)
    return table


def extract_features(
    catalog: pd.DataFrame,
    backbone: str = "efficientnet_lite0",
    weights: str | os.PathLike | None = None,
    image_size: int | None = None,
    augment_views: int = 0,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    pipeline: PipelineConfig | None = None,
    augment_splits: Sequence[str] = ("train",),
    local: bool = False,
) -> FeatureSet:
    """Backbone features of every catalog row (+ augment_views augmented copies of each row in
    augment_splits), from the cache when an entry with the same key exists, else computed with
    the image pipeline and written to the cache.

    catalog needs path, label and split columns (class_name optional). pipeline gives the
    resources (actors, CPUs, GPU, batch size); its model fields are overridden by the arguments
    here. Missing features are computed by the Ray Data pipeline (Ray must then be initialised),
    or with local by devise.executors.run_local in this process.
    """
    missing = {"path", "label", "split"} - set(catalog.columns)
    if missing:
        raise FeatureError(f"The catalog table lacks the columns {sorted(missing)}.")
    if augment_views < 0:
        raise FeatureError(f"--augment-views must be 0 or more, not {augment_views}.")
    info = backbone_info(backbone)
    size = int(image_size or info.image_size)
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(catalog, backbone, weights, size, augment_views, seed, augment_splits)
    final = cache_dir / entry_name(backbone, size, augment_views, key)
    if (final / META_FILE).exists():
        fs = load_feature_set(final)
        log.info("Reusing cached features %s (%d rows).", final, len(fs))
        _warn_errors(fs.errors, final)
        return fs

    table = _view_rows(catalog, augment_views, augment_splits)
    config = replace(
        pipeline or PipelineConfig(),
        backbone=backbone,
        weights=None if weights is None else str(weights),
        image_size=size,
        head_dir=None,
    )
    start = time.perf_counter()
    features, errors = _run_pipeline(table, config, seed, info.feature_dim, local)
    seconds = time.perf_counter() - start
    ok = errors == ""
    rows = table.loc[ok, ROW_COLUMNS].reset_index(drop=True)
    failed = table.loc[~ok, ROW_COLUMNS].assign(error=errors[~ok]).reset_index(drop=True)
    meta = {
        "key": key,
        "format": CACHE_FORMAT,
        "backbone": backbone,
        "weights": weights_identity(backbone, weights),
        "image_size": size,
        "feature_dim": info.feature_dim,
        "augment_views": augment_views,
        "augmentation": AUGMENTATION if augment_views > 0 else None,
        "augment_splits": list(augment_splits),
        "seed": seed,
        "rows": int(ok.sum()),
        "errors": int((~ok).sum()),
        "seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_entry(final, np.ascontiguousarray(features[ok]), rows, failed, meta)
    log.info(
        "Computed %d feature rows with %s at %dpx in %.1fs -> %s", ok.sum(), backbone, size,
        seconds, final,
    )  # fmt: skip
    fs = load_feature_set(final)
    _warn_errors(fs.errors, final)
    return fs


def _warn_errors(errors: pd.DataFrame, where: Path) -> None:
    if len(errors) == 0:
        return
    images = errors.loc[errors["view"] == 0]
    sample = "; ".join(f"{p}: {e}" for p, e in zip(images["path"][:3], images["error"][:3]))
    msg = (
        f"{len(images)} images could not be decoded and have no features "
        f"(listed in {where / ERRORS_FILE}); e.g. {sample}"
    )
    log.warning(msg)
    warnings.warn(msg, stacklevel=3)
