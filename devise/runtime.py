"""Connecting to Ray and the resource flags every Ray job shares."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_ray_args(parser: argparse.ArgumentParser, workers_help: str = "Ray workers") -> None:
    """Flags for where and how wide a job runs. Resources are flags, never hard-coded."""
    g = parser.add_argument_group("Ray resources")
    g.add_argument("--num-workers", type=int, default=2, help=f"number of {workers_help}")
    g.add_argument(
        "--use-gpu", action="store_true", help="one GPU per worker (see --gpus-per-worker)"
    )
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs each worker asks Ray for (default: 1, or a fair share on a small local machine)",
    )
    g.add_argument("--gpus-per-worker", type=float, default=1.0)
    g.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)",
    )


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at address (or RAY_ADDRESS, as ray.init reads it), else start a local
    Ray. A no-op when Ray is already initialised (tests, `ray job submit` drivers)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"log_to_driver": True}
    if address:
        kwargs["address"] = address
    elif num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def default_cpus_per_worker(requested: float | None, num_workers: int) -> float:
    """The CPUs a worker asks for: the flag when given, else 1 unless the cluster is so small
    that whole CPUs per worker would leave none for Ray Data's read and decode tasks (which
    hangs the job rather than failing it)."""
    if requested is not None:
        return requested
    import ray

    total = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else 1.0
    share = total / (2 * max(1, num_workers))
    return 1.0 if share >= 1.0 else max(0.25, round(share * 4) / 4)
