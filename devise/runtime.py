"""Connecting to Ray, and resolving how wide a stage runs (devise.config.Resources) for the
cluster it joined."""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path

from devise.config import Resources
from devise.errors import DeviseError

log = logging.getLogger(__name__)

# Seconds to wait for a recorded Ray address to answer before saying it does not.
PROBE_TIMEOUT_S = 3.0
LOCAL = "local"


class RayUnavailableError(DeviseError):
    """The Ray cluster to join does not answer (or several could be meant)."""

    EXIT_CODE = 69  # EX_UNAVAILABLE


def cluster_cpus() -> float:
    """CPUs of the Ray cluster this process is connected to, else of this machine."""
    if _ray_initialized():
        return float(sys.modules["ray"].cluster_resources().get("CPU", 1.0))
    return float(os.cpu_count() or 1)


def resolve_resources(res: Resources, total_cpus: float | None = None) -> Resources:
    """Fill the defaults of res for a cluster of total_cpus (default: the one this process runs
    on, see cluster_cpus). Flags the user gave are kept as they are.

    A worker asks for 1 CPU unless the cluster is so small that whole CPUs per worker would leave
    none for Ray Data's read and decode tasks (which hangs a job rather than failing it): then
    a fair share, half the cluster split among the workers, in quarter CPUs (at least 0.25).
    A decode task asks for as much as a worker, at most 1 CPU.
    """
    cpus = res.cpus_per_worker
    if cpus is None:
        total = cluster_cpus() if total_cpus is None else total_cpus
        share = total / (2 * res.num_workers)
        cpus = 1.0 if share >= 1.0 else max(0.25, round(share * 4) / 4)
    decode = res.decode_cpus if res.decode_cpus is not None else min(1.0, cpus)
    return replace(res, cpus_per_worker=cpus, decode_cpus=decode)


def check_local(local: bool, address: str | None, num_workers: int | None = None) -> None:
    """One sentence (DeviseError) for a flag --local cannot honour: --address (there is no Ray
    to join) and, where the local run has one worker, --num-workers above 1 (pass the number
    only when the user gave it)."""
    if not local:
        return
    if address:
        raise DeviseError(
            f"--local runs in this process without Ray, so --address {address} has nothing to "
            "join; drop one of them."
        )
    if num_workers is not None and num_workers > 1:
        raise DeviseError(
            f"--local runs one worker in this process, so --num-workers {num_workers} cannot "
            "apply; drop one of them."
        )


# ---------------------------------------------------------------------------------------------
# Joining Ray


def current_cluster_file() -> Path:
    """Where `ray start` records the address that a plain `ray.init()` joins."""
    try:
        from ray._common.utils import get_ray_address_file

        return Path(get_ray_address_file(None))
    except (ImportError, AttributeError):  # the same rule, for a Ray that moved it
        tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
        return Path(tmp) / "ray" / "ray_current_cluster"


def ray_address(flag: str | None) -> tuple[str | None, str]:
    """(address, where it came from) that joining Ray would use; None: start a local Ray.

    The order is Ray's own: --address, then RAY_ADDRESS, then the current-cluster file.
    """
    if flag == LOCAL:
        return None, "--address local"
    if flag and flag != "auto":
        return flag, "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env, "RAY_ADDRESS"
    path = current_cluster_file()
    try:
        recorded = path.read_text().strip()
    except OSError:
        recorded = ""
    if recorded:
        return recorded, f"Ray's current-cluster file {path}"
    return None, "no cluster recorded"


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to address (host:port, or ray://host:port) opens within
    timeout, else the reason it did not."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return "it is not host:port"
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # not imported yet: certainly not initialised
    return ray is not None and ray.is_initialized()


def preflight(address: str | None) -> tuple[str | None, str]:
    """(address, source) of the Ray cluster a stage would join, after checking that it answers
    (RayUnavailableError names the address and where it came from). Cheap: it imports nothing,
    so a command calls it before loading its stage. Skipped when Ray is already initialised."""
    if _ray_initialized():
        return None, "this process's Ray"
    target, source = ray_address(address)
    if target is not None:
        why = probe(target)
        if why is not None:
            raise RayUnavailableError(
                f"No Ray cluster answers at {target} (from {source}: {why}); start it, or "
                f"run on a fresh local Ray with --address local."
            )
    return target, source


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    log_to_driver: bool = True,
) -> None:
    """Join the cluster at address (else RAY_ADDRESS, else the one `ray start` recorded), or
    start a local Ray; address 'local' always starts a fresh local one. A no-op when Ray is
    already initialised (tests, `ray job submit` drivers).

    A recorded address that does not answer raises RayUnavailableError within seconds, naming
    the address and its source, instead of letting ray.init() wait forever. Workers' output
    reaches this terminal when log_to_driver, without dependency noise unless -v/--verbose.
    """
    if _ray_initialized():
        return
    target, source = preflight(address)
    import ray

    from devise import console

    kwargs: dict = {
        "log_to_driver": log_to_driver,
        "logging_level": logging.INFO if console.verbose() else logging.WARNING,
        "configure_logging": True,
    }
    if target is None:
        kwargs["address"] = LOCAL
        # A stage's own local Ray lives for one run: without the dashboard's dozen processes it
        # starts faster (and at all on a busy small machine). For the dashboard, `ray start`.
        kwargs["include_dashboard"] = False
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    else:
        kwargs["address"] = target
    try:
        ray.init(**kwargs)
    except Exception as e:  # whatever Ray says, the user gets it in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = f"join Ray at {target} ({source})" if target else "start a local Ray"
        # --address local was what failed: suggest only what is left to try.
        other = "" if address == LOCAL else ", or --address local for a fresh local Ray"
        raise RayUnavailableError(
            f"Could not {where}: {first} Retry, pass --address HOST:PORT to choose a "
            f"cluster{other} (-v shows Ray's logs)."
        ) from e
    console.filter_worker_echo()
    console.quiet_ray_data()


def unseen_on_nodes(folder: str | os.PathLike, timeout: float = 60.0) -> list[str]:
    """The alive nodes of this process's Ray cluster that do not see `folder` (empty on a
    one-node cluster). A marker file written here is looked for by a zero-CPU task pinned to
    each other node; a node that does not answer within timeout is not counted."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not others:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / f".devise-shared-{uuid.uuid4().hex}"
    marker.write_text("written by the driver; a task on every node looks for it\n")
    try:
        sees = ray.remote(num_cpus=0, max_retries=0)(os.path.exists)
        refs = {
            n["NodeID"]: sees.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in others
        }
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        unseen = []
        for node, ref in refs.items():
            if ref in ready:
                try:
                    if not ray.get(ref):
                        unseen.append(node)
                except ray.exceptions.RayError:  # the node went away meanwhile
                    pass
        return unseen
    finally:
        marker.unlink(missing_ok=True)
