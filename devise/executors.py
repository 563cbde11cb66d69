"""Where the image pipeline runs: Ray Data on a cluster, or this process with decode workers.

Both executors take the same paths table and PipelineConfig and stream the same batches (the
table's columns + `error` + `feature`/`embedding`); `choose_executor` picks one and says why.

On one machine Ray adds a fixed start-up (the local cluster, then the actor pool importing torch)
and ships every decoded batch through its object store, while the plain loop it replaces pays
neither. The local executor keeps Ray's decode/model split without that cost: decode runs in a
few worker processes (forked, so they start in milliseconds) a couple of batches ahead, the model
runs in this process on all cores, so decoding overlaps the forward pass instead of alternating
with it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd

from devise.config import PipelineConfig
from devise.pipeline import ModelActor, decode_batch, run_images

log = logging.getLogger(__name__)

EXECUTORS = ("auto", "ray", "local")

# Above this many images on a machine with more than LOCAL_MAX_CPUS cores, Ray's start-up is
# amortised and its actor pool spreads the model over cores better than one process's threads.
AUTO_LOCAL_MAX_ROWS = 100_000
LOCAL_MAX_CPUS = 8


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ExecutorChoice:
    """Which executor runs the pipeline, and the one-line reason printed for the user."""

    name: str  # "ray" or "local"
    reason: str

    def line(self) -> str:
        return f"executor: {self.name} ({self.reason})"


def choose_executor(
    requested: str = "auto",
    rows: int = 0,
    address: str | None = None,
    ray_running: bool | None = None,
    cpus: int | None = None,
    use_gpu: bool = False,
    workers: int = 1,
) -> ExecutorChoice:
    """Pick the executor for a run of `rows` images.

    requested "ray" or "local" is obeyed. "auto" uses Ray when there is a cluster to use (an
    address, RAY_ADDRESS, or Ray already initialised in this process, as under `ray job submit`
    and in a Train job), when several GPU workers are asked for (the local executor drives one
    device), or when the job is large on a many-core machine; otherwise, the job would start a
    one-machine Ray cluster only to run on this machine, and the local executor is faster.
    """
    if requested not in EXECUTORS:
        raise ValueError(f"--executor must be one of {', '.join(EXECUTORS)}, not {requested!r}.")
    if requested != "auto":
        return ExecutorChoice(requested, f"--executor {requested}")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return ExecutorChoice("ray", f"joining the Ray cluster at {address}")
    if ray_running is None:
        ray_running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if ray_running:
        return ExecutorChoice("ray", "Ray is already running in this process")
    if use_gpu and workers > 1:
        return ExecutorChoice(
            "ray", f"{workers} GPU workers asked for: Ray spreads them over the GPUs"
        )
    cpus = cpus or available_cpus()
    if rows > AUTO_LOCAL_MAX_ROWS and cpus > LOCAL_MAX_CPUS and not use_gpu:
        return ExecutorChoice(
            "ray", f"{rows:,} images on {cpus} cores: Ray Data's actor pool spreads them wider"
        )
    images = f" and {rows:,} images" if rows else ""
    return ExecutorChoice(
        "local",
        f"no Ray cluster given{images} on this machine's {cpus} cores: in this process with "
        "decode workers, without Ray's start-up; --executor ray to use Ray",
    )


def idle_cores(cpus: int, load: float | None = None) -> int:
    """Cores not already kept busy by other work: cpus minus the 1-minute load average, at
    least 1. On a machine shared with other jobs, intra-op threads beyond the idle cores wait on
    each other at every operator (measured here: 2 threads on 2 busy cores ran 5x slower than 1)."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows
            load = 0.0
    return max(1, min(cpus, cpus - int(load)))


def local_plan(
    config: PipelineConfig,
    cpus: int | None = None,
    load: float | None = None,
    engine: str = "torch",
) -> tuple[int, int]:
    """(decode worker processes, model threads) for the local executor on `cpus` cores.

    Decoding is a small share of the work next to the backbone (about a sixth at 64 px, far less
    at 224 px), so one decode worker per four cores keeps the model fed. Torch gets every idle
    core (`idle_cores`), since decode workers sleep between batches; onnxruntime gets every core
    (its idle threads sleep rather than spin, so a busy core slows it far less than it slows
    torch's thread pool, and a core left idle while the model is the bottleneck is lost).
    """
    cpus = cpus or available_cpus()
    workers = config.decode_workers or max(1, cpus // 4)
    if config.torch_threads:
        return workers, config.torch_threads
    return workers, cpus if engine == "onnx" else idle_cores(cpus, load)


def _decode_job(
    batch: dict[str, np.ndarray], backbone: str, size: int | None, seed: int
) -> dict[str, np.ndarray]:
    return decode_batch(batch, backbone, size, seed)


def _pool(workers: int) -> ProcessPoolExecutor:
    # fork: a worker starts in milliseconds with the modules already imported (spawn would import
    # torch again in each). Decoding runs Pillow only, never a parallel torch op, so forking after
    # torch has started its thread pool is safe. macOS and Windows lack a safe fork: spawn there.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return ProcessPoolExecutor(workers, mp_context=mp.get_context(method))


def run_local(
    table: pd.DataFrame, config: PipelineConfig, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """The pipeline in this process, without Ray: decode in worker processes a few batches
    ahead, the model here on all cores. Batches come back in table order; same columns as
    `run_images`."""
    from devise.engines import choose_engine

    if len(table) == 0:
        return
    engine = choose_engine(config.resources.engine, config.resources.use_gpu)
    workers, threads = local_plan(config, engine=engine.name)
    # stderr: stdout carries results (`devise search --json` after an in-process embed).
    print(engine.line(), file=sys.stderr, flush=True)
    log.info("local executor: %d decode worker(s), model on %d thread(s).", workers, threads)
    cols = {c: table[c].to_numpy() for c in table.columns}
    starts = range(0, len(table), config.resources.batch_size)
    args = (config.backbone, config.image_size, seed)
    # The pool starts before the model loads, so the workers fork from a small process.
    with _pool(workers) as pool:
        pending: deque = deque()
        todo = iter(starts)

        def submit() -> None:
            a = next(todo, None)
            if a is not None:
                batch = {c: v[a : a + config.resources.batch_size] for c, v in cols.items()}
                pending.append(pool.submit(_decode_job, batch, *args))

        for _ in range(2 * workers + 1):
            submit()
        actor = ModelActor(
            config.backbone,
            config.weights,
            config.head_dir,
            device="cuda" if config.resources.use_gpu else "cpu",
            torch_threads=threads,
            engine=engine.name,
            image_size=config.image_size,
        )
        try:
            while pending:
                decoded = pending.popleft().result()
                submit()
                yield actor(decoded)
        finally:
            for f in pending:
                f.cancel()


def run_ray(
    table: pd.DataFrame, config: PipelineConfig, seed: int = 0, address: str | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data pipeline; joins the cluster at address (or RAY_ADDRESS), else starts a local
    one, unless Ray is already initialised. CPU requests left unset (None) get a fair share of a
    small cluster."""
    from dataclasses import replace

    from devise.engines import choose_engine
    from devise.runtime import init_ray, resolve_resources

    if len(table) == 0:
        return
    print(
        choose_engine(config.resources.engine, config.resources.use_gpu).line(),
        file=sys.stderr,
        flush=True,
    )
    init_ray(address)
    config = replace(config, resources=resolve_resources(config.resources))
    yield from run_images(table, config, seed)


def pick_runner(
    requested: str = "auto",
    rows: int = 0,
    address: str | None = None,
    use_gpu: bool = False,
    workers: int = 1,
) -> Callable[..., Iterator[dict[str, np.ndarray]]]:
    """The executor's run function for a job of `rows` images; prints which one and why."""
    choice = choose_executor(requested, rows, address, use_gpu=use_gpu, workers=workers)
    if requested == "auto":  # a caller that named the executor has said it already
        print(choice.line(), flush=True)
    if choice.name == "local":
        return run_local
    return partial(run_ray, address=address)
