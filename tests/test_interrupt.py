"""A Ctrl-C in a terminal reaches the whole foreground process group: the command and every Ray
process it started. The command ends within seconds with one line and exit code 130, even when
its cleanup would wait on a Ray process that is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of a test's command: its own process group only."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _run_and_interrupt(code: str, ready, tmp_path: Path, limit_s: float = 20.0):
    """Start `python -c code` in its own process group, wait until ready(proc) is true, send
    SIGINT to the whole group (as a terminal does), and return (seconds to exit, rc, stderr)."""
    err = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    with open(err, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stderr=f, stdout=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready(proc):
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the command never got ready"
            time.sleep(0.2)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=limit_s)
        return time.monotonic() - t0, rc, err.read_text()
    finally:
        _kill_group(proc)


def test_ctrl_c_ends_a_command_whose_cleanup_hangs_with_one_line(tmp_path):
    marker = tmp_path / "started"
    code = textwrap.dedent(
        f"""
        import sys, time
        import devise.commands.export as export
        from devise.cli import main

        def hang(args):
            open({str(marker)!r}, "w").close()
            try:
                time.sleep(60)
            finally:
                time.sleep(60)  # cleanup waiting on a process that is gone

        export.run = hang
        sys.exit(main(["export", "EMB", "--to", "out.parquet"]))
        """
    )
    seconds, rc, err = _run_and_interrupt(code, lambda p: marker.exists(), tmp_path)
    assert rc == 130 and err.strip() == "devise export: interrupted", err
    assert seconds < 15


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_to_the_group_during_a_ray_stage_exits_with_one_line(tmp_path):
    """`devise index` with Ray tasks on a fresh local Ray: SIGINT to the group once Ray's
    processes run. One line, exit code 130, and the version is left without a half index."""
    import numpy as np
    import pandas as pd

    from devise.store import Store

    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = pd.DataFrame({"path": [f"/img/{i}.jpg" for i in range(len(x))]})
    emb = tmp_path / "emb"
    Store.open(emb, create=True).write_version(rows, x, model_id="m1", chunk_rows=20_000)
    code = (
        "import sys; from devise.cli import main; sys.exit(main(['index', "
        f"{str(emb)!r}, '--kind', 'ivf-pq', '--num-tasks', '2', '--cpus-per-task', '0.5', "
        "'--address', 'local']))"
    )

    def ray_running(proc) -> bool:  # the GCS and raylet are children of the driver
        names = []
        for pid in _children(proc.pid):
            try:
                names.append(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                pass
        return any("raylet" in n for n in names)

    seconds, rc, err = _run_and_interrupt(code, ray_running, tmp_path, limit_s=30)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("devise index")]
    assert rc == 130 and lines == ["devise index: interrupted"], err
    assert "Traceback" not in err, err
    assert seconds < 15
    version = Store.open(emb).current()
    assert not (emb / "versions" / version / "index").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_prints_two_lines_and_stops_on_a_group_ctrl_c(tmp_path, vec_file):
    """`devise serve`: no per-request or INFO lines (only with -v), and a Ctrl-C to the whole
    process group (Ray's processes included) stops it within seconds."""
    import socket

    import numpy as np
    import pandas as pd
    import requests

    from devise.store import Store
    from devise.vectors import load_vectors

    wv = load_vectors(vec_file)
    x = np.stack([wv.lookup(w) for w in ("cat", "dog", "car", "ship")]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = pd.DataFrame({"path": [f"/img/{w}.jpg" for w in ("cat", "dog", "car", "ship")]})
    emb = tmp_path / "emb"
    Store.open(emb, create=True).write_version(
        rows, x, model_id="m1", vectors=str(vec_file), vectors_id=wv.vectors_id
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "stdout.txt"
    code = (
        "import sys; from devise.cli import main; sys.exit(main(['serve', '--embeddings', "
        f"{str(emb)!r}, '--port', '{port}', '--address', 'local']))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "DEVISE_HOME": str(tmp_path / "home")}  # fmt: skip
    err = tmp_path / "stderr.txt"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=fo, stderr=fe, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while "Open http" not in out.read_text():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.5)
        for word in ("cat", "dog", "ship"):
            r = requests.get(f"http://127.0.0.1:{port}/api/search", params={"q": word}, timeout=60)
            assert r.status_code == 200 and r.json()["results"][0]["path"] == f"/img/{word}.jpg"
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        seconds = time.monotonic() - t0
    finally:
        _kill_group(proc)
    printed = out.read_text().strip().splitlines()
    assert len(printed) == 2 and printed[0].startswith("Serving "), printed
    said = err.read_text()
    assert "INFO" not in said and "GET /api/search" not in said, said
    assert seconds < 15
