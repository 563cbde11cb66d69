"""A training checkpoint's state.pt: read as plain tensors only (a file carrying code is
refused), loaded from a Ray Train checkpoint, and restored into the modules, the optimizer and
the gradient scaler."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

STATE_FILE = "state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; str() names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that carries more than tensors (pickled code): refused, never run."""


def read_state(path: str | Path) -> dict:
    """A checkpoint's state.pt, loaded as plain tensors and containers only (weights_only):
    a file carrying code is refused, never run. CheckpointError names the file otherwise."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise CheckpointError(
                f"Checkpoint {path} is damaged (truncated pickle); delete it."
            ) from None
        raise UnsafeCheckpointError(
            f"Checkpoint {path} holds more than tensors (pickled code) and was refused; "
            "delete it or pass a new --out."
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint {path} does not exist.") from None
    except Exception as e:  # noqa: BLE001 -- truncated or foreign file: one sentence
        raise CheckpointError(
            f"Checkpoint {path} cannot be read ({type(e).__name__}); it is damaged, delete it."
        ) from None


def load_state(checkpoint) -> dict | None:
    """The state of a ray.train.Checkpoint (None for no checkpoint)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return read_state(Path(d) / STATE_FILE)


def restore(state: dict | None, modules: dict[str, torch.nn.Module], opt, scaler) -> int:
    """Load a checkpoint's state into modules (by state key), the optimizer and the GradScaler.

    Returns the first epoch to run (1 without a state)."""
    if state is None:
        return 1
    for key, module in modules.items():
        if state.get(key) is not None:
            module.load_state_dict(state[key])
    opt.load_state_dict(state["optimizer"])
    if state.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1
