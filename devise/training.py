"""Training the DeViSE head with Ray Train (DDP): cached features or the notebook's online way,
a checkpoint every epoch, resume on rerun, metrics.jsonl, loss.png and the saved model.

Run layout (RUN_DIR is --out):
  config.json     the resolved config; a rerun with other settings into the same RUN_DIR is refused
  metrics.jsonl   one line per epoch (written on the driver's node as Ray Train reports them)
  checkpoints/    Ray Train storage (default; --storage moves it to shared storage)
  model/          head weights + spec.json (+ backbone.pt after --unfreeze-last)
  loss.png        per-batch train loss, its rolling mean, and test loss per epoch
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from devise.backbones import backbone_info
from devise.fsutil import normal_mode
from devise.model import DeviseHead, HeadSpec, save_model

log = logging.getLogger(__name__)

MODES = ("cached", "online")
HEADS = ("mlp", "linear")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STATE_FILE = "state.pt"
BACKBONE_FILE = "backbone.pt"
# Test hook (read by the CLI at call time): rank 0 sleeps after this epoch's checkpoint is
# reported, so a test can kill the run at a known point. Never set it in real runs.
PAUSE_ENV = "DEVISE_TEST_PAUSE_AFTER_EPOCH"


class TrainError(ValueError):
    """A training setting or input a user can fix; str() is one sentence saying how."""


@dataclass
class TrainConfig:
    """Everything `devise train` needs; written to RUN_DIR/config.json once resolved."""

    catalog: str
    out: str
    vectors: str = "glove-100d"
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    image_size: int | None = None  # None: the backbone's own size
    head: str = "mlp"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    dropout: float = 0.2
    loss: str = "rank"
    margin: float = 0.1
    mode: str = "cached"
    augment_views: int = 0
    unfreeze_last: bool = False
    backbone_lr: float | None = None  # --unfreeze-last: lr of the backbone block (default lr/10)
    max_train_per_class: int | None = None
    seed: int = 0
    precision: str = "auto"
    # Ray resources
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 1.0
    address: str | None = None
    decode_cpus: float | None = None
    embed_workers: int = 1
    embed_batch_size: int = 64
    loader_workers: int = 0  # online mode: DataLoader processes per train worker
    # Storage and fault tolerance
    storage: str | None = None
    feature_cache: str | None = None
    max_failures: int = 3
    keep_checkpoints: int = 2
    pause_after_epoch: int | None = None  # test hook, see PAUSE_ENV

    # Settings that do not change what a run computes: a rerun may change them and still resume.
    _RUN_FREE = (
        "epochs",
        "num_workers",
        "use_gpu",
        "cpus_per_worker",
        "gpus_per_worker",
        "address",
        "decode_cpus",
        "embed_workers",
        "embed_batch_size",
        "loader_workers",
        "feature_cache",
        "max_failures",
        "keep_checkpoints",
        "pause_after_epoch",
        "precision",
    )

    def run_key(self) -> str:
        """Hash of the settings that define the run; the Ray Train run name derives from it."""
        data = {k: v for k, v in asdict(self).items() if k not in self._RUN_FREE and k != "out"}
        data["catalog"] = str(Path(self.catalog).expanduser().resolve())
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class TrainResult:
    """What a finished `train` produced."""

    run_dir: Path
    model_dir: Path
    metrics: list[dict]
    checkpoint_path: str | None
    resumed: bool = False
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Driver side: inputs


def _validate(config: TrainConfig) -> None:
    from devise.losses import LOSSES

    if config.loss not in LOSSES:
        raise TrainError(f"Unknown loss {config.loss!r}; choose 'rank' or 'cosine'.")
    if config.head not in HEADS:
        raise TrainError(f"Unknown head {config.head!r}; choose 'mlp' or 'linear'.")
    if config.mode not in MODES:
        raise TrainError(f"Unknown mode {config.mode!r}; choose 'cached' or 'online'.")
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


def training_classes(catalog: pd.DataFrame, vectors) -> Any:
    """ClassVectors of the classes with training rows (never the held-out `unseen` ones).

    Classes without a word vector are excluded with a warning (labels.class_vectors)."""
    from devise.labels import ClassInfo, class_vectors

    train = catalog[catalog["split"] == "train"]
    if train.empty:
        raise TrainError("The catalog has no training rows (split 'train'); rebuild it.")
    names = train.groupby("label", sort=True)["class_name"].first()
    classes = [ClassInfo(str(k), [str(n)]) for k, n in names.items()]
    try:
        return class_vectors(classes, vectors)
    except ValueError as e:
        raise TrainError(str(e)) from None


def _read_inputs(config: TrainConfig):
    from devise.catalog import read_catalog
    from devise.vectors import load_vectors

    if not Path(config.catalog).expanduser().exists():
        raise TrainError(
            f"Catalog {config.catalog} does not exist; build one with `devise catalog ROOT`."
        )
    catalog = read_catalog(Path(config.catalog).expanduser())
    if "class_name" not in catalog.columns:
        catalog["class_name"] = catalog["label"]
    catalog = select_rows(catalog, config.max_train_per_class, config.seed)
    vectors = load_vectors(config.vectors)
    classes = training_classes(catalog, vectors)
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True, default=str)
        f.write("\n")
    normal_mode(tmp)
    os.replace(tmp, path)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The epoch lines of RUN_DIR/metrics.jsonl (empty when none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Ray Train callback logic (see metrics_callback): append rank 0's epoch metrics to
    RUN_DIR/metrics.jsonl once the epoch's checkpoint is stored. Runs on the Train controller,
    which Ray pins to the driver's node, so RUN_DIR is the driver's even on a cluster.

    An epoch already in the file (a rerun that resumed) is not written twice.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._epochs: set[int] | None = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics:
            return
        m = dict(metrics[0])
        if self._epochs is None:
            self._epochs = {int(r["epoch"]) for r in read_metrics(Path(self.path).parent)}
        epoch = int(m.get("epoch", -1))
        if epoch in self._epochs:
            return
        m["checkpoint"] = checkpoint.path if checkpoint is not None else None
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
# Worker side: shared pieces


def _autocast(device: torch.device, precision: str):
    """(enabled, dtype, needs GradScaler) for autocast: bf16/fp16 on GPU, fp32 on CPU."""
    if device.type != "cuda" or precision == "fp32":
        return False, torch.float32, False
    if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
        return True, torch.float16, True
    return True, torch.bfloat16, False


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    t = t.to(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _epoch_indices(n: int, steps: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """steps * batch indices into n rows: shuffled passes, repeated to equal every worker's
    step count (DDP hangs if ranks run different numbers of steps)."""
    need = steps * batch
    reps = max(1, math.ceil(need / max(n, 1)))
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:need]


def _hits(pred: torch.Tensor, class_matrix: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """How many rows have their class at rank 1 and within the top 5 (cosine to class vectors)."""
    k = min(5, class_matrix.shape[0])
    top = (pred.float() @ class_matrix.T).topk(k, dim=1).indices
    match = top == targets[:, None]
    return int(match[:, 0].sum()), int(match.any(dim=1).sum())


def _build_head(spec_dict: dict, stats: tuple | None) -> DeviseHead:
    head = DeviseHead(HeadSpec.from_dict(spec_dict))
    if stats is not None:
        head.set_feature_stats(torch.tensor(np.array(stats[0])), torch.tensor(np.array(stats[1])))
    return head


def _load_state(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)


def _report(
    metrics: dict, state: dict | None, epoch: int, rank: int, pause_after: int | None
) -> None:
    """rank 0 reports metrics + checkpoint; the others report the same metrics only."""
    import ray.train

    name = f"epoch_{epoch:04d}"
    if rank == 0 and state is not None:
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
    else:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
    if pause_after is not None and epoch == pause_after and rank == 0:
        time.sleep(600)  # test hook: keep the run alive until the test kills it


def _print_epoch(m: dict, epochs: int) -> None:
    print(
        f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  "
        f"test_loss {m['test_loss']:.4f}  hit@1 {m['test_hit1']:.3f}  "
        f"hit@5 {m['test_hit5']:.3f}  ({m['epoch_s']:.2f}s)",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# Worker side: cached features


def _load_shard(name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Read this worker's whole dataset shard once into memory (features are small and the
    epochs many: re-streaming through Ray Data each epoch costs far more than the epoch)."""
    import ray.train

    xs, ys = [], []
    shard = ray.train.get_dataset_shard(name)
    for batch in shard.iter_batches(batch_size=8192, batch_format="numpy"):
        xs.append(batch["feature"])
        ys.append(batch["target"])
    if xs:
        x = torch.from_numpy(np.concatenate(xs))
        y = torch.from_numpy(np.concatenate(ys).astype(np.int64))
    else:
        x, y = torch.zeros((0, 0), dtype=torch.float16), torch.zeros(0, dtype=torch.int64)
    return x.to(device), y.to(device)


def _quiet_report_logs() -> None:
    """Ray Train logs every report with all its metrics (per-batch losses included) at INFO;
    the worker's own one-line epoch summary says what a user watching the logs needs."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def cached_train_loop(cfg: dict) -> None:
    """Ray Train loop over cached features: DDP head, Adam, checkpoint + report every epoch."""
    import ray.train

    _quiet_report_logs()
    import ray.train.torch

    from devise.losses import get_loss

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"])
    head = _build_head(cfg["spec"], cfg["stats"])
    opt = torch.optim.Adam(head.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    start, history = 1, []
    state = _load_state(ray.train.get_checkpoint())
    if state is not None:
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
        if rank == 0:
            print(f"Resuming from the checkpoint of epoch {state['epoch']}.", flush=True)
    head.to(device)
    model = ray.train.torch.prepare_model(head)
    raw = model.module if hasattr(model, "module") else model
    amp, amp_dtype, use_scaler = _autocast(device, cfg["precision"])
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    if state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    loss_fn = get_loss(cfg["loss"])
    loss_kwargs = {"margin": cfg["margin"]} if cfg["loss"] == "rank" else {}
    classes = torch.as_tensor(np.asarray(cfg["class_matrix"]), dtype=torch.float32).to(device)

    x_train, y_train = _load_shard("train", device)
    x_test, y_test = _load_shard("test", device)
    bs = cfg["batch_size"]
    n_max = _all_reduce([len(y_train)], device, op="max")[0]
    steps = max(1, math.ceil(n_max / bs))
    for epoch in range(start, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(cfg["seed"] * 100003 + epoch * 1009 + rank)
        order = _epoch_indices(len(y_train), steps, bs, gen).to(device)
        batch_losses = torch.zeros(steps, device=device)
        for s in range(steps):
            idx = order[s * bs : (s + 1) * bs]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                pred = model(x_train[idx].float())
            loss = loss_fn(pred.float(), classes, y_train[idx], **loss_kwargs)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            batch_losses[s] = loss.detach()
        raw.eval()
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            test_loss_sum, h1, h5 = 0.0, 0, 0
            for a in range(0, len(y_test), 4096):
                xb, yb = x_test[a : a + 4096].float(), y_test[a : a + 4096]
                pred = raw(xb).float()
                test_loss_sum += float(loss_fn(pred, classes, yb, **loss_kwargs)) * len(yb)
                a1, a5 = _hits(pred, classes, yb)
                h1, h5 = h1 + a1, h5 + a5
        losses = batch_losses.cpu()
        sums = _all_reduce([float(losses.sum()), steps, test_loss_sum, h1, h5, len(y_test)], device)
        m = _epoch_metrics(
            epoch, start, sums, time.perf_counter() - t0, world, losses, len(y_train)
        )
        if rank == 0:
            _print_epoch(m, cfg["epochs"])
        history.append(m)
        state = None
        if rank == 0:
            state = {
                "epoch": epoch,
                "head": {k: v.detach().cpu() for k, v in raw.state_dict().items()},
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None,
                "spec": cfg["spec"],
            }
        _report(m, state, epoch, rank, cfg.get("pause_after_epoch"))


def _epoch_metrics(
    epoch: int, start: int, sums: list[float], seconds: float, world: int, losses, n_train: int
) -> dict:
    """One epoch's metrics from the all-reduced sums; start is the epoch this attempt began at
    (> 1 after a resume), so metrics.jsonl shows whether a rerun resumed or restarted."""
    train_loss_sum, steps, test_loss_sum, h1, h5, n_test = sums
    n_test = max(n_test, 1)
    return {
        "epoch": epoch,
        "start_epoch": start,
        "train_loss": train_loss_sum / max(steps, 1),
        "test_loss": test_loss_sum / n_test,
        "test_hit1": h1 / n_test,
        "test_hit5": h5 / n_test,
        "test_count": int(sums[5]),
        "epoch_s": seconds,
        "world_size": world,
        "rank0_train_rows": n_train,
        "batch_losses": [round(float(v), 5) for v in losses],
        "time": time.time(),
    }


# ---------------------------------------------------------------------------------------------
# Worker side: online (the notebook's way)


class _ImageRows(torch.utils.data.Dataset):
    """Catalog rows -> (uint8 image (S, S, 3), target, ok); a fresh augmentation each call when
    augment=True. A file that cannot be decoded gives ok=False and a black image."""

    def __init__(self, paths, targets, backbone: str, image_size: int, augment: bool) -> None:
        self.paths, self.targets = list(paths), list(targets)
        self.backbone, self.size, self.augment = backbone, image_size, augment
        self._transform = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from devise.backbones import prepare_transform
        from devise.images import decode_image, read_file_bytes

        if self._transform is None:
            info = backbone_info(self.backbone)
            self._transform = prepare_transform(info, self.size, augment=self.augment)
        try:
            img = self._transform(decode_image(read_file_bytes(self.paths[i])))
            ok = True
        except Exception:  # noqa: BLE001 -- counted and reported per epoch as decode_errors
            img = np.zeros((self.size, self.size, 3), dtype=np.uint8)
            ok = False
        return torch.from_numpy(np.ascontiguousarray(img)), self.targets[i], ok


class OnlineModel(torch.nn.Module):
    """Backbone inside the loop, then the head: uint8 images (B, S, S, 3) -> (B, D)."""

    def __init__(self, backbone, head: DeviseHead, train_backbone: bool) -> None:
        super().__init__()
        self.backbone, self.head, self.train_backbone = backbone, head, train_backbone

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # BatchNorm statistics stay the pretrained ones, also when tuning
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.train_backbone and self.training:
            return self.backbone(images)
        with torch.no_grad():
            return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).float())


def _loader(rows: dict, rank: int, world: int, cfg: dict, augment: bool, sampler=None):
    paths, targets = rows["paths"][rank::world], rows["targets"][rank::world]
    ds = _ImageRows(paths, targets, cfg["backbone"], cfg["image_size"], augment)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg["batch_size"],
        sampler=sampler,
        num_workers=cfg["loader_workers"],
        persistent_workers=False,
    )


def online_train_loop(cfg: dict) -> None:
    """Ray Train loop, the notebook's way: decode + augment every image every epoch and run the
    backbone inside the loop; --unfreeze-last also trains the backbone's last block."""
    import ray.train

    _quiet_report_logs()
    import ray.train.torch

    from devise.backbones import load_backbone
    from devise.losses import get_loss

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg["seed"])
    backbone = load_backbone(cfg["backbone"], cfg["weights"])
    tuned = backbone.unfreeze_last() if cfg["unfreeze_last"] else []
    head = _build_head(cfg["spec"], None)
    model = OnlineModel(backbone, head, train_backbone=bool(tuned))
    groups = [{"params": list(head.parameters()), "lr": cfg["lr"]}]
    if tuned:
        groups.append({"params": tuned, "lr": cfg["backbone_lr"]})
    opt = torch.optim.Adam(groups, weight_decay=cfg["weight_decay"])
    state = _load_state(ray.train.get_checkpoint())
    start = 1
    if state is not None:
        head.load_state_dict(state["head"])
        if state.get("backbone") is not None:
            backbone.load_state_dict(state["backbone"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
        if rank == 0:
            print(f"Resuming from the checkpoint of epoch {state['epoch']}.", flush=True)
    model.to(device)
    train_rows, test_rows = cfg["train_rows"], cfg["test_rows"]
    amp, amp_dtype, use_scaler = _autocast(device, cfg["precision"])
    if state is None:
        # Standardisation stats of the plain training images' features, over all workers.
        f_sum = f_sq = None
        n = 0
        for images, _, ok in _loader(train_rows, rank, world, cfg, augment=False):
            with torch.no_grad():
                f = backbone(images[ok].to(device)).double()
            f_sum = f.sum(0) if f_sum is None else f_sum + f.sum(0)
            f_sq = (f * f).sum(0) if f_sq is None else f_sq + (f * f).sum(0)
            n += len(f)
        dim = backbone.info.feature_dim
        f_sum = f_sum if f_sum is not None else torch.zeros(dim, dtype=torch.float64)
        f_sq = f_sq if f_sq is not None else torch.zeros(dim, dtype=torch.float64)
        tot = _all_reduce([n, *f_sum.cpu().tolist(), *f_sq.cpu().tolist()], device)
        n_all = max(tot[0], 1.0)
        mean = torch.tensor(tot[1 : 1 + dim]) / n_all
        var = torch.tensor(tot[1 + dim :]) / n_all - mean * mean
        head.set_feature_stats(mean.float(), var.clamp_min(0).sqrt().float())
    ddp = ray.train.torch.prepare_model(model, move_to_device=False)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    loss_fn = get_loss(cfg["loss"])
    loss_kwargs = {"margin": cfg["margin"]} if cfg["loss"] == "rank" else {}
    classes = torch.as_tensor(np.asarray(cfg["class_matrix"]), dtype=torch.float32).to(device)
    bs = cfg["batch_size"]
    n_local = len(train_rows["paths"][rank::world])
    steps = max(1, math.ceil(_all_reduce([n_local], device, op="max")[0] / bs))
    for epoch in range(start, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        ddp.train()
        gen = torch.Generator().manual_seed(cfg["seed"] * 100003 + epoch * 1009 + rank)
        torch.manual_seed(cfg["seed"] * 7919 + epoch * 31 + rank)  # fresh augmentation
        order = _epoch_indices(n_local, steps, bs, gen).tolist()
        losses, errors = [], 0
        for images, targets, ok in _loader(train_rows, rank, world, cfg, True, sampler=order):
            errors += int((~ok).sum())
            images, targets = images.to(device), targets.to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                pred = ddp(images)
            # Broken images count nothing toward the loss; a step still runs on every rank.
            keep = ok.to(device)
            if keep.any():
                loss = loss_fn(pred[keep].float(), classes, targets[keep], **loss_kwargs)
            else:
                loss = pred.float().sum() * 0.0
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach()))
        model.eval()
        test_loss_sum, h1, h5, n_test = 0.0, 0, 0, 0
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            for images, targets, ok in _loader(test_rows, rank, world, cfg, augment=False):
                errors += int((~ok).sum())
                images, targets = images[ok].to(device), targets[ok].to(device)
                if len(targets) == 0:
                    continue
                pred = model(images).float()
                test_loss_sum += float(loss_fn(pred, classes, targets, **loss_kwargs)) * len(
                    targets
                )
                a1, a5 = _hits(pred, classes, targets)
                h1, h5, n_test = h1 + a1, h5 + a5, n_test + len(targets)
        losses_t = torch.tensor(losses)
        sums = _all_reduce(
            [float(losses_t.sum()), len(losses), test_loss_sum, h1, h5, n_test, errors], device
        )
        m = _epoch_metrics(
            epoch, start, sums[:6], time.perf_counter() - t0, world, losses_t, n_local
        )
        m["decode_errors"] = int(sums[6])
        if rank == 0:
            _print_epoch(m, cfg["epochs"])
        state = None
        if rank == 0:
            state = {
                "epoch": epoch,
                "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                "backbone": (
                    {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
                    if tuned
                    else None
                ),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None,
                "spec": cfg["spec"],
            }
        _report(m, state, epoch, rank, cfg.get("pause_after_epoch"))


# ---------------------------------------------------------------------------------------------
# Driver side: putting it together


def _feature_datasets(fs, classes, config: TrainConfig):
    """Ray Datasets of (feature, target) for train (all views) and test (view 0) rows of the
    training classes, each split into many blocks so every worker gets a share."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    index = {k: i for i, k in enumerate(classes.keys)}

    def build(mask: np.ndarray):
        mask = mask & np.isin(fs.labels, classes.keys)
        x = np.asarray(fs.features[mask], dtype=np.float16)
        y = np.array([index[k] for k in fs.labels[mask]], dtype=np.int64)
        blocks = max(1, min(len(y), 4 * config.num_workers))
        tables = []
        for part in np.array_split(np.arange(len(y)), blocks):
            tables.append(
                pa.table(
                    {"feature": ArrowTensorArray.from_numpy(x[part]), "target": pa.array(y[part])}
                )
            )
        return ray.data.from_arrow(tables), x

    train_ds, x_train = build(fs.mask(splits=["train"]))
    test_ds, _ = build(fs.mask(splits=["test"], views=[0]))
    return train_ds, test_ds, x_train


def _rows(catalog: pd.DataFrame, split: str, classes) -> dict:
    index = {k: i for i, k in enumerate(classes.keys)}
    part = catalog[(catalog["split"] == split) & catalog["label"].isin(index)]
    return {"paths": part["path"].tolist(), "targets": [index[k] for k in part["label"]]}


def _resources(config: TrainConfig) -> tuple[float, float, float]:
    """(CPUs per train worker, CPUs per feature actor, CPUs per decode task)."""
    from devise.runtime import default_cpus_per_worker

    cpus = default_cpus_per_worker(config.cpus_per_worker, config.num_workers)
    embed = default_cpus_per_worker(None, config.embed_workers)
    decode = config.decode_cpus if config.decode_cpus is not None else min(1.0, embed)
    return cpus, embed, decode


def _state_from_result(result) -> dict:
    if result.checkpoint is None:
        raise TrainError("Training finished without a checkpoint; see the worker logs.")
    return _load_state(result.checkpoint)


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
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".png", dir=out.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    normal_mode(tmp)
    os.replace(tmp, out)
    return out


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training job; see the module docstring for what lands in RUN_DIR.

    Joins the Ray cluster at config.address / RAY_ADDRESS, else starts a local one. Rerunning
    the same config continues from the latest checkpoint; a finished run returns at once.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from devise.runtime import init_ray

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
        vectors_id=vectors.vectors_id,
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
    init_ray(config.address)
    cpus, embed_cpus, decode_cpus = _resources(config)

    loop_cfg: dict[str, Any] = {
        "spec": asdict(spec),
        "class_matrix": classes.matrix.tolist(),
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "backbone_lr": config.backbone_lr or config.lr / 10,
        "weight_decay": config.weight_decay,
        "loss": config.loss,
        "margin": config.margin,
        "seed": config.seed,
        "precision": config.precision,
        "pause_after_epoch": config.pause_after_epoch,
    }
    datasets = {}
    if config.mode == "cached":
        from devise.features import extract_features
        from devise.pipeline import PipelineConfig

        pipe = PipelineConfig(
            batch_size=config.embed_batch_size,
            num_workers=config.embed_workers,
            cpus_per_worker=embed_cpus,
            decode_cpus=decode_cpus,
            use_gpu=config.use_gpu,
            gpus_per_worker=config.gpus_per_worker,
        )
        fs = extract_features(
            catalog,
            backbone=config.backbone,
            weights=config.weights,
            image_size=image_size,
            augment_views=config.augment_views,
            cache_dir=config.feature_cache,
            seed=config.seed,
            pipeline=pipe,
        )
        train_ds, test_ds, x_train = _feature_datasets(fs, classes, config)
        if len(x_train) < config.num_workers:
            raise TrainError(
                f"Only {len(x_train)} training rows for {config.num_workers} workers; "
                "lower --num-workers or add images."
            )
        x32 = x_train.astype(np.float32)
        loop_cfg["stats"] = (x32.mean(0), x32.std(0))
        datasets = {"train": train_ds, "test": test_ds}
        resolved["features"] = {
            "path": str(fs.path),
            "key": fs.key,
            "rows": len(fs),
            "errors": len(fs.errors),
        }
        _write_json(run_dir / "config.json", resolved)
        loop = cached_train_loop
    else:
        loop_cfg.update(
            backbone=config.backbone,
            weights=config.weights,
            image_size=image_size,
            unfreeze_last=config.unfreeze_last,
            loader_workers=config.loader_workers,
            train_rows=_rows(catalog, "train", classes),
            test_rows=_rows(catalog, "test", classes),
        )
        if len(loop_cfg["train_rows"]["paths"]) < config.num_workers:
            raise TrainError("Fewer training images than --num-workers; lower --num-workers.")
        loop = online_train_loop

    resources = {"CPU": cpus}
    if config.use_gpu:
        resources["GPU"] = config.gpus_per_worker
    before = read_metrics(run_dir)
    print(
        f"Training {config.head} head ({config.mode}, {config.backbone} @ {image_size}px) on "
        f"{len(classes.keys)} classes with {config.num_workers} workers; run {name} in {storage}"
        + (f"; resuming after epoch {before[-1]['epoch']}" if before else ""),
        flush=True,
    )
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            callbacks=[metrics_callback(run_dir / "metrics.jsonl")],
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    state = _state_from_result(result)
    head = DeviseHead(spec)
    head.load_state_dict(state["head"])
    backbone_state = None
    if state.get("backbone") is not None:
        backbone_state = _export_backbone(config.backbone, config.weights, state["backbone"])
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
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        resumed=bool(before),
    )


def _export_backbone(name: str, weights: str | None, state: dict) -> dict:
    """A tuned FrozenBackbone's state -> the state_dict that load_backbone(name, weights=FILE)
    reads (the original network's keys), so embedding uses the fine-tuned weights."""
    from devise.backbones import load_backbone

    fb = load_backbone(name, weights)
    fb.load_state_dict(state)
    if name == "efficientnet_lite0":
        return {k: v.detach().clone() for k, v in fb.trunk.net.state_dict().items()}
    if name == "vgg16_bn":
        out = {f"features.{k}": v for k, v in fb.trunk.features.state_dict().items()}
        out.update({f"classifier.{k}": v for k, v in fb.trunk.head.state_dict().items()})
        out.update({f"classifier.6.{k}": v for k, v in fb.classifier.state_dict().items()})
        return out
    if name.startswith("resnet"):
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        out = {}
        for i, child in enumerate(names):
            out.update({f"{child}.{k}": v for k, v in fb.trunk[i].state_dict().items()})
        out.update({f"fc.{k}": v for k, v in fb.classifier.state_dict().items()})
        return out
    # The seeded test backbone: its trunk's own keys, as load_backbone("tiny", FILE) reads them.
    return {k: v.detach().clone() for k, v in fb.trunk.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# CLI


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The `train` flags (shared by `devise train` and jobs/train.py)."""
    from devise.runtime import add_ray_args

    p.add_argument("--catalog", required=True, help="catalog parquet from `devise catalog`")
    p.add_argument("--out", required=True, help="RUN_DIR for checkpoints, metrics and the model")
    p.add_argument("--vectors", default="glove-100d", help="glove-100d or a .vec/.txt PATH")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, help="backbone weights file (state_dict)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size (default: the backbone's; 64 is a good CPU choice)",
    )
    p.add_argument("--head", default="mlp", choices=HEADS)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--loss", default="rank", help="rank (the paper's) or cosine (the notebook's)")
    p.add_argument("--margin", type=float, default=0.1, help="rank loss margin")
    p.add_argument(
        "--mode",
        default="cached",
        choices=MODES,
        help="cached: backbone features computed once; online: the notebook's way",
    )
    p.add_argument(
        "--augment-views",
        type=int,
        default=0,
        help="cached mode: K augmented copies of each training image, computed once",
    )
    p.add_argument(
        "--unfreeze-last",
        action="store_true",
        help="online mode: also train the backbone's last block",
    )
    p.add_argument(
        "--backbone-lr",
        type=float,
        default=None,
        help="lr of the unfrozen block (default: --lr / 10)",
    )
    p.add_argument("--max-train-per-class", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="GPU autocast: auto = bf16 where supported, else fp16; CPU is fp32",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Ray Train storage for checkpoints (s3://... or NFS on multi-node "
        "clusters; default RUN_DIR/checkpoints)",
    )
    p.add_argument("--feature-cache", default=None, help="default $DEVISE_HOME/features")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures to retry")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    add_ray_args(p, workers_help="Ray Train workers (DDP)")
    g = p.add_argument_group("feature stage")
    g.add_argument("--embed-workers", type=int, default=1, help="backbone actors (cached mode)")
    g.add_argument("--embed-batch-size", type=int, default=64)
    g.add_argument("--decode-cpus", type=float, default=None, help="CPUs per decode task")
    g.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="online mode: DataLoader processes per train worker",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed `train` flags (the test hook PAUSE_ENV is read here)."""
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        values["pause_after_epoch"] = int(pause)
    return TrainConfig(**values)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the DeViSE head with Ray Train (resumes when rerun)"
    )
    add_train_args(p)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        result = train(config_from_args(args))
    print(f"Run directory: {result.run_dir}")
    return 0
