"""A training run's folder: its claim (config.json), metrics.jsonl, checkpoints, the committed
model and loss.png, and the errors a run ends with (see devise.training for the layout)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from devise.checkpoints import (
    STATE_FILE,
    CheckpointError,
    UnsafeCheckpointError,
    load_state,
    read_state,
)
from devise.config import TrainConfig
from devise.errors import DeviseError
from devise.fsutil import atomic_path, normal_mode
from devise.model import DeviseHead, save_model

log = logging.getLogger(__name__)


BACKBONE_FILE = "backbone.pt"


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


def run_name(config: TrainConfig) -> str:
    """Deterministic Ray Train run name: the same command gets the same name (and resumes)."""
    return f"devise-train-{config.run_key()}"


def claim_run_dir(config: TrainConfig, resolved: dict) -> Path:
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
    write_json(cfg_path, resolved)
    return run_dir


def write_json(path: Path, data: dict) -> None:
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


def state_from_result(result) -> dict:
    if result.checkpoint is None:
        raise TrainError("Training finished without a checkpoint; see the worker logs.")
    try:
        return load_state(result.checkpoint)
    except CheckpointError as e:
        raise TrainError(str(e)) from None


def commit_model(run_dir: Path, head: DeviseHead, backbone_state: dict | None) -> Path:
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


def last_epoch(config: TrainConfig) -> int | None:
    """The last epoch in RUN_DIR/metrics.jsonl (its checkpoint is what a rerun resumes from)."""
    try:
        metrics = read_metrics(Path(config.out).expanduser())
    except (OSError, ValueError):
        return None
    return int(metrics[-1]["epoch"]) if metrics else None
