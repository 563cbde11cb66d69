"""What the command line prints: verbosity, progress bars, and the dependency noise it hides.

The CLI calls configure() once; library code prints results with print() and reports progress
through progress(). Default: one line per step and a progress bar on a terminal (a line every
30 s when output is a file); -q: results and errors only; -v: also Ray's and the dependencies'
logs, warnings and every line Ray's workers print.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Iterator

QUIET, NORMAL, VERBOSE = -1, 0, 1
LOG_EVERY_S = 30.0  # progress lines when output is not a terminal
TTY_LINE_EVERY_S = 10.0  # lines of loops without a bar (epochs) on a terminal

_level = NORMAL

# Lines Ray's workers print that are not ours: log records of Ray and its dependencies,
# warnings and their source lines, C++ core logs, Ray Data's progress log.
_NOISE = re.compile(
    r"Warning\b|warnings\.warn|^\s*(DEBUG|INFO)\b|^\s*\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d"
    r"|\.cc:\d+\]|\b(INFO|DEBUG|WARNING)\s+\S+\.py:\d+|Total Progress|Progress will be logged"
    r"|tqdm is not installed|progress bars? (will be )?disabled"
    # Ray Train's INFO lines in its workers
    r"|Checkpoint successfully created|Wrapping provided model in|Setting up process group"
    r"|Moving model to device"
    # Ray Serve stopping (Ctrl-C on `devise serve`)
    r"|ServeController\.graceful_shutdown failed",
    re.IGNORECASE,
)


# Ray's own actors: what they print is Ray's bookkeeping (failures reach us as exceptions).
_RAY_ACTORS = re.compile(
    r"TrainController|PlacementGroupCleaner|SplitCoordinator|_StatsActor|AutoscalingRequester"
    r"|get_table_block_metadata_schema"
)


def configure(verbosity: int = NORMAL) -> None:
    """Set what this process prints: QUIET, NORMAL or VERBOSE (see the module docstring)."""
    global _level
    _level = verbosity
    logging.basicConfig(
        format="%(message)s", level=logging.INFO if verbosity >= VERBOSE else logging.WARNING
    )
    if verbosity >= VERBOSE:
        warnings.simplefilter("default")  # every warning once per place, dependencies' too
    logging.getLogger("devise").setLevel(logging.INFO if verbosity >= NORMAL else logging.WARNING)
    if verbosity < VERBOSE:
        for name in ("ray", "ray.data", "ray.train", "ray.tune", "filelock", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Deprecation notices of dependencies are not the user's to act on; the environment
        # variable carries the same filter to the Ray workers this process starts.
        for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
        # The text encoder's weight-loading bar (read when transformers is first imported).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's worker-line prefixes, uncoloured


def verbose() -> bool:
    return _level >= VERBOSE


def quiet() -> bool:
    return _level <= QUIET


def line_every_s() -> float:
    """How often a loop without a progress bar (training's epochs, printed by a Ray worker)
    prints a line: every step with -v, at most every TTY_LINE_EVERY_S seconds on a terminal and
    every LOG_EVERY_S seconds when output goes to a file or pipe."""
    if verbose():
        return 0.0
    return TTY_LINE_EVERY_S if sys.stdout.isatty() else LOG_EVERY_S


def is_noise(line: str) -> bool:
    """True for a line a Ray worker printed that is a dependency's log or warning, not ours."""
    return bool(_NOISE.search(line))


def filter_worker_echo() -> None:
    """Drop dependency noise from the worker lines Ray echoes here (kept with -v); our own
    worker prints, such as training's epoch lines, still come through."""
    if verbose():
        return
    try:
        from ray._private import worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatch
    except ImportError:
        return
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None:
        return
    ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)

    def _print(data: dict) -> None:
        if _RAY_ACTORS.search(str(data.get("actor_name") or data.get("task_name") or "")):
            return
        lines = [line for line in data.get("lines", []) if not is_noise(line)]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    def _print_error(data: dict, ignore_prefix: bool = False) -> None:  # Ray's error echo
        lines = [line for line in data.get("lines", []) if not is_noise(line)]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    if getattr(printer, "__name__", "") != "_print_error":
        ray_worker.print_to_stdstream = _print_error
    if not any(name == "ray_print_logs" for name, _ in getattr(dispatch, "handlers", [])):
        return  # Ray does not echo worker output here (log_to_driver off)
    dispatch.remove_handler("ray_print_logs")
    dispatch.add_handler("ray_print_logs", _print)


def quiet_ray_data() -> None:
    """Ray Data's own progress output off unless -v: stages report through progress()."""
    if verbose():
        return
    try:
        from ray.data import DataContext
    except ImportError:
        return
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _rows(batch) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            return len(value)
        return 0
    return len(batch)


def progress(batches: Iterable, total: int, desc: str, unit: str = "img", stream=None) -> Iterator:
    """Yield batches unchanged while reporting rows done out of total: a tqdm bar with the rate
    and ETA on a terminal, else a plain line at most every LOG_EVERY_S seconds; nothing with -q.
    """
    stream = stream or sys.stderr
    if quiet() or total <= 0:
        yield from batches
        return
    if stream.isatty():
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit=unit, file=stream) as bar:
            for batch in batches:
                bar.update(_rows(batch))
                yield batch
        return
    done, t0 = 0, time.perf_counter()
    last = t0
    for batch in batches:
        done += _rows(batch)
        now = time.perf_counter()
        if now - last >= LOG_EVERY_S and done < total:
            rate = done / max(now - t0, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("nan")
            print(
                f"{desc}: {done}/{total} {unit} ({rate:.0f} {unit}/s, ETA {eta:.0f} s)",
                file=stream,
                flush=True,
            )
            last = now
        yield batch
