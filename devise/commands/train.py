"""`devise train` (and jobs/train.py): the DeViSE head with Ray Train, or in this process."""

from __future__ import annotations

import argparse

from devise.commands.common import LOCAL_HELP, add_ray_args, given_workers
from devise.config import DEFAULT_HEAD, HEADS
from devise.runtime import check_local, preflight
from devise.wordnet import WORDINGS


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The `train` flags (shared by `devise train` and jobs/train.py)."""
    p.add_argument("--catalog", required=True, help="catalog parquet from `devise catalog`")
    p.add_argument("--out", required=True, help="RUN_DIR for checkpoints, metrics and the model")
    p.add_argument(
        "--vectors",
        default="minilm",
        help="text space of the class names: minilm (all-MiniLM-L6-v2 sentence encoder), "
        "glove-100d, a .vec/.txt PATH or a sentence-transformers model folder",
    )
    p.add_argument("--backbone", default="efficientnet_lite0", help="frozen image backbone")
    p.add_argument("--weights", default=None, help="backbone weights file (state_dict)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size (default: the backbone's; 64 is a good CPU choice)",
    )
    p.add_argument("--head", default=DEFAULT_HEAD, choices=HEADS, help="head kind")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64, help="training batch per worker")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--dropout", type=float, default=0.2, help="MLP head dropout")
    p.add_argument("--loss", default="rank", help="rank (the paper's) or cosine (the notebook's)")
    p.add_argument("--margin", type=float, default=0.1, help="rank loss margin")
    p.add_argument(
        "--mode",
        default="cached",
        choices=("cached", "online"),
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
    p.add_argument(
        "--max-train-per-class", type=int, default=None, help="cap training images a class"
    )
    p.add_argument(
        "--class-text",
        default="auto",
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
        default="auto",
        help="how much of the backbone classifier's ConSE embedding is blended into every image "
        "vector: 0 (DeViSE alone) to 1 (ConSE alone), or auto: chosen on pseudo-unseen training "
        "classes (default); needs a backbone with an ImageNet classifier",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
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
    p.add_argument("--max-failures", type=int, default=3, help="worker failures to retry")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints to keep")
    add_ray_args(
        p,
        workers_help="Ray Train workers (DDP)",
        local_help=LOCAL_HELP + "; one training worker, the feature stage by the local executor "
        "(decode processes + the backbone here, as `devise embed --local`); resumes runs of "
        "either kind",
        placement=True,
    )
    g = p.add_argument_group("feature stage (cached mode: the frozen backbone over every image)")
    g.add_argument(
        "--feature-workers",
        "--embed-workers",
        dest="embed_workers",
        metavar="N",
        type=int,
        default=1,
        help="backbone actors",
    )
    g.add_argument(
        "--feature-batch-size",
        "--embed-batch-size",
        dest="embed_batch_size",
        metavar="N",
        type=int,
        default=64,
        help="images per backbone batch",
    )
    g.add_argument("--decode-cpus", type=float, default=None, help="CPUs per decode task")
    g.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="online mode: DataLoader processes per train worker",
    )


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the DeViSE head with Ray Train or --local (resumes when rerun)"
    )
    add_train_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_local(args.local, args.address, given_workers(args))
    if not args.local:
        preflight(args.address)  # a dead cluster is named before the stage loads
    from devise.training import run_cli

    return run_cli(args)
