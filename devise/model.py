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
    # How class names were put into words for the text space (labels.WORDINGS).
    class_text: str = "name"
    # The ConSE branch: the backbone's classifier (conse_classes outputs) and each output's
    # vector in the text space. An image's vector is the DeViSE projection blended with the
    # ConSE embedding (the classifier's top conse_top labels weighted by probability) with
    # weight conse_weight (0: DeViSE alone, 1: ConSE alone). 0 outputs: no branch.
    conse_classes: int = 0
    conse_weight: float = 0.0
    conse_top: int = 10
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
    kind="linear" is the paper's single projection. With a ConSE branch (spec.conse_classes),
    forward blends the trained projection with what the backbone's own classifier says
    (see HeadSpec); `devise` and `conse` give each part alone.
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
        if not 0.0 <= float(spec.conse_weight) <= 1.0:
            raise ValueError(f"conse_weight must lie in [0, 1], not {spec.conse_weight}.")
        if spec.conse_classes:
            c = int(spec.conse_classes)
            self.register_buffer("cls_weight", torch.zeros(c, f))
            self.register_buffer("cls_bias", torch.zeros(c))
            self.register_buffer("label_vectors", torch.zeros(c, d))
            self.register_buffer("label_known", torch.zeros(c, dtype=torch.bool))

    def set_conse(
        self, weight: torch.Tensor, bias: torch.Tensor, label_vectors: torch.Tensor
    ) -> None:
        """Fill the ConSE branch: the classifier's (C, F) weight and (C,) bias, and each
        output's (C, D) unit vector (a zero row: that label has no vector and is skipped)."""
        self.cls_weight.copy_(weight)
        self.cls_bias.copy_(bias)
        self.label_vectors.copy_(label_vectors)
        self.label_known.copy_(label_vectors.norm(dim=1) > 0)

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training features' per-dimension mean and std (B, F) -> (F,)."""
        self.feat_mean.copy_(mean.to(self.feat_mean))
        self.feat_std.copy_(std.clamp_min(1e-6).to(self.feat_std))

    def devise(self, features: torch.Tensor) -> torch.Tensor:
        """The trained projection alone (B, F) -> (B, D), unit rows."""
        x = (features.to(self.feat_mean.dtype) - self.feat_mean) / self.feat_std
        return F.normalize(self.net(x), dim=-1)

    def conse(self, features: torch.Tensor) -> torch.Tensor:
        """ConSE (Norouzi et al. 2014) alone (B, F) -> (B, D), unit rows: the classifier's top
        conse_top labels that have a vector, their vectors weighted by their probabilities."""
        x = features.to(self.cls_weight.dtype)
        probs = torch.softmax(x @ self.cls_weight.T + self.cls_bias, dim=-1)
        probs = probs.masked_fill(~self.label_known, 0.0)
        top = min(int(self.spec.conse_top), probs.shape[-1])
        weights, idx = probs.topk(top, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        return F.normalize((weights[..., None] * self.label_vectors[idx]).sum(-2), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        w = float(self.spec.conse_weight) if self.spec.conse_classes else 0.0
        if w == 0.0:
            return self.devise(features)
        if w == 1.0:
            return self.conse(features)
        return F.normalize((1 - w) * self.devise(features) + w * self.conse(features), dim=-1)


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
