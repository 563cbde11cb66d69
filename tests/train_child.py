"""A training run in a child process, stopped by a signal once its first epoch is stored."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from devise import runs
from devise import training as T

REPO = Path(__file__).resolve().parents[1]


def stop_after_first_epoch(
    cmd: list[str], out: Path, wait_s: float, settle_s: float = 0.0, signum=signal.SIGTERM
) -> tuple[subprocess.Popen, str, str]:
    """Run `cmd` (a training command writing RUN_DIR `out`) with the test pause hook, which
    keeps it alive after epoch 1; once epoch 1 is in metrics.jsonl (within wait_s), wait
    settle_s, send `signum` and return (process, stdout, stderr) after it exits (60 s at most)."""
    env = {**os.environ, T.PAUSE_ENV: "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        deadline = time.time() + wait_s
        while time.time() < deadline and not runs.read_metrics(out) and proc.poll() is None:
            time.sleep(0.2)
        assert [m["epoch"] for m in runs.read_metrics(out)] == [1], proc.poll()
        time.sleep(settle_s)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)  # a stop, not a hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc, stdout, stderr
