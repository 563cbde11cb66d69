"""The DeViSE head (features -> word-vector space) and its save/load as weights + spec JSON."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from devise.errors import DeviseError
from devise.fsutil import normal_mode

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "head.pt"
FORMAT_VERSION = 1


class ModelError(DeviseError, ValueError):
    """A saved model folder that cannot be read; str() names the file and what to do."""


@dataclass
class HeadSpec:
    """Everything needed to rebuild a trained head and use it for search."""

    in_dim: int
    out_dim: int
    kind: str = "mlp"  # "mlp" (the notebook's) or "linear" (the paper's)
    dropout: float = 0.2
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None
    image_size: int = 224
    vectors: str = "glove-100d"  # what --vectors was: an id or a path
    vectors_id: str = ""
    class_keys: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> HeadSpec:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class DeviseHead(nn.Module):
    """Backbone features (B, F) -> L2-normalised word-space vectors (B, D).

    Features are standardised with the training set's mean and std (buffers saved with the
    weights). kind="mlp" is the notebook's in -> 2D -> D -> D with ReLU and dropout;
    kind="linear" is the paper's single projection.
    """

    def __init__(self, spec: HeadSpec) -> None:
        super().__init__()
        self.spec = spec
        d, f = spec.out_dim, spec.in_dim
        self.register_buffer("feat_mean", torch.zeros(f))
        self.register_buffer("feat_std", torch.ones(f))
        if spec.kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(f, 2 * d),
                nn.ReLU(),
                nn.Dropout(spec.dropout),
                nn.Linear(2 * d, d),
                nn.ReLU(),
                nn.Dropout(spec.dropout),
                nn.Linear(d, d),
            )
        elif spec.kind == "linear":
            self.net = nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(f, d))
        else:
            raise ValueError(f"Unknown head kind {spec.kind!r}; choose 'mlp' or 'linear'.")

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training features' per-dimension mean and std (B, F) -> (F,)."""
        self.feat_mean.copy_(mean.to(self.feat_mean))
        self.feat_std.copy_(std.clamp_min(1e-6).to(self.feat_std))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(self.feat_mean.dtype) - self.feat_mean) / self.feat_std
        return F.normalize(self.net(x), dim=-1)


def save_model(out_dir: str | os.PathLike, head: DeviseHead) -> Path:
    """Write head weights + spec JSON into out_dir, replacing it atomically. Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    torch.save(state, tmp / WEIGHTS_FILE)
    (tmp / SPEC_FILE).write_text(head.spec.to_json())
    normal_mode(tmp)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
    return out_dir


def load_spec(model_dir: str | os.PathLike) -> HeadSpec:
    """Read a saved model's spec, after checking that its weights file is intact (so a job
    fails here, in one sentence, rather than later inside a Ray worker)."""
    path = Path(model_dir) / SPEC_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{model_dir} is not a devise model (no {SPEC_FILE}); pass the RUN_DIR/model folder "
            "written by `devise train`."
        )
    try:
        spec = HeadSpec.from_dict(json.loads(path.read_text()))
        DeviseHead(spec)
    except Exception as e:  # noqa: BLE001 -- broken JSON, wrong fields or values: one sentence
        raise ModelError(
            f"Model spec {path} is damaged ({type(e).__name__}); retrain with `devise train` or "
            "restore the file."
        ) from None
    _read_weights(Path(model_dir) / WEIGHTS_FILE)
    return spec


def _read_weights(path: Path, map_location: str = "cpu") -> dict:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ModelError(
            f"Model weights {path} are missing; retrain with `devise train`."
        ) from None
    except Exception as e:  # noqa: BLE001 -- truncated, foreign or code-carrying file
        raise ModelError(
            f"Model weights {path} cannot be read ({type(e).__name__}); the file is damaged, "
            "retrain with `devise train` or restore it."
        ) from None
    if not isinstance(state, dict):
        raise ModelError(f"Model weights {path} are not a state_dict; retrain with `devise train`.")
    return state


def load_model(model_dir: str | os.PathLike, map_location: str = "cpu") -> DeviseHead:
    """Rebuild a saved head (eval mode) from its spec and weights; ModelError (one sentence
    naming the file) when either is damaged."""
    spec = load_spec(model_dir)
    head = DeviseHead(spec)
    path = Path(model_dir) / WEIGHTS_FILE
    try:
        head.load_state_dict(_read_weights(path, map_location))
    except RuntimeError:
        raise ModelError(
            f"Model weights {path} do not match {SPEC_FILE}; retrain with `devise train`."
        ) from None
    return head.eval()


def model_id(model_dir: str | os.PathLike) -> str:
    """A short content hash of the spec and weights: same files, same id."""
    h = hashlib.sha256()
    for name in (SPEC_FILE, WEIGHTS_FILE):
        h.update((Path(model_dir) / name).read_bytes())
    return h.hexdigest()[:16]
