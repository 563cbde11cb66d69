"""Start and stop a real local Ray head on free ports, for `ray job submit` tests.

Only the processes this head started are stopped (its own process group), never other Ray
instances on the machine (`ray stop` would kill them all).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)
    return env


@contextmanager
def local_head(num_cpus: int = 2, timeout: float = 120.0):
    """Yield the dashboard address (http://127.0.0.1:PORT) of a fresh `ray start --head`."""
    gcs, dash, client, agent, agent_grpc, metrics, node, obj, rt = free_ports(9)
    # Unix socket paths are limited to ~100 bytes: keep the temp dir short.
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        f"--port={gcs}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node}", f"--object-manager-port={obj}",
        f"--runtime-env-agent-port={rt}", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    log = open(Path(temp_dir) / "ray-start.log", "w")  # noqa: SIM115 -- closed in finally
    proc = subprocess.Popen(
        cmd, env=job_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {Path(log.name).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Ray head did not come up: {Path(log.name).read_text()[-2000:]}"
                )
            time.sleep(1)
        yield address
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
