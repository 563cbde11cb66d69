"""Training the DeViSE head with Ray Train (DDP), or in this process without Ray (--local):
cached features or the notebook's online way, a checkpoint every epoch, resume on rerun,
metrics.jsonl, loss.png and the saved model. Both ways run the same loop (train_loops) and
leave the same run layout, so either can resume the other's run.

Run layout (RUN_DIR is --out):
  config.json     the resolved config; a rerun with other settings into the same RUN_DIR is refused
  metrics.jsonl   one line per epoch (written on the driver's node as each checkpoint is stored)
  checkpoints/    Ray Train storage (default; --storage moves it to shared storage):
                  <run name>/epoch_NNNN/state.pt
  model/          head weights + spec.json (+ backbone.pt after --unfreeze-last)
  loss.png        per-batch train loss, its rolling mean, and test loss per epoch
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from devise import console
from devise.backbones import backbone_info, export_weights, load_backbone
from devise.config import HEADS, MODES, PRECISIONS, TrainConfig
from devise.errors import DeviseError
from devise.fsutil import atomic_path, normal_mode
from devise.model import DeviseHead, HeadSpec, save_model
from devise.train_loops import (
    STATE_FILE,
    CachedFeatures,
    CheckpointError,
    LocalContext,
    LoopConfig,
    OnlineImages,
    Rows,
    UnsafeCheckpointError,
    load_state,
    read_state,
    train_loop,
)

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.pt"
# Test hook (read by the CLI at call time): rank 0 sleeps after this epoch's checkpoint is
# reported, so a test can kill the run at a known point. Never set it in real runs.
PAUSE_ENV = "DEVISE_TEST_PAUSE_AFTER_EPOCH"


class TrainError(DeviseError, ValueError):
    """A training setting or input a user can fix; str() is one sentence saying how."""


class TrainStopped(TrainError):
    """SIGTERM or Ctrl-C stopped the run; its checkpoints are kept and a rerun resumes."""

    def __init__(self, signum: int, epoch: int | None = None) -> None:
        where = f" after epoch {epoch}" if epoch else ""
        super().__init__(
            f"Stopped by {signal.Signals(signum).name}{where}; rerun the same command to resume "
            "from the latest checkpoint."
        )
        self.signum, self.epoch = signum, epoch
        self.EXIT_CODE = 128 + signum  # the shell's code for death by that signal
        self.ray_joined_here = False  # Ray was started or joined by the stopped train() call


@dataclass
class TrainResult:
    """What a finished `train` produced."""

    run_dir: Path
    model_dir: Path
    metrics: list[dict]
    checkpoint_path: str | None
    resumed: bool = False


# ---------------------------------------------------------------------------------------------
# Driver side: inputs


def _validate(config: TrainConfig) -> None:
    from devise.config import PLACEMENT_STRATEGIES
    from devise.losses import LOSSES
    from devise.runtime import check_local

    if config.loss not in LOSSES:
        raise TrainError(f"Unknown loss {config.loss!r}; choose 'rank' or 'cosine'.")
    if config.head not in HEADS:
        raise TrainError(f"Unknown head {config.head!r}; choose 'mlp' or 'linear'.")
    if config.mode not in MODES:
        raise TrainError(f"Unknown mode {config.mode!r}; choose 'cached' or 'online'.")
    if config.placement_strategy not in PLACEMENT_STRATEGIES:
        raise TrainError(
            f"Unknown placement strategy {config.placement_strategy!r}; choose one of "
            f"{', '.join(PLACEMENT_STRATEGIES)}."
        )
    if config.precision not in PRECISIONS:
        raise TrainError(f"Unknown precision {config.precision!r}; choose one of {PRECISIONS}.")
    if config.unfreeze_last and config.mode != "online":
        raise TrainError("--unfreeze-last needs --mode online (cached features are frozen).")
    if config.epochs < 1 or config.batch_size < 1 or config.num_workers < 1:
        raise TrainError("--epochs, --batch-size and --num-workers must be at least 1.")
    if config.lr <= 0:
        raise TrainError(f"--lr must be positive, not {config.lr}.")
    if config.augment_views < 0:
        raise TrainError(f"--augment-views must be 0 or more, not {config.augment_views}.")
    if config.max_train_per_class is not None and config.max_train_per_class < 1:
        raise TrainError("--max-train-per-class must be at least 1.")
    from devise.labels import WORDINGS

    if config.class_text not in ("auto", *WORDINGS):
        raise TrainError(
            f"Unknown --class-text {config.class_text!r}; choose auto or {', '.join(WORDINGS)}."
        )
    if config.conse_weight != "auto":
        try:
            ok = 0.0 <= float(config.conse_weight) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            raise TrainError(
                f"--conse-weight must be auto or a number from 0 to 1, not {config.conse_weight!r}."
            )
    check_local(config.local, config.address)
    if config.local and config.storage and "://" in config.storage:
        raise TrainError(
            f"--local writes checkpoints to a folder on this machine, not {config.storage}; "
            "pass a local --storage or drop --local."
        )
    if config.local and config.use_gpu and not torch.cuda.is_available():
        raise TrainError("--use-gpu was given but this machine has no CUDA GPU; drop --use-gpu.")
    try:
        backbone_info(config.backbone)
    except ValueError as e:
        raise TrainError(str(e)) from None


def select_rows(
    catalog: pd.DataFrame, max_train_per_class: int | None = None, seed: int = 0
) -> pd.DataFrame:
    """The catalog rows a run uses: all test and unseen rows, and the train rows, at most
    max_train_per_class a class (a seeded sample, the same on every rerun)."""
    catalog = catalog.sort_values("path", kind="stable").reset_index(drop=True)
    if max_train_per_class is None:
        return catalog
    train = catalog[catalog["split"] == "train"]
    rng = np.random.default_rng(seed)
    picked = []
    for _, idx in sorted(train.groupby("label").indices.items()):
        if len(idx) > max_train_per_class:
            idx = np.sort(rng.choice(idx, size=max_train_per_class, replace=False))
        picked.append(idx)
    keep = train.iloc[np.concatenate(picked)]
    rest = catalog[catalog["split"] != "train"]
    return pd.concat([keep, rest]).sort_values("path", kind="stable").reset_index(drop=True)


def training_classes(
    catalog: pd.DataFrame,
    vectors,
    wording: str = "name",
    texts: dict[str, str] | None = None,
) -> Any:
    """ClassVectors of the classes with training rows (never the held-out `unseen` ones), each
    worded as `wording` says (labels.WORDINGS) from its names and description (labels.describe;
    texts: the user's --class-text descriptions).

    Classes without a vector in the text space are excluded with a warning
    (labels.class_vectors)."""
    from devise.labels import class_vectors

    try:
        found = class_vectors(training_class_infos(catalog, texts), vectors, wording=wording)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if len(found.keys) < 2:
        raise TrainError(
            f"Only one training class ({', '.join(found.names)}) has a word "
            "vector; training needs at least two (check --holdout and the vectors)."
        )
    return found


def training_class_infos(catalog: pd.DataFrame, texts: dict[str, str] | None = None) -> list:
    """The described classes (labels.ClassInfo) with training rows, sorted by key."""
    from devise.labels import ClassInfo, describe

    train = catalog[catalog["split"] == "train"]
    if train.empty:
        raise TrainError("The catalog has no training rows (split 'train'); rebuild it.")
    names = train.groupby("label", sort=True)["class_name"].first()
    return describe([ClassInfo(str(k), [str(n)]) for k, n in names.items()], texts)


def _class_texts(config: TrainConfig) -> dict[str, str] | None:
    from devise.labels import read_class_text

    if not config.class_text_file:
        return None
    try:
        return read_class_text(config.class_text_file)
    except ValueError as e:
        raise TrainError(str(e)) from None


def _read_inputs(config: TrainConfig):
    from devise.catalog import read_catalog
    from devise.text import load_text_space

    if not Path(config.catalog).expanduser().exists():
        raise TrainError(
            f"Catalog {config.catalog} does not exist; build one with `devise catalog ROOT`."
        )
    catalog = read_catalog(Path(config.catalog).expanduser())
    if "class_name" not in catalog.columns:
        catalog["class_name"] = catalog["label"]
    catalog = select_rows(catalog, config.max_train_per_class, config.seed)
    vectors = load_text_space(config.vectors)
    wording = "name" if config.class_text == "auto" else config.class_text
    classes = training_classes(catalog, vectors, wording, _class_texts(config))
    return catalog, vectors, classes


# ---------------------------------------------------------------------------------------------
# Driver side: the run directory


def run_name(config: TrainConfig) -> str:
    """Deterministic Ray Train run name: the same command gets the same name (and resumes)."""
    return f"devise-train-{config.run_key()}"


def _claim_run_dir(config: TrainConfig, resolved: dict) -> Path:
    """Create RUN_DIR, or check that the run already in it has the same settings."""
    run_dir = Path(config.out).expanduser().resolve()
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("run_key") != resolved["run_key"]:
            diffs = [
                f"{k} {old.get('config', {}).get(k)!r} -> {v!r}"
                for k, v in resolved["config"].items()
                if k not in TrainConfig._RUN_FREE and old.get("config", {}).get(k) != v
            ]
            raise TrainError(
                f"{run_dir} holds a run with other settings ({', '.join(diffs[:4])}); "
                "pass a new --out to start another run."
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(cfg_path, resolved)
    return run_dir


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
        f.write("\n")


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The epoch lines of RUN_DIR/metrics.jsonl (empty when none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Ray Train callback logic (see metrics_callback): append rank 0's epoch metrics to
    RUN_DIR/metrics.jsonl once the epoch's checkpoint is stored, with worker_nodes, the Ray
    node of every rank in rank order. Runs on the Train controller, which Ray pins to the
    driver's node, so RUN_DIR is the driver's even on a cluster.

    An epoch already in the file (a rerun that resumed, or a worker group Ray Train restarted
    after losing a node) is not written twice.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._epochs: set[int] | None = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if metrics:
            first = {k: v for k, v in metrics[0].items() if k != "node"}
            if all("node" in m for m in metrics):
                first["worker_nodes"] = [m["node"] for m in metrics]
            self.record(first, checkpoint.path if checkpoint is not None else None)

    def record(self, metrics: dict, checkpoint_path: str | None) -> None:
        """Append one epoch's metrics (and where its checkpoint is), unless already there."""
        m = dict(metrics)
        if self._epochs is None:
            self._epochs = {int(r["epoch"]) for r in read_metrics(Path(self.path).parent)}
        epoch = int(m.get("epoch", -1))
        if epoch in self._epochs:
            return
        m["checkpoint"] = checkpoint_path
        with open(self.path, "a") as f:
            f.write(json.dumps(m, default=float) + "\n")
        self._epochs.add(epoch)


def metrics_callback(path: str | os.PathLike):
    """A ray.train.UserCallback writing metrics.jsonl (Ray is imported only here, so `devise
    --help` stays fast)."""
    from ray.train import UserCallback

    class _MetricsCallback(MetricsWriter, UserCallback):
        pass

    return _MetricsCallback(str(path))


# ---------------------------------------------------------------------------------------------
# Driver side: putting it together


def _feature_arrays(fs, classes) -> dict[str, dict[str, np.ndarray]]:
    """{"train": all views, "test": view 0} of the training classes' rows, each as columns
    feature (N, F) float16 and target (N,) int64 (the class's row in classes.matrix)."""
    index = {k: i for i, k in enumerate(classes.keys)}

    def build(mask: np.ndarray) -> dict[str, np.ndarray]:
        mask = mask & np.isin(fs.labels, classes.keys)
        x = np.asarray(fs.features[mask], dtype=np.float16)
        y = np.array([index[k] for k in fs.labels[mask]], dtype=np.int64)
        return {"feature": x, "target": y}

    return {
        "train": build(fs.mask(splits=["train"])),
        "test": build(fs.mask(splits=["test"], views=[0])),
    }


def _ray_datasets(arrays: dict[str, dict[str, np.ndarray]], num_workers: int) -> dict:
    """The feature arrays as Ray Datasets, each split into many blocks so every worker gets a
    share."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    out = {}
    for name, cols in arrays.items():
        x, y = cols["feature"], cols["target"]
        blocks = max(1, min(len(y), 4 * num_workers))
        tables = [
            pa.table({"feature": ArrowTensorArray.from_numpy(x[part]), "target": pa.array(y[part])})
            for part in np.array_split(np.arange(len(y)), blocks)
        ]
        out[name] = ray.data.from_arrow(tables)
    return out


def _rows(catalog: pd.DataFrame, split: str, classes) -> Rows:
    index = {k: i for i, k in enumerate(classes.keys)}
    part = catalog[(catalog["split"] == split) & catalog["label"].isin(index)]
    return Rows(part["path"].tolist(), [index[k] for k in part["label"]])


def _resources(config: TrainConfig) -> tuple[float, float, float]:
    """(CPUs per train worker, CPUs per feature actor, CPUs per decode task)."""
    from devise.runtime import Resources, resolve_resources

    train = resolve_resources(Resources(config.num_workers, config.cpus_per_worker))
    feats = resolve_resources(Resources(config.embed_workers, decode_cpus=config.decode_cpus))
    return train.cpus_per_worker, feats.cpus_per_worker, feats.decode_cpus


def latest_checkpoint(storage: str, name: str) -> Path | None:
    """The newest intact epoch_* folder of a run in local storage. Every checkpoint is read as
    plain tensors first: one carrying code stops the run (TrainError naming the file); a
    damaged one (a copy cut short by a kill) is skipped with a warning."""
    if "://" in storage:
        return None  # remote storage: Ray Train restores from its own record
    found = []
    for d in sorted((Path(storage) / name).glob("epoch_*")):
        try:
            found.append((int(read_state(d / STATE_FILE)["epoch"]), d))
        except UnsafeCheckpointError as e:
            raise TrainError(str(e)) from None
        except (CheckpointError, KeyError, TypeError, ValueError) as e:
            log.warning("Skipping checkpoint %s: %s", d, e)
    return max(found)[1] if found else None


def _state_from_result(result) -> dict:
    if result.checkpoint is None:
        raise TrainError("Training finished without a checkpoint; see the worker logs.")
    try:
        return load_state(result.checkpoint)
    except CheckpointError as e:
        raise TrainError(str(e)) from None


def _commit_model(run_dir: Path, head: DeviseHead, backbone_state: dict | None) -> Path:
    """Write RUN_DIR/model (head + spec, and backbone.pt when the backbone was tuned) into a temp
    folder, then swap it in, so a reader never sees a half-written model."""
    final = run_dir / "model"
    tmp = Path(tempfile.mkdtemp(prefix=".model-new.", dir=run_dir))
    staged = save_model(tmp / "model", head)
    if backbone_state is not None:
        torch.save(backbone_state, staged / BACKBONE_FILE)
    normal_mode(staged)
    if final.exists():
        old = run_dir / f".model-old-{os.getpid()}"
        final.rename(old)
        staged.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staged.rename(final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


def plot_losses(metrics: list[dict], out: str | os.PathLike) -> Path | None:
    """loss.png: per-batch train loss (rank 0), its rolling mean, test loss at each epoch end."""
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = [v for m in metrics for v in m.get("batch_losses", [])]
    ends = np.cumsum([len(m.get("batch_losses", [])) for m in metrics])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if batch:
        s = pd.Series(batch)
        ax.plot(s.index, s.values, color="tab:blue", alpha=0.25, lw=0.8, label="train (batch)")
        window = max(1, min(50, len(batch) // 10 or 1))
        ax.plot(
            s.index,
            s.rolling(window, min_periods=1).mean(),
            color="tab:blue",
            lw=2,
            label=f"train (rolling mean, {window} batches)",
        )
    ax.plot(ends, [m["test_loss"] for m in metrics], "o-", color="tab:orange", label="test")
    ax.set_xlabel("batch")
    ax.set_ylabel("loss")
    ax.set_title(f"DeViSE head: {len(metrics)} epochs")
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


class _StopOnSignals:
    """SIGTERM and Ctrl-C end a run cleanly: before Ray Train runs, at once (TrainStopped);
    while it runs, through Ray Train's own graceful abort (its SIGINT handler), so checkpoints
    stay intact. install() again after ray.init, which sets a SIGTERM handler of its own
    (sys.exit inside Ray's threads: a C-level abort, exit code 134)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.before: dict = {}

    def handler(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if signum == signal.SIGINT:  # the whole process ends within seconds, whatever hangs
            from devise.cli import interrupt_watchdog

            interrupt_watchdog()
        ray_handler = signal.getsignal(signal.SIGINT)
        if ray_handler != self.handler and callable(ray_handler):
            ray_handler(signal.SIGINT, frame)  # Ray Train is running: abort it gracefully
            return
        raise TrainStopped(signum)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self.before.setdefault(s, signal.signal(s, self.handler))

    def restore(self) -> None:
        for s, h in self.before.items():
            signal.signal(s, h)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training job; see the module docstring for what lands in RUN_DIR.

    Joins the Ray cluster at config.address / RAY_ADDRESS, else starts a local one; with
    config.local, trains in this process without Ray (one worker; the feature stage on the local
    executor). Rerunning the same config continues from the latest checkpoint; a finished run
    returns at once. SIGTERM or Ctrl-C raise TrainStopped (exit code 143 or 130), leaving
    resumable checkpoints.
    """
    stop = _StopOnSignals()
    stop.install()
    ray_before = _ray_initialized()
    try:
        return _train(config, stop.install)
    except TrainStopped as e:
        stopped = TrainStopped(stop.signum or e.signum, e.epoch or _last_epoch(config))
    except BaseException:
        if not stop.signum:
            raise
        # Ray Train's abort (or Ray's start, or a worker pool) surfaced as another error.
        stopped = TrainStopped(stop.signum, _last_epoch(config))
    finally:
        stop.restore()
    stopped.ray_joined_here = _ray_initialized() and not ray_before
    raise stopped


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _exit_at_once_at_exit(code: int) -> None:
    """End the process right after the CLI has printed the stop line, without ray.shutdown and
    the interpreter's teardown (seconds each, most of a stop's time). Nothing is lost: the run's
    state is on disk already; a local Ray this process started is fate-shared with it (its
    processes end with it) and a joined cluster drops this driver's job when it disconnects.
    It also keeps a Ray Data thread that the stop cut short from calling into a shut-down Ray,
    which ends the process with code 1 instead of the stop's code."""

    def now() -> None:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    atexit.register(now)  # after Ray's own handler, so it runs first (last in, first out)


def _last_epoch(config: TrainConfig) -> int | None:
    """The last epoch in RUN_DIR/metrics.jsonl (its checkpoint is what a rerun resumes from)."""
    try:
        metrics = read_metrics(Path(config.out).expanduser())
    except (OSError, ValueError):
        return None
    return int(metrics[-1]["epoch"]) if metrics else None


def _features(config: TrainConfig, catalog: pd.DataFrame, image_size: int):
    """The backbone features of the catalog's rows (from the cache, or computed: by Ray Data's
    actor pool, or with --local by the local executor in this process)."""
    from devise.features import extract_features
    from devise.pipeline import PipelineConfig

    if config.local:
        pipe = PipelineConfig(
            batch_size=config.embed_batch_size, use_gpu=config.use_gpu, engine=config.engine
        )
    else:
        _, embed_cpus, decode_cpus = _resources(config)
        pipe = PipelineConfig(
            batch_size=config.embed_batch_size,
            num_workers=config.embed_workers,
            cpus_per_worker=embed_cpus,
            decode_cpus=decode_cpus,
            use_gpu=config.use_gpu,
            gpus_per_worker=config.gpus_per_worker,
            engine=config.engine,
        )
    return extract_features(
        catalog,
        backbone=config.backbone,
        weights=config.weights,
        image_size=image_size,
        augment_views=config.augment_views,
        cache_dir=config.feature_cache,
        seed=config.seed,
        pipeline=pipe,
        local=config.local,
    )


def _choose_class_text(config, catalog, vectors, classes, x_train, arrays):
    """How classes are worded and how much ConSE is blended in (selection.plan): the given
    settings, or "auto" chosen on pseudo-unseen training classes. Returns the choice and the
    classes re-encoded in the chosen wording (the same keys, so feature arrays stay valid)."""
    from devise.evaluate import TrainRecipe, _embed, fit_aux_head
    from devise.labels import ClassVectors
    from devise.selection import classifier_labels, plan

    info = backbone_info(config.backbone)
    spec = HeadSpec(
        in_dim=info.feature_dim, out_dim=int(classes.matrix.shape[1]), kind=config.head,
        dropout=config.dropout,
    )  # fmt: skip
    recipe = TrainRecipe(
        epochs=config.epochs, lr=config.lr, batch_size=config.batch_size * config.num_workers,
        weight_decay=config.weight_decay, loss=config.loss, margin=config.margin,
    )  # fmt: skip

    def fit_head(x, y, class_matrix, seed):
        head = fit_aux_head(spec, x, y, class_matrix, recipe.epochs, seed, recipe)
        return lambda rows: _embed(head, rows)

    labels = classifier_labels(config.backbone, config.weights)
    targets = None if arrays is None else arrays["train"]["target"]
    try:
        choice, chosen = plan(
            config.class_text, config.conse_weight, training_class_infos(catalog, _class_texts(config)),
            classes.keys, vectors, labels, x_train, targets, fit_head, config.seed,
        )  # fmt: skip
    except ValueError as e:
        raise TrainError(str(e)) from None
    if choice.table:
        print(
            f"Class text: {choice.wording}; ConSE weight {choice.conse_weight:.1f} "
            f"(chosen on pseudo-unseen training classes, H {choice.h:.1f})",
            flush=True,
        )
    cv = ClassVectors(
        list(classes.keys), list(classes.names), chosen.class_matrix, list(classes.missing),
        labels, chosen.label_vectors,
    )  # fmt: skip
    return choice, cv


def _with_conse(spec: HeadSpec, state: dict, classes) -> DeviseHead:
    """The trained head, with the ConSE branch filled when the backbone has a classifier."""
    labels = classes.labels
    if labels is not None:
        spec.conse_classes = len(labels.infos)
    head = DeviseHead(spec)
    head.load_state_dict(state, strict=labels is None)
    if labels is not None:
        head.set_conse(
            torch.from_numpy(labels.weight),
            torch.from_numpy(labels.bias),
            torch.from_numpy(classes.label_vectors),
        )
    return head.eval()


def _check_shared(storage: str) -> None:
    """Ray Train's workers write checkpoints where they run, and a restarted worker reads them
    wherever it lands: on several nodes a local folder must be one that every node mounts."""
    from devise.runtime import unseen_on_nodes

    unseen = unseen_on_nodes(storage)
    if unseen:
        raise TrainError(
            f"The checkpoint folder {storage} is not visible on {len(unseen)} of the cluster's "
            f"nodes (e.g. node {unseen[0][:12]}); on a multi-node cluster pass --storage a folder "
            "every node mounts (NFS) or an object-store URI such as s3://bucket/prefix."
        )


def _fit_ray(
    config: TrainConfig, loop_cfg: LoopConfig, arrays: dict, storage: str, name: str, run_dir: Path
) -> tuple[dict, str | None]:
    """train_loop on Ray Train DDP workers; (the final state, its checkpoint's path)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cpus, _, _ = _resources(config)
    resources = {"CPU": cpus}
    if config.use_gpu:
        resources["GPU"] = config.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker=resources,
            placement_strategy=config.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            callbacks=[metrics_callback(run_dir / "metrics.jsonl")],
        ),
        datasets=_ray_datasets(arrays, config.num_workers),
    )
    ours = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    finally:  # fit leaves Ray Train's SIGINT handler in place
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, ours)
    return _state_from_result(result), result.checkpoint.path if result.checkpoint else None


def _fit_local(
    config: TrainConfig, loop_cfg: LoopConfig, arrays: dict, storage: str, name: str, run_dir: Path
) -> tuple[dict, str | None]:
    """train_loop in this process (world size 1), checkpoints in Ray Train's layout under
    storage/name; (the final state, its checkpoint's path)."""
    device = torch.device("cuda" if config.use_gpu else "cpu")
    writer = MetricsWriter(str(run_dir / "metrics.jsonl"))
    ctx = LocalContext(device, arrays, Path(storage) / name, config.keep_checkpoints, writer.record)
    train_loop(loop_cfg, ctx)
    latest = latest_checkpoint(storage, name)
    if latest is None:
        raise TrainError(f"Training left no checkpoint in {Path(storage) / name}; rerun it.")
    try:
        return read_state(latest / STATE_FILE), str(latest)
    except CheckpointError as e:
        raise TrainError(str(e)) from None


def _train(config: TrainConfig, after_ray_init: Callable[[], None]) -> TrainResult:
    _validate(config)
    catalog, vectors, classes = _read_inputs(config)
    info = backbone_info(config.backbone)
    image_size = int(config.image_size or info.image_size)
    spec = HeadSpec(
        in_dim=info.feature_dim,
        out_dim=int(classes.matrix.shape[1]),
        kind=config.head,
        dropout=config.dropout,
        backbone=config.backbone,
        backbone_weights=None if config.weights is None else str(Path(config.weights).resolve()),
        image_size=image_size,
        vectors=str(config.vectors),
        vectors_id=vectors.id,
        class_keys=list(classes.keys),
        class_names=list(classes.names),
    )
    excluded = set(catalog.loc[catalog["split"] == "train", "label"]) - set(classes.keys)
    name = run_name(config)
    resolved = {
        "config": asdict(config),
        "run_key": config.run_key(),
        "run_name": name,
        "image_size": image_size,
        "classes": {"keys": classes.keys, "names": classes.names, "excluded": sorted(excluded)},
        "rows": catalog["split"].value_counts().to_dict(),
    }
    run_dir = _claim_run_dir(config, resolved)
    storage = config.storage or str(run_dir / "checkpoints")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    resume = latest_checkpoint(storage, name)
    if not config.local:
        from devise.runtime import init_ray

        init_ray(config.address)
        after_ray_init()
        if "://" not in storage:
            _check_shared(storage)
    workers = 1 if config.local else config.num_workers

    arrays: dict = {}
    if config.mode == "cached":
        fs = _features(config, catalog, image_size)
        arrays = _feature_arrays(fs, classes)
        x_train = arrays["train"]["feature"]
        if len(x_train) < workers:
            raise TrainError(
                f"Only {len(x_train)} training rows for {workers} workers; "
                "lower --num-workers or add images."
            )
        x32 = x_train.astype(np.float32)
        choice, classes = _choose_class_text(config, catalog, vectors, classes, x32, arrays)
        spec.class_text, spec.conse_weight = choice.wording, choice.conse_weight
        resolved["class_text"] = {
            "wording": choice.wording,
            "conse_weight": choice.conse_weight,
            "H": choice.h,
            "candidates": choice.table,
            "note": choice.note,
        }
        source = CachedFeatures(mean=x32.mean(0), std=x32.std(0))
        resolved["features"] = {
            "path": str(fs.path),
            "key": fs.key,
            "rows": len(fs),
            "errors": len(fs.errors),
        }
        _write_json(run_dir / "config.json", resolved)
    else:
        choice, classes = _choose_class_text(config, catalog, vectors, classes, None, None)
        spec.class_text, spec.conse_weight = choice.wording, choice.conse_weight
        source = OnlineImages(
            backbone=config.backbone,
            weights=config.weights,
            image_size=image_size,
            train=_rows(catalog, "train", classes),
            test=_rows(catalog, "test", classes),
            unfreeze_last=config.unfreeze_last,
            backbone_lr=config.backbone_lr or config.lr / 10,
            loader_workers=config.loader_workers,
        )
        if len(source.train.paths) < workers:
            raise TrainError("Fewer training images than --num-workers; lower --num-workers.")
    loop_cfg = LoopConfig(
        spec=asdict(spec),
        class_matrix=classes.matrix,
        source=source,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        loss=config.loss,
        margin=config.margin,
        seed=config.seed,
        precision=config.precision,
        pause_after_epoch=config.pause_after_epoch,
        resume=None if resume is None else str(resume),
        epoch_line_every_s=console.line_every_s(),
    )

    before = read_metrics(run_dir)
    where = "in this process (no Ray)" if config.local else f"with {workers} workers"
    print(
        f"Training {config.head} head ({config.mode}, {config.backbone} @ {image_size}px) on "
        f"{len(classes.keys)} classes {where}; run {name} in {storage}"
        + (f"; resuming after epoch {before[-1]['epoch']}" if before else ""),
        flush=True,
    )
    fit = _fit_local if config.local else _fit_ray
    state, checkpoint_path = fit(config, loop_cfg, arrays, storage, name, run_dir)
    if int(state["epoch"]) < config.epochs:  # Ray Train was aborted (Ctrl-C or SIGTERM)
        raise TrainStopped(signal.SIGINT, int(state["epoch"]))
    head = _with_conse(spec, state["head"], classes)
    backbone_state = None
    if state.get("backbone") is not None:
        tuned = load_backbone(config.backbone, config.weights)
        tuned.load_state_dict(state["backbone"])
        backbone_state = export_weights(tuned)
        spec.backbone_weights = str(run_dir / "model" / BACKBONE_FILE)
        head.spec = spec
    model_dir = _commit_model(run_dir, head, backbone_state)
    np.save(run_dir / "class_vectors.npy", classes.matrix)
    metrics = read_metrics(run_dir)
    plot_losses(metrics, run_dir / "loss.png")
    if metrics:
        last = metrics[-1]
        print(
            f"Done: {len(metrics)} epochs, test hit@1 {last['test_hit1']:.3f}, "
            f"hit@5 {last['test_hit5']:.3f}; model in {model_dir}",
            flush=True,
        )
    return TrainResult(
        run_dir=run_dir,
        model_dir=model_dir,
        metrics=metrics,
        checkpoint_path=checkpoint_path,
        resumed=bool(before),
    )


# ---------------------------------------------------------------------------------------------
# CLI


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed `train` flags (the test hook PAUSE_ENV is read here)."""
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        values["pause_after_epoch"] = int(pause)
    return TrainConfig(**values)


def run_cli(args: argparse.Namespace) -> int:
    """`devise train` (flags: devise/commands/train.py). Stopped by a signal after joining or
    starting Ray itself, the process ends as soon as the stop line is out."""
    try:
        result = train(config_from_args(args))  # what it prints: devise.console
    except TrainStopped as e:
        if e.ray_joined_here:
            _exit_at_once_at_exit(e.EXIT_CODE)
        raise
    print(f"Run directory: {result.run_dir}")
    return 0
