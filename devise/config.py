"""Every stage's settings in one place: the config dataclasses and the defaults and choices the
command-line parsers read (stdlib only, so `devise --help` loads neither numpy nor torch)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from devise.errors import DeviseError

# Text and image sides
DEFAULT_TEXT_SPACE = "minilm"  # all-MiniLM-L6-v2 sentence encoder (devise.text.TEXT_SPACES)
DEFAULT_BACKBONE = "efficientnet_lite0"
# Chosen by measurement: on Fashion-MNIST (Lite0 at 64 px, GloVe-100d, two classes held out,
# 3 seeds) a linear head matched the MLP on zero-shot and was within a point on seen classes
# (hit@1 87.5 against 88.2), with fewer weights (docs/cli.md).
DEFAULT_HEAD = "linear"
HEADS = ("mlp", "linear")
MODES = ("cached", "online")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENGINES = ("auto", "torch", "onnx")  # what runs the image backbone (devise.engines)
# How a stage's workers are placed on the cluster's nodes (Ray placement group strategies):
# PACK fills a node first (fast collectives), SPREAD puts them on different nodes where it can
# (one lost node takes fewer workers with it), STRICT_* refuse to start otherwise.
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
DEFAULT_PLACEMENT = "PACK"

# The embeddings store (devise.store)
DEFAULT_CHUNK_ROWS = 4096
DEFAULT_KEEP_VERSIONS = 3
DEFAULT_MAX_ERROR_FRACTION = 0.5

# The approximate index (devise.ann)
INDEX_KINDS = ("flat", "ivf-pq", "hnsw")
DEFAULT_QUERIES = 500  # held-out rows that measure an index's recall
RECALL_K = 10  # an index's recall is recall@10 (its meta's "recall_at_10")

# Search: results per query (the CLI, the Python API, the service and the demo)
DEFAULT_K = 10

# The service (devise.serve)
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_REPLICAS = 1
DEFAULT_CPUS_PER_REPLICA = 0.5

# The demo (devise.demo): Fashion-MNIST classes held out of training
DEFAULT_HOLDOUT = ("sandal", "pullover")


@dataclass(frozen=True)
class Resources:
    """How wide a stage's Ray work runs; None fields are resolved by `resolve_resources`.

    num_workers: Ray workers of the stage's main work (Train workers, model actors).
    cpus_per_worker / gpus_per_worker: what each worker asks Ray for (GPUs only with use_gpu).
    decode_cpus: CPUs per image-decode task. batch_size: images per model batch.
    engine: what runs the image backbone (auto, torch, onnx; devise.engines.choose_engine).
    """

    num_workers: int = 2
    cpus_per_worker: float | None = None
    decode_cpus: float | None = None
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    batch_size: int = 64
    engine: str = "auto"

    def __post_init__(self) -> None:
        # The one check of a stage's width, wherever the Resources come from (flags, Python).
        for name in ("num_workers", "batch_size"):
            if getattr(self, name) < 1:
                flag = name.replace("_", "-")
                raise DeviseError(f"--{flag} must be at least 1 (got {getattr(self, name)}).")
        for name in ("cpus_per_worker", "decode_cpus", "gpus_per_worker"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                flag = name.replace("_", "-")
                raise DeviseError(f"--{flag} must be above 0 (got {value}).")


# Each stage's default resources: Train workers + feature actors, evaluation's feature pass, an
# embedding run, the image pipeline itself (a whole CPU per model actor and decode task).
TRAIN_RESOURCES = Resources()
EVAL_RESOURCES = Resources(num_workers=1)
EMBED_RESOURCES = Resources(num_workers=2)
PIPELINE_RESOURCES = Resources(num_workers=1, cpus_per_worker=1.0, decode_cpus=1.0)


@dataclass
class TrainConfig:
    """Everything `devise train` needs; written to RUN_DIR/config.json once resolved."""

    catalog: str
    out: str
    vectors: str = DEFAULT_TEXT_SPACE
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    image_size: int | None = None  # None: the backbone's own size
    head: str = DEFAULT_HEAD
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
    # How class names become text (labels.WORDINGS, or "auto": chosen on pseudo-unseen
    # training classes) and a class -> description file that replaces WordNet's glosses.
    class_text: str = "auto"
    class_text_file: str | None = None
    # Weight of the backbone classifier's ConSE embedding in every image vector, in [0, 1], or
    # "auto" (chosen with the wording); needs a backbone with an ImageNet classifier.
    conse_weight: str = "auto"
    seed: int = 0
    precision: str = "auto"
    # Where and how wide: num_workers Ray Train workers (cpus_per_worker, use_gpu, gpus_per_worker
    # each); the feature stage runs embed_workers backbone actors on batch_size images with the
    # engine, and decode tasks of decode_cpus.
    resources: Resources = TRAIN_RESOURCES
    embed_workers: int = 1
    address: str | None = None
    placement_strategy: str = DEFAULT_PLACEMENT  # how the Train workers spread over nodes (runtime)
    loader_workers: int = 0  # online mode: DataLoader processes per train worker
    # Storage and fault tolerance
    storage: str | None = None
    feature_cache: str | None = None
    max_failures: int = 3
    keep_checkpoints: int = 2
    local: bool = False  # in this process without Ray: one worker, the local feature executor
    pause_after_epoch: int | None = None  # test hook, see PAUSE_ENV

    # Settings that do not change what a run computes: a rerun may change them and still resume.
    _RUN_FREE = (
        "epochs",
        "resources",
        "address",
        "placement_strategy",
        "embed_workers",
        "loader_workers",
        "feature_cache",
        "max_failures",
        "keep_checkpoints",
        "local",
        "pause_after_epoch",
        "precision",
    )

    def run_key(self) -> str:
        """Hash of the settings that define the run; the Ray Train run name derives from it."""
        data = {k: v for k, v in asdict(self).items() if k not in self._RUN_FREE and k != "out"}
        data["catalog"] = str(Path(self.catalog).expanduser().resolve())
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class EvalConfig:
    """`devise evaluate`: a trained model scored on a catalog's test and held-out rows."""

    model: str
    catalog: str
    out: str
    feature_cache: str | None = None
    conse_top: int = 10
    pseudo_unseen: int | None = None  # classes held out of the training split to pick gamma
    calibration_draws: int = 5  # pseudo-unseen draws whose H curves are averaged to pick gamma
    seed: int = 0
    aux_epochs: int | None = None  # None: the real run's epochs (read from RUN_DIR/config.json)
    concepts: list[str] | None = None  # group words to score (None: CONCEPT_WORDS)
    resources: Resources = EVAL_RESOURCES  # the feature pass (a cache hit needs none)
    address: str | None = None
    local: bool = False  # image pass in this process (devise.executors.run_local), no Ray


@dataclass
class EmbedConfig:
    """One embedding run: model, inputs, output folder, resources (all flags)."""

    model_dir: str
    out: str
    catalog: str | None = None
    splits: list[str] | None = None
    images: str | None = None
    incremental: bool = False
    verify: str = "stat"  # "content": also compare a hash of each file's bytes
    repair: bool = False
    max_error_fraction: float = DEFAULT_MAX_ERROR_FRACTION
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    resources: Resources = EMBED_RESOURCES  # model actors, decode tasks, batch, engine
    torch_threads: int | None = None
    executor: str = "auto"  # auto, ray or local (devise.executors.choose_executor)
    local: bool = False  # the same as executor="local"
    address: str | None = None  # Ray cluster for the ray executor (default: RAY_ADDRESS)
    wait_lock_s: float = 0.0
    stale_lock_s: float = 600.0
    keep_versions: int = DEFAULT_KEEP_VERSIONS

    def __post_init__(self) -> None:
        # The run's bounds, wherever the config comes from (flags, a job's JSON, Python).
        if self.chunk_rows < 1:
            raise DeviseError("--chunk-rows must be at least 1.")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise DeviseError("--max-error-fraction must be between 0 and 1.")

    @classmethod
    def from_dict(cls, data: dict) -> EmbedConfig:
        """The config as asdict() wrote it (a job passing it on as JSON)."""
        if isinstance(data.get("resources"), dict):
            data = {**data, "resources": Resources(**data["resources"])}
        return cls(**data)


@dataclass
class PipelineConfig:
    """How to run the image pipeline: model, sizes and Ray resources (all flags, no defaults
    hidden in the code that runs them)."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    image_size: int | None = None
    head_dir: str | None = None  # None: output backbone features; else head embeddings
    # num_workers actors run the model on batch_size images; cpus_per_worker None: a fair share
    # of a small cluster (executors.run_ray); decode_cpus None: min(1, cpus_per_worker).
    resources: Resources = PIPELINE_RESOURCES
    torch_threads: int | None = None  # CPU threads per actor; None: torch's default
    blocks: int | None = None  # number of input blocks; None: enough to keep every actor busy
    decode_workers: int | None = None  # local executor's decode processes; None: cores / 4
    extra: dict = field(default_factory=dict)


@dataclass
class ServiceConfig:
    """What one replica serves and how it follows the embeddings folder."""

    embeddings: str
    poll_s: float = 2.0  # how often a replica checks CURRENT for a new version
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    vectors: str | None = None
    model: str | None = None
    allowed_hosts: list[str] | None = None  # Host names accepted (None: any)
    show_paths: bool = False  # name server folders in /api/info and errors

    def __post_init__(self) -> None:
        # The service's bounds, wherever the config comes from (flags, a serve config's args).
        for flag, value, low in (
            ("--poll-seconds", self.poll_s, 0.05),
            ("--max-upload-mb", self.max_upload_mb, 0.001),
        ):
            if not math.isfinite(value) or value < low:
                raise DeviseError(f"{flag} must be a number of at least {low:g}, not {value:g}.")
        if self.max_upload_mb > 1024:
            raise DeviseError(f"--max-upload-mb must be at most 1024, not {self.max_upload_mb:g}.")


@dataclass
class IndexConfig:
    """`devise index`: a faiss index committed inside an embeddings version."""

    embeddings: str
    kind: str = "auto"  # auto, or one of INDEX_KINDS
    target_recall: float = 0.95
    version: str | None = None  # default: the current version
    queries: int = DEFAULT_QUERIES
    num_tasks: int = 4  # parallel Ray tasks adding vectors
    cpus_per_task: float = 1.0
    address: str | None = None
    local: bool = False
    wait_lock_s: float = 0.0


@dataclass
class DemoConfig:
    """`devise demo`: the whole pipeline on Fashion-MNIST, or on the user's `data` folder, with
    every output under `out`."""

    out: str = "runs/demo"
    data: str | None = None  # a Tiny ImageNet folder or one sub-folder per class
    per_class: int | None = 500  # Fashion-MNIST images per class (None: all 70,000)
    holdout: tuple[str, ...] = DEFAULT_HOLDOUT  # classes held out of training
    holdout_count: int | None = None  # hold out this many random classes instead of `holdout`
    test_fraction: float = 0.2
    image_size: int | None = None  # None: 64 px for Fashion-MNIST, the backbone's own for data
    head: str = DEFAULT_HEAD
    epochs: int = 15
    batch_size: int = 128  # training batch per worker
    lr: float = 1e-3
    k: int = DEFAULT_K  # results per search
    vectors: str = DEFAULT_TEXT_SPACE  # the text space trained, embedded and searched with
    # Text spaces also trained on the same cached features, for the comparison table.
    compare: tuple[str, ...] = ("glove-100d",)
    address: str | None = None
    resources: Resources = TRAIN_RESOURCES  # every Ray stage of the demo
