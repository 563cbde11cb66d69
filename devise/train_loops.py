"""The training loop of the DeViSE head: one epoch skeleton (seed, optimizer and scaler, steps,
all-reduced metrics, checkpoint save and restore) fed by one of two batch sources: cached
features (the default) or images through the backbone, the notebook's way. It runs on Ray Train
DDP workers (RayTrainContext) or in this process without Ray (LocalContext); the context is the
loop's only view of where it runs."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from devise.checkpoints import STATE_FILE, load_state, read_state, restore
from devise.model import DeviseHead, HeadSpec

log = logging.getLogger(__name__)


@dataclass
class Rows:
    """Catalog rows of one split for the online source: image paths and class indices."""

    paths: list[str]
    targets: list[int]


@dataclass
class CachedFeatures:
    """Batch source: the cached features, as the Train datasets "train" and "test" (columns
    feature, target); mean and std (F,) are the training features' statistics."""

    mean: np.ndarray
    std: np.ndarray


@dataclass
class OnlineImages:
    """Batch source: decode + augment every image every epoch and run the backbone inside the
    loop; unfreeze_last also trains the backbone's last block at backbone_lr."""

    backbone: str
    weights: str | None
    image_size: int
    train: Rows
    test: Rows
    unfreeze_last: bool = False
    backbone_lr: float = 1e-4
    loader_workers: int = 0


@dataclass
class LoopConfig:
    """What every Train worker gets from the driver."""

    spec: dict  # HeadSpec as a dict
    class_matrix: np.ndarray  # (C, D) unit class vectors, row = target index
    source: CachedFeatures | OnlineImages
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    loss: str
    margin: float
    seed: int
    precision: str
    pause_after_epoch: int | None = None  # test hook: rank 0 sleeps after this epoch's report
    resume: str | None = None  # a checkpoint folder to start from when Ray's run has none
    # Rank 0's epoch line at most this often (0: every epoch); the driver's closing line says
    # how the last epoch ended.
    epoch_line_every_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# Small pieces


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


def _starting_state(ctx, resume: str | None) -> dict | None:
    """The newer of the context's latest checkpoint of this run and the driver's resume folder."""
    states = [ctx.checkpoint_state()]
    if resume is not None:
        states.append(read_state(Path(resume) / STATE_FILE))
    states = [s for s in states if s is not None]
    return max(states, key=lambda s: s["epoch"]) if states else None


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


def _print_epoch(m: dict, epochs: int) -> None:
    print(
        f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.4f}  "
        f"test_loss {m['test_loss']:.4f}  hit@1 {m['test_hit1']:.3f}  "
        f"hit@5 {m['test_hit5']:.3f}  ({m['epoch_s']:.2f}s)",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# Where the loop runs: the few operations it needs from Ray Train, or their in-process versions


class RayTrainContext:
    """The loop on a Ray Train DDP worker: rank and device from Ray Train, dataset shards,
    checkpoints reported to Ray Train (rank 0), DDP-wrapped model."""

    def __init__(self) -> None:
        import ray.train

        _quiet_report_logs()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        # The Ray node this worker runs on; each rank reports it, metrics.jsonl lists them.
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False)

    def dataset_batches(self, name: str) -> Iterator[dict[str, np.ndarray]]:
        import ray.train

        shard = ray.train.get_dataset_shard(name)
        return shard.iter_batches(batch_size=8192, batch_format="numpy")

    def checkpoint_state(self) -> dict | None:
        import ray.train

        return load_state(ray.train.get_checkpoint())

    def report(self, metrics: dict, state: dict | None, name: str) -> None:
        """Metrics, with a checkpoint when state is given (rank 0); every rank reports."""
        import ray.train

        if state is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def _quiet_report_logs() -> None:
    """Ray Train logs every report with all its metrics (per-batch losses included) at INFO;
    the worker's own one-line epoch summary says what a user watching the logs needs."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class LocalContext:
    """The loop in this process without Ray, world size 1: datasets are arrays in memory,
    checkpoints land in folder/<name>/state.pt (the layout Ray Train writes, so either way can
    resume the other's run), the newest `keep` are kept, and on_report(metrics, checkpoint
    folder) runs once each is stored."""

    rank, world = 0, 1
    node = None  # no Ray node

    def __init__(
        self,
        device: torch.device,
        datasets: dict[str, dict[str, np.ndarray]],
        folder: str | Path,
        keep: int,
        on_report: Callable[[dict, str | None], None],
    ) -> None:
        self._device, self.datasets = device, datasets
        self.folder, self.keep, self.on_report = Path(folder), keep, on_report

    def device(self) -> torch.device:
        return self._device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # one process: nothing to synchronise

    def dataset_batches(self, name: str) -> Iterator[dict[str, np.ndarray]]:
        yield self.datasets[name]

    def checkpoint_state(self) -> dict | None:
        return None  # the driver passes the run's latest checkpoint as LoopConfig.resume

    def report(self, metrics: dict, state: dict | None, name: str) -> None:
        """Store the checkpoint (temp folder, then rename), then hand the metrics on."""
        from devise.fsutil import atomic_dir

        if state is None:
            self.on_report(metrics, None)
            return
        final = self.folder / name
        if final.exists():  # a damaged copy the driver skipped: this epoch was trained again
            shutil.rmtree(final)
        with atomic_dir(final) as tmp:
            torch.save(state, tmp / STATE_FILE)
        self.on_report(metrics, str(final))
        done = sorted(p for p in self.folder.glob("epoch_*") if p.is_dir())
        for old in done[: max(0, len(done) - max(1, self.keep))]:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Batch sources: each gives the model to train, what to checkpoint, and the batches


class _CachedSource:
    """Features read once from this worker's dataset shards into memory (features are small
    and the epochs many: re-streaming through Ray Data each epoch costs far more)."""

    decode_errors = False

    def __init__(self, cfg: CachedFeatures, head: DeviseHead, ctx, device, bs) -> None:
        head.set_feature_stats(
            torch.from_numpy(np.array(cfg.mean, np.float32)),  # a copy: Ray's arrays are
            torch.from_numpy(np.array(cfg.std, np.float32)),  # read-only
        )
        self.model, self.device, self.bs = head, device, bs
        self.x_train, self.y_train = self._shard(ctx, "train")
        self.x_test, self.y_test = self._shard(ctx, "test")
        self.n_train = len(self.y_train)
        self.errors = 0

    def _shard(self, ctx, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for batch in ctx.dataset_batches(name):
            xs.append(batch["feature"])
            ys.append(batch["target"])
        if not xs:
            return torch.zeros((0, 0)), torch.zeros(0, dtype=torch.int64)
        x = torch.from_numpy(np.concatenate(xs)).to(self.device)
        return x, torch.from_numpy(np.concatenate(ys).astype(np.int64)).to(self.device)

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": lr}]

    def saved(self) -> dict[str, torch.nn.Module]:
        return {"head": self.model}

    def fresh_start(self, all_reduce) -> None:
        """Nothing to prepare: the driver computed the feature statistics."""

    def train_batches(self, order: torch.Tensor) -> Iterator:
        order = order.to(self.device)
        for s in range(0, len(order), self.bs):
            idx = order[s : s + self.bs]
            yield self.x_train[idx].float(), self.y_train[idx], None

    def test_batches(self) -> Iterator:
        for a in range(0, len(self.y_test), 4096):
            yield self.x_test[a : a + 4096].float(), self.y_test[a : a + 4096]


class _ImageRows(torch.utils.data.Dataset):
    """Catalog rows -> (uint8 image (S, S, 3), target, ok); a fresh augmentation each call when
    augment=True. A file that cannot be decoded gives ok=False and a black image."""

    def __init__(self, rows: Rows, backbone: str, image_size: int, augment: bool) -> None:
        self.paths, self.targets = list(rows.paths), list(rows.targets)
        self.backbone, self.size, self.augment = backbone, image_size, augment
        self._transform = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from devise.backbones import backbone_info, prepare_transform
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


class _OnlineSource:
    """This worker's share of the catalog rows, decoded (and augmented) every epoch."""

    decode_errors = True

    def __init__(self, cfg: OnlineImages, head: DeviseHead, ctx, device, bs) -> None:
        from devise.backbones import load_backbone

        self.cfg, self.device, self.bs = cfg, device, bs
        self.backbone = load_backbone(cfg.backbone, cfg.weights)
        self.tuned = self.backbone.unfreeze_last() if cfg.unfreeze_last else []
        self.head = head
        self.model = OnlineModel(self.backbone, head, train_backbone=bool(self.tuned))
        rank, world = ctx.rank, ctx.world
        self.train_rows = Rows(cfg.train.paths[rank::world], cfg.train.targets[rank::world])
        self.test_rows = Rows(cfg.test.paths[rank::world], cfg.test.targets[rank::world])
        self.n_train = len(self.train_rows.paths)
        self.errors = 0

    def _loader(self, rows: Rows, augment: bool, sampler=None):
        ds = _ImageRows(rows, self.cfg.backbone, self.cfg.image_size, augment)
        return torch.utils.data.DataLoader(
            ds, batch_size=self.bs, sampler=sampler, num_workers=self.cfg.loader_workers
        )

    def param_groups(self, lr: float) -> list[dict]:
        groups = [{"params": list(self.head.parameters()), "lr": lr}]
        if self.tuned:
            groups.append({"params": self.tuned, "lr": self.cfg.backbone_lr})
        return groups

    def saved(self) -> dict[str, torch.nn.Module]:
        return {"head": self.head, "backbone": self.backbone} if self.tuned else {"head": self.head}

    def fresh_start(self, all_reduce) -> None:
        """Standardisation stats of the plain training images' features, over all workers."""
        dim = self.backbone.info.feature_dim
        f_sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
        f_sq = torch.zeros_like(f_sum)
        n = 0
        for images, _, ok in self._loader(self.train_rows, augment=False):
            with torch.no_grad():
                f = self.backbone(images[ok].to(self.device)).double()
            f_sum, f_sq, n = f_sum + f.sum(0), f_sq + (f * f).sum(0), n + len(f)
        tot = all_reduce([n, *f_sum.cpu().tolist(), *f_sq.cpu().tolist()])
        n_all = max(tot[0], 1.0)
        mean = torch.tensor(tot[1 : 1 + dim]) / n_all
        var = torch.tensor(tot[1 + dim :]) / n_all - mean * mean
        self.head.set_feature_stats(mean.float(), var.clamp_min(0).sqrt().float())

    def train_batches(self, order: torch.Tensor) -> Iterator:
        loader = self._loader(self.train_rows, augment=True, sampler=order.tolist())
        for images, targets, ok in loader:
            self.errors += int((~ok).sum())
            yield images.to(self.device), targets.to(self.device), ok.to(self.device)

    def test_batches(self) -> Iterator:
        for images, targets, ok in self._loader(self.test_rows, augment=False):
            self.errors += int((~ok).sum())
            if ok.any():
                yield images[ok].to(self.device), targets[ok].to(self.device)


# ---------------------------------------------------------------------------------------------
# The loop


def train_loop(cfg: LoopConfig, ctx: RayTrainContext | LocalContext | None = None) -> None:
    """The training loop on every DDP worker (ctx None: a Ray Train worker, as TorchTrainer
    calls it) or in this process (a LocalContext): Adam, an all-reduced metrics line and (rank
    0) a checkpoint every epoch; resumes from the latest checkpoint."""
    from devise.losses import get_loss

    ctx = ctx or RayTrainContext()
    rank, world = ctx.rank, ctx.world
    device = ctx.device()
    torch.manual_seed(cfg.seed)

    head = DeviseHead(HeadSpec.from_dict(cfg.spec))
    kind = _CachedSource if isinstance(cfg.source, CachedFeatures) else _OnlineSource
    source = kind(cfg.source, head, ctx, device, cfg.batch_size)
    source.model.to(device)
    opt = torch.optim.Adam(source.param_groups(cfg.lr), weight_decay=cfg.weight_decay)
    amp_on, amp_dtype, use_scaler = _autocast(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    state = _starting_state(ctx, cfg.resume)
    start = restore(state, source.saved(), opt, scaler)
    if state is None:
        source.fresh_start(lambda values: _all_reduce(values, device))
    elif rank == 0:
        print(f"Resuming from the checkpoint of epoch {state['epoch']}.", flush=True)
    ddp = ctx.prepare_model(source.model)

    loss_fn = get_loss(cfg.loss)
    loss_kwargs = {"margin": cfg.margin} if cfg.loss == "rank" else {}
    classes = torch.from_numpy(np.array(cfg.class_matrix, np.float32)).to(device)  # a copy

    def objective(pred, targets):
        return loss_fn(pred, classes, targets, **loss_kwargs)

    amp = (device, amp_dtype, amp_on)  # how every forward pass is autocast
    bs = cfg.batch_size
    steps = max(1, math.ceil(_all_reduce([source.n_train], device, op="max")[0] / bs))
    last_line = time.perf_counter()
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        ddp.train()
        # Seeded per epoch and rank, so a resumed run draws what an uninterrupted one would.
        torch.manual_seed(cfg.seed * 7919 + epoch * 31 + rank)  # dropout, augmentation
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch * 1009 + rank)
        order = _epoch_indices(source.n_train, steps, bs, gen)
        losses = _train_epoch(ddp, source, order, steps, opt, scaler, objective, amp)
        test_loss_sum, h1, h5, n_test = _test_epoch(source, objective, classes, amp)
        losses = losses.cpu()
        sums = _all_reduce(
            [float(losses.sum()), steps, test_loss_sum, h1, h5, n_test, source.errors], device
        )
        m = _epoch_metrics(
            epoch, start, sums[:6], time.perf_counter() - t0, world, losses, source.n_train
        )
        if source.decode_errors:
            m["decode_errors"] = int(sums[6])
        if ctx.node is not None:
            m["node"] = ctx.node
        source.errors = 0
        state = None
        if rank == 0:
            now = time.perf_counter()
            every = cfg.epoch_line_every_s
            if not every or (epoch < cfg.epochs and now - last_line >= every):
                _print_epoch(m, cfg.epochs)
                last_line = now
            state = {
                "epoch": epoch,
                **{k: _cpu(mod.state_dict()) for k, mod in source.saved().items()},
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if use_scaler else None,
                "spec": cfg.spec,
            }
        ctx.report(m, state, f"epoch_{epoch:04d}")
        if cfg.pause_after_epoch == epoch and rank == 0:
            time.sleep(600)  # test hook: keep the run alive until the test kills it


def _train_epoch(ddp, source, order, steps, opt, scaler, objective, amp) -> torch.Tensor:
    """One pass over this rank's share of the training rows; the loss of every step."""
    device, amp_dtype, enabled = amp
    losses = torch.zeros(steps, device=device)
    for s, (x, targets, ok) in enumerate(source.train_batches(order)):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=enabled):
            pred = ddp(x)
        if ok is None or ok.all():
            loss = objective(pred.float(), targets)
        elif ok.any():
            loss = objective(pred[ok].float(), targets[ok])
        else:  # only broken images: a step still runs on every rank (DDP)
            loss = pred.float().sum() * 0.0
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses[s] = loss.detach()
    return losses


def _test_epoch(source, objective, classes, amp) -> tuple[float, int, int, int]:
    """This rank's test rows: (summed loss, hits@1, hits@5, rows)."""
    device, amp_dtype, enabled = amp
    source.model.eval()
    test_loss_sum, h1, h5, n_test = 0.0, 0, 0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=enabled):
        for x, targets in source.test_batches():
            pred = source.model(x).float()
            test_loss_sum += float(objective(pred, targets)) * len(x)
            a1, a5 = _hits(pred, classes, targets)
            h1, h5, n_test = h1 + a1, h5 + a5, n_test + len(targets)
    return test_loss_sum, h1, h5, n_test


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}
