"""Ray Train worker loops of the DeViSE head: over cached features (the default) and online, the
notebook's way (backbone in the loop). Each runs on every DDP worker; rank 0 checkpoints."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from devise.backbones import backbone_info
from devise.model import DeviseHead, HeadSpec

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


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


def load_state(checkpoint) -> dict | None:
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


def _worker_context(cfg: dict) -> tuple[int, int, torch.device]:
    """This Train worker's (rank, world size, device); seeds torch and quiets Ray's report logs."""
    import ray.train
    import ray.train.torch

    _quiet_report_logs()
    ctx = ray.train.get_context()
    torch.manual_seed(cfg["seed"])
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def _resume(modules: dict[str, torch.nn.Module], opt, rank: int) -> tuple[dict | None, int]:
    """Load the latest checkpoint (if any) into modules (by state key) and the optimizer.

    Returns (state or None, first epoch to run)."""
    import ray.train

    state = load_state(ray.train.get_checkpoint())
    if state is None:
        return None, 1
    for key, module in modules.items():
        if state.get(key) is not None:
            module.load_state_dict(state[key])
    opt.load_state_dict(state["optimizer"])
    if rank == 0:
        print(f"Resuming from the checkpoint of epoch {state['epoch']}.", flush=True)
    return state, state["epoch"] + 1


def cached_train_loop(cfg: dict) -> None:
    """Ray Train loop over cached features: DDP head, Adam, checkpoint + report every epoch."""
    import ray.train
    import ray.train.torch

    from devise.losses import get_loss

    rank, world, device = _worker_context(cfg)
    head = _build_head(cfg["spec"], cfg["stats"])
    opt = torch.optim.Adam(head.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    history: list[dict] = []
    state, start = _resume({"head": head}, opt, rank)
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
    import ray.train.torch

    from devise.backbones import load_backbone
    from devise.losses import get_loss

    rank, world, device = _worker_context(cfg)
    backbone = load_backbone(cfg["backbone"], cfg["weights"])
    tuned = backbone.unfreeze_last() if cfg["unfreeze_last"] else []
    head = _build_head(cfg["spec"], None)
    model = OnlineModel(backbone, head, train_backbone=bool(tuned))
    groups = [{"params": list(head.parameters()), "lr": cfg["lr"]}]
    if tuned:
        groups.append({"params": tuned, "lr": cfg["backbone_lr"]})
    opt = torch.optim.Adam(groups, weight_decay=cfg["weight_decay"])
    state, start = _resume({"head": head, "backbone": backbone}, opt, rank)
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
