"""`devise train` (and jobs/train.py): the DeViSE head with Ray Train, or in this process."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from devise.commands.common import LOCAL_HELP, add_ray_args, given_workers, resources_from_args
from devise.config import HEADS, MODES, PRECISIONS, TrainConfig
from devise.runtime import check_local, preflight
from devise.wordnet import WORDINGS

_D = TrainConfig  # every default below is the config's


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The `train` flags (shared by `devise train` and jobs/train.py)."""
    p.add_argument("--catalog", required=True, help="catalog parquet from `devise catalog`")
    p.add_argument("--out", required=True, help="RUN_DIR for checkpoints, metrics and the model")
    for add in (_add_model_args, _add_recipe_args, _add_class_text_args, _add_run_args):
        add(p)
    _add_feature_args(p)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The text space and the frozen backbone."""
    p.add_argument(
        "--vectors",
        default=_D.vectors,
        help="text space of the class names: minilm (all-MiniLM-L6-v2 sentence encoder), "
        "glove-100d, a .vec/.txt PATH or a sentence-transformers model folder",
    )
    p.add_argument("--backbone", default=_D.backbone, help="frozen image backbone")
    p.add_argument("--weights", default=None, help="backbone weights file (state_dict)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size (default: the backbone's; 64 is a good CPU choice)",
    )


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The head and how it is fitted."""
    p.add_argument("--head", default=_D.head, choices=HEADS, help="head kind")
    p.add_argument("--epochs", type=int, default=_D.epochs, help="training epochs")
    p.add_argument(
        "--batch-size", type=int, default=_D.batch_size, help="training batch per worker"
    )
    p.add_argument("--lr", type=float, default=_D.lr, help="learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=_D.weight_decay, help="AdamW weight decay")
    p.add_argument("--dropout", type=float, default=_D.dropout, help="MLP head dropout")
    p.add_argument("--loss", default=_D.loss, help="rank (the paper's) or cosine (the notebook's)")
    p.add_argument("--margin", type=float, default=_D.margin, help="rank loss margin")
    p.add_argument(
        "--mode",
        default=_D.mode,
        choices=MODES,
        help="cached: backbone features computed once; online: the notebook's way",
    )
    p.add_argument(
        "--augment-views",
        type=int,
        default=_D.augment_views,
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
    p.add_argument(
        "--max-train-per-class", type=int, default=None, help="cap training images a class"
    )


def _add_class_text_args(p: argparse.ArgumentParser) -> None:
    """How classes are put into words, and the ConSE blend."""
    p.add_argument(
        "--class-text",
        default=_D.class_text,
        choices=("auto", *WORDINGS),
        help="how a class is put into words: its name, all its names, name + description "
        "(WordNet's gloss, or --class-text-file), or auto: chosen on pseudo-unseen training "
        "classes (default)",
    )
    p.add_argument(
        "--class-text-file",
        default=None,
        help='your own class descriptions: one "class<TAB>description" a line',
    )
    p.add_argument(
        "--conse-weight",
        default=_D.conse_weight,
        help="how much of the backbone classifier's ConSE embedding is blended into every image "
        "vector: 0 (DeViSE alone) to 1 (ConSE alone), or auto: chosen on pseudo-unseen training "
        "classes (default); needs a backbone with an ImageNet classifier",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Seed, precision, checkpoints and the Ray resources."""
    p.add_argument("--seed", type=int, default=_D.seed, help="random seed")
    p.add_argument(
        "--precision",
        default=_D.precision,
        choices=PRECISIONS,
        help="GPU autocast: auto = bf16 where supported, else fp16; CPU is fp32",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="Ray Train storage for checkpoints: on a multi-node cluster a folder every node "
        "mounts (NFS) or an object-store URI such as s3://bucket/prefix (default "
        "RUN_DIR/checkpoints, which only a one-node cluster can share; docs/cluster.md)",
    )
    p.add_argument("--feature-cache", default=None, help="default: $DEVISE_HOME/features")
    p.add_argument(
        "--max-failures", type=int, default=_D.max_failures, help="worker failures to retry"
    )
    p.add_argument(
        "--keep-checkpoints", type=int, default=_D.keep_checkpoints, help="checkpoints to keep"
    )
    add_ray_args(
        p,
        workers_help="Ray Train workers (DDP)",
        local_help=LOCAL_HELP + "; one training worker, the feature stage by the local executor "
        "(decode processes + the backbone here, as `devise embed --local`); resumes runs of "
        "either kind",
        defaults=_D.resources,
        placement=True,
    )


def _add_feature_args(p: argparse.ArgumentParser) -> None:
    """The feature stage (cached mode)."""
    g = p.add_argument_group("feature stage (cached mode: the frozen backbone over every image)")
    g.add_argument(
        "--feature-workers",
        "--embed-workers",
        dest="embed_workers",
        metavar="N",
        type=int,
        default=_D.embed_workers,
        help="backbone actors",
    )
    g.add_argument(
        "--feature-batch-size",
        "--embed-batch-size",
        dest="embed_batch_size",
        metavar="N",
        type=int,
        default=_D.resources.batch_size,
        help="images per backbone batch",
    )
    g.add_argument(
        "--decode-cpus", type=float, default=_D.resources.decode_cpus, help="CPUs per decode task"
    )
    g.add_argument(
        "--loader-workers",
        type=int,
        default=_D.loader_workers,
        help="online mode: DataLoader processes per train worker",
    )


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the DeViSE head with Ray Train or --local (resumes when rerun)"
    )
    add_train_args(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from parsed `train` flags (the test hook PAUSE_ENV is read here)."""
    from devise.training import PAUSE_ENV

    names = {f.name for f in fields(TrainConfig)} - {"resources"}
    values = {k: v for k, v in vars(args).items() if k in names}
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        values["pause_after_epoch"] = int(pause)
    resources = resources_from_args(args, batch_size=args.embed_batch_size)
    return TrainConfig(**values, resources=resources)


def run(args: argparse.Namespace) -> int:
    """`devise train`. Stopped by a signal after joining or starting Ray itself, the process
    ends as soon as the stop line is out."""
    check_local(args.local, args.address, given_workers(args))
    config = config_from_args(args)
    if not args.local:
        preflight(args.address)  # a dead cluster is named before the stage loads
    from devise.training import TrainStopped, exit_at_once_at_exit, train

    try:
        result = train(config)  # what it prints: devise.console
    except TrainStopped as e:
        if e.ray_joined_here:
            exit_at_once_at_exit(e.EXIT_CODE)
        raise
    print(f"Run directory: {result.run_dir}")
    return 0
