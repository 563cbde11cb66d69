"""What the stage commands share: the Ray resource flags and how they become a Resources."""

from __future__ import annotations

import argparse

from devise.config import DEFAULT_PLACEMENT, ENGINES, PLACEMENT_STRATEGIES, Resources

ADDRESS_HELP = (
    "Ray cluster to join; 'local' starts a fresh local Ray (default: RAY_ADDRESS, else the "
    "cluster `ray start` recorded on this machine, else a new local Ray)"
)


# What every stage's --local means; add_ray_args(local_help=LOCAL_HELP + what differs there).
LOCAL_HELP = (
    "run in this process without Ray, for small jobs on one machine, where starting Ray would "
    "take longer than the work"
)


class _StoreGiven(argparse.Action):
    """Store the value and note the flag in namespace.given, so a stage can tell a flag the user
    gave from its default (--local refuses --num-workers 4, not the default)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def resources_from_args(args: argparse.Namespace, batch_size: int | None = None) -> Resources:
    """The Resources named by a stage's flags (add_ray_args), not yet resolved. batch_size:
    images per model batch when the stage's --batch-size means something else (training)."""
    return Resources(
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        decode_cpus=getattr(args, "decode_cpus", None),
        use_gpu=args.use_gpu,
        gpus_per_worker=args.gpus_per_worker,
        batch_size=batch_size or getattr(args, "batch_size", Resources.batch_size),
        engine=args.engine,
    )


def given_workers(args: argparse.Namespace) -> int | None:
    """--num-workers when the user gave it on the command line, else None (its default)."""
    return args.num_workers if "num_workers" in getattr(args, "given", ()) else None


def add_ray_args(
    parser: argparse.ArgumentParser,
    workers_help: str = "Ray workers",
    defaults: Resources | None = None,
    local_help: str | None = None,
    placement: bool = False,
) -> None:
    """Flags for where and how wide a stage runs (defaults: the stage config's Resources).

    local_help: when given, the stage also takes --local (run in this process without Ray);
    start it with LOCAL_HELP so the flag reads the same everywhere. placement: the stage's
    workers form a placement group, and --placement-strategy says how it spreads over nodes.
    """
    defaults = defaults or Resources()
    g = parser.add_argument_group("Ray resources")
    g.add_argument(
        "--num-workers",
        type=int,
        action=_StoreGiven,
        default=defaults.num_workers,
        help=f"Ray workers of this stage's main work: {workers_help}",
    )
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        default=defaults.cpus_per_worker,
        help="CPUs each worker asks Ray for (default: 1, or a fair share on a small machine)",
    )
    g.add_argument("--use-gpu", action="store_true", help="GPUs for the workers")
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default=defaults.engine,
        help="what runs the image backbone: onnx (onnxruntime, CPU only), torch, or auto "
        "(default: torch with --use-gpu, else onnx); the choice is printed",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=float,
        default=defaults.gpus_per_worker,
        help="GPUs each worker asks for (--use-gpu)",
    )
    add_address_arg(g)
    if placement:
        g.add_argument(
            "--placement-strategy",
            default=DEFAULT_PLACEMENT,
            type=str.upper,
            choices=PLACEMENT_STRATEGIES,
            help="how the workers spread over the cluster's nodes: PACK (fill a node first), "
            "SPREAD (different nodes where possible, so losing one node loses fewer workers), "
            "STRICT_SPREAD (different nodes or wait for them), STRICT_PACK (one node)",
        )
    if local_help:
        g.add_argument("--local", action="store_true", help=local_help)


def add_address_arg(parser) -> None:
    """--address: the Ray cluster a stage joins (devise.runtime.init_ray reads it)."""
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
