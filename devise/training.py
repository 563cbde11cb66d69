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

import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from devise import console
from devise.backbones import backbone_info, export_weights, load_backbone
from devise.checkpoints import STATE_FILE, CheckpointError, read_state
from devise.config import (
    HEADS,
    MODES,
    PIPELINE_RESOURCES,
    PRECISIONS,
    TRAIN_RESOURCES,
    PipelineConfig,
    Resources,
    TrainConfig,
)
from devise.model import HeadSpec
from devise.runs import (
    BACKBONE_FILE,
    MetricsWriter,
    TrainError,
    TrainResult,
    TrainStopped,
    claim_run_dir,
    commit_model,
    last_epoch,
    latest_checkpoint,
    metrics_callback,
    plot_losses,
    read_metrics,
    run_name,
    state_from_result,
    write_json,
)
from devise.train_inputs import (
    catalog_rows,
    choose_class_text,
    feature_arrays,
    ray_datasets,
    read_inputs,
    with_conse,
)
from devise.train_loops import CachedFeatures, LocalContext, LoopConfig, OnlineImages, train_loop

log = logging.getLogger(__name__)

# Test hook (read by the CLI at call time): rank 0 sleeps after this epoch's checkpoint is
# reported, so a test can kill the run at a known point. Never set it in real runs.
PAUSE_ENV = "DEVISE_TEST_PAUSE_AFTER_EPOCH"


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
        raise TrainError(
            f"Unknown precision {config.precision!r}; choose one of {', '.join(PRECISIONS)}."
        )
    if config.unfreeze_last and config.mode != "online":
        raise TrainError("--unfreeze-last needs --mode online (cached features are frozen).")
    if config.epochs < 1 or config.batch_size < 1:
        raise TrainError("--epochs and --batch-size must be at least 1.")
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
    if config.local and config.resources.use_gpu and not torch.cuda.is_available():
        raise TrainError("--use-gpu was given but this machine has no CUDA GPU; drop --use-gpu.")
    try:
        backbone_info(config.backbone)
    except ValueError as e:
        raise TrainError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Driver side: putting it together


def _stage_resources(config: TrainConfig) -> tuple[Resources, Resources]:
    """(Train workers, feature stage), resolved once for the cluster this process joined: the
    workers as given, the feature stage's embed_workers actors at a fair CPU share each."""
    from devise.runtime import resolve_resources

    res = config.resources
    if config.local:  # one worker; the feature stage on the local executor, which sizes itself
        return replace(res, num_workers=1), replace(PIPELINE_RESOURCES, batch_size=res.batch_size,
            use_gpu=res.use_gpu, gpus_per_worker=res.gpus_per_worker, engine=res.engine)  # fmt: skip
    feats = replace(res, num_workers=config.embed_workers, cpus_per_worker=None)
    return resolve_resources(res), resolve_resources(feats)


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
        stopped = TrainStopped(stop.signum or e.signum, e.epoch or last_epoch(config))
    except BaseException:
        if not stop.signum:
            raise
        # Ray Train's abort (or Ray's start, or a worker pool) surfaced as another error.
        stopped = TrainStopped(stop.signum, last_epoch(config))
    finally:
        stop.restore()
    stopped.ray_joined_here = _ray_initialized() and not ray_before
    raise stopped


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def exit_at_once_at_exit(code: int) -> None:
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


def _features(config: TrainConfig, catalog: pd.DataFrame, image_size: int, res: Resources):
    """The backbone features of the catalog's rows (from the cache, or computed: by Ray Data's
    actor pool, or with --local by the local executor in this process)."""
    from devise.features import extract_features

    return extract_features(
        catalog,
        backbone=config.backbone,
        weights=config.weights,
        image_size=image_size,
        augment_views=config.augment_views,
        cache_dir=config.feature_cache,
        seed=config.seed,
        pipeline=PipelineConfig(resources=res),
        local=config.local,
    )


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


def _fit_ray(config: TrainConfig, run: _Run, loop_cfg: LoopConfig, arrays: dict):
    """train_loop on Ray Train DDP workers; (the final state, its checkpoint's path)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    res = run.workers
    resources = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        resources["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.use_gpu,
            resources_per_worker=resources,
            placement_strategy=config.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=run.storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            callbacks=[metrics_callback(run.dir / "metrics.jsonl")],
        ),
        datasets=ray_datasets(arrays, res.num_workers),
    )
    ours = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    finally:  # fit leaves Ray Train's SIGINT handler in place
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, ours)
    return state_from_result(result), result.checkpoint.path if result.checkpoint else None


def _fit_local(config: TrainConfig, run: _Run, loop_cfg: LoopConfig, arrays: dict):
    """train_loop in this process (world size 1), checkpoints in Ray Train's layout under
    storage/name; (the final state, its checkpoint's path)."""
    device = torch.device("cuda" if run.workers.use_gpu else "cpu")
    writer = MetricsWriter(str(run.dir / "metrics.jsonl"))
    folder = Path(run.storage) / run.name
    ctx = LocalContext(device, arrays, folder, config.keep_checkpoints, writer.record)
    train_loop(loop_cfg, ctx)
    latest = latest_checkpoint(run.storage, run.name)
    if latest is None:
        raise TrainError(f"Training left no checkpoint in {folder}; rerun it.")
    try:
        return read_state(latest / STATE_FILE), str(latest)
    except CheckpointError as e:
        raise TrainError(str(e)) from None


@dataclass
class _Run:
    """Where a run lives and what it runs on, settled before the first epoch."""

    dir: Path
    storage: str  # Ray Train storage: a folder (resolved) or an object-store URI
    name: str
    resume: Path | None  # the checkpoint a rerun continues from
    resolved: dict  # what RUN_DIR/config.json holds
    workers: Resources = TRAIN_RESOURCES  # the Train workers, resolved
    features: Resources = PIPELINE_RESOURCES  # the feature stage, resolved


def _head_spec(config: TrainConfig, vectors, classes) -> HeadSpec:
    info = backbone_info(config.backbone)
    return HeadSpec(
        in_dim=info.feature_dim,
        out_dim=int(classes.matrix.shape[1]),
        kind=config.head,
        dropout=config.dropout,
        backbone=config.backbone,
        backbone_weights=None if config.weights is None else str(Path(config.weights).resolve()),
        image_size=int(config.image_size or info.image_size),
        vectors=str(config.vectors),
        vectors_id=vectors.id,
        class_keys=list(classes.keys),
        class_names=list(classes.names),
    )


def _start_run(config: TrainConfig, catalog: pd.DataFrame, classes, spec: HeadSpec) -> _Run:
    """Claim RUN_DIR (config.json), find the checkpoint to resume from, and join Ray."""
    excluded = set(catalog.loc[catalog["split"] == "train", "label"]) - set(classes.keys)
    name = run_name(config)
    resolved = {
        "config": asdict(config),
        "run_key": config.run_key(),
        "run_name": name,
        "image_size": spec.image_size,
        "classes": {"keys": classes.keys, "names": classes.names, "excluded": sorted(excluded)},
        "rows": catalog["split"].value_counts().to_dict(),
    }
    run_dir = claim_run_dir(config, resolved)
    storage = config.storage or str(run_dir / "checkpoints")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return _Run(run_dir, storage, name, latest_checkpoint(storage, name), resolved)


def _join_ray(config: TrainConfig, run: _Run, after_ray_init: Callable[[], None]) -> None:
    """Join (or start) Ray unless --local, then resolve the run's resources once."""
    if not config.local:
        from devise.runtime import init_ray

        init_ray(config.address)
        after_ray_init()
        if "://" not in run.storage:
            _check_shared(run.storage)
    run.workers, run.features = _stage_resources(config)


def _cached_source(config, run: _Run, catalog, vectors, classes, spec: HeadSpec):
    """Cached mode: the backbone's features once, the class text chosen on them, and the
    feature arrays the workers read; (source, arrays, classes in the chosen wording)."""
    fs = _features(config, catalog, spec.image_size, run.features)
    arrays = feature_arrays(fs, classes)
    x_train = arrays["train"]["feature"]
    if len(x_train) < run.workers.num_workers:
        raise TrainError(
            f"Only {len(x_train)} training rows for {run.workers.num_workers} workers; "
            "lower --num-workers or add images."
        )
    x32 = x_train.astype(np.float32)
    choice, classes = choose_class_text(config, catalog, vectors, classes, x32, arrays)
    spec.class_text, spec.conse_weight = choice.wording, choice.conse_weight
    run.resolved["class_text"] = {
        "wording": choice.wording,
        "conse_weight": choice.conse_weight,
        "H": choice.h,
        "candidates": choice.table,
        "note": choice.note,
    }
    run.resolved["features"] = {
        "path": str(fs.path),
        "key": fs.key,
        "rows": len(fs),
        "errors": len(fs.errors),
    }
    write_json(run.dir / "config.json", run.resolved)
    return CachedFeatures(mean=x32.mean(0), std=x32.std(0)), arrays, classes


def _online_source(config, run: _Run, catalog, vectors, classes, spec: HeadSpec):
    """Online mode (the notebook's way): images decoded and run through the backbone every
    epoch; (source, no arrays, classes in the chosen wording)."""
    choice, classes = choose_class_text(config, catalog, vectors, classes, None, None)
    spec.class_text, spec.conse_weight = choice.wording, choice.conse_weight
    source = OnlineImages(
        backbone=config.backbone,
        weights=config.weights,
        image_size=spec.image_size,
        train=catalog_rows(catalog, "train", classes),
        test=catalog_rows(catalog, "test", classes),
        unfreeze_last=config.unfreeze_last,
        backbone_lr=config.backbone_lr or config.lr / 10,
        loader_workers=config.loader_workers,
    )
    if len(source.train.paths) < run.workers.num_workers:
        raise TrainError("Fewer training images than --num-workers; lower --num-workers.")
    return source, {}, classes


def _loop_config(config: TrainConfig, run: _Run, spec: HeadSpec, classes, source) -> LoopConfig:
    return LoopConfig(
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
        resume=None if run.resume is None else str(run.resume),
        epoch_line_every_s=console.line_every_s(),
    )


def _train(config: TrainConfig, after_ray_init: Callable[[], None]) -> TrainResult:
    _validate(config)
    catalog, vectors, classes = read_inputs(config)
    spec = _head_spec(config, vectors, classes)
    run = _start_run(config, catalog, classes, spec)
    _join_ray(config, run, after_ray_init)
    prepare = _cached_source if config.mode == "cached" else _online_source
    source, arrays, classes = prepare(config, run, catalog, vectors, classes, spec)
    loop_cfg = _loop_config(config, run, spec, classes, source)
    before = read_metrics(run.dir)
    where = (
        "in this process (no Ray)" if config.local else f"with {run.workers.num_workers} workers"
    )
    print(
        f"Training {config.head} head ({config.mode}, {config.backbone} @ {spec.image_size}px) "
        f"on {len(classes.keys)} classes {where}; run {run.name} in {run.storage}"
        + (f"; resuming after epoch {before[-1]['epoch']}" if before else ""),
        flush=True,
    )
    fit = _fit_local if config.local else _fit_ray
    state, checkpoint_path = fit(config, run, loop_cfg, arrays)
    if int(state["epoch"]) < config.epochs:  # Ray Train was aborted (Ctrl-C or SIGTERM)
        raise TrainStopped(signal.SIGINT, int(state["epoch"]))
    return _finish(config, run, spec, state, classes, checkpoint_path, resumed=bool(before))


def _finish(config, run: _Run, spec: HeadSpec, state: dict, classes, checkpoint_path, resumed):
    """Commit the model (with the tuned backbone block, if any), class vectors and loss.png."""
    head = with_conse(spec, state["head"], classes)
    backbone_state = None
    if state.get("backbone") is not None:
        tuned = load_backbone(config.backbone, config.weights)
        tuned.load_state_dict(state["backbone"])
        backbone_state = export_weights(tuned)
        spec.backbone_weights = str(run.dir / "model" / BACKBONE_FILE)
        head.spec = spec
    model_dir = commit_model(run.dir, head, backbone_state)
    np.save(run.dir / "class_vectors.npy", classes.matrix)
    metrics = read_metrics(run.dir)
    plot_losses(metrics, run.dir / "loss.png")
    if metrics:
        last = metrics[-1]
        print(
            f"Done: {len(metrics)} epochs, test hit@1 {last['test_hit1']:.3f}, "
            f"hit@5 {last['test_hit5']:.3f}; model in {model_dir}",
            flush=True,
        )
    return TrainResult(
        run_dir=run.dir,
        model_dir=model_dir,
        metrics=metrics,
        checkpoint_path=checkpoint_path,
        resumed=resumed,
    )
