"""A real multi-node Ray cluster on this machine: a `ray start --head` and worker nodes joined
with `ray start --address`, each a raylet of its own (own ports, own CPUs, a custom resource
naming it), so a test can place work on several nodes and lose one by killing its processes.

Only the processes these nodes started are stopped (each node's own process group), never
other Ray instances on the machine (`ray stop` would kill them all).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray_head import free_ports, job_env

VENV_BIN = Path(sys.executable).parent


@dataclass
class Node:
    """One raylet: its `ray start --block` process (a process group of its own) and log."""

    name: str
    proc: subprocess.Popen
    log: Path
    node_id: str | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class LocalCluster:
    """A head (no CPUs by default: drivers and Train's controller only, like a real head node)
    and worker nodes of `cpus` CPUs each. Every process shares RAY_TMPDIR=temp_dir, so Ray's
    current-cluster file of other users on the machine is never touched."""

    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    head: Node | None = None
    workers: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    started_s: float = 0.0
    count: int = 0  # worker nodes started, for unique names

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def env(self) -> dict[str, str]:
        """The environment of every process of this cluster and of its drivers."""
        env = job_env()
        env["RAY_TMPDIR"] = self.temp_dir
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if p
        )
        return env

    def _start(self, name: str, args: list[str]) -> Node:
        log = Path(self.temp_dir) / f"{name}.log"
        ports = free_ports(6)
        cmd = [
            str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats",
            f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}", f"--dashboard-agent-grpc-port={ports[3]}",
            f"--metrics-export-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
            "--object-store-memory=100000000", *args,
        ]  # fmt: skip
        with open(log, "w") as f:
            proc = subprocess.Popen(
                cmd, env=self.env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        return Node(name, proc, log)

    def start(self, workers: int = 2, cpus: float = 1, head_cpus: float = 0) -> LocalCluster:
        """Start the head, then `workers` worker nodes one by one; wait until all are alive."""
        t0 = time.monotonic()
        for attempt in range(3):  # as _join: a busy machine can outlast `ray start`'s 30 s
            self.gcs_port, client, dashboard = free_ports(3)
            self.head = self._start(
                "head",
                [
                    "--head", f"--port={self.gcs_port}", f"--num-cpus={head_cpus}",
                    "--include-dashboard=false", f"--dashboard-port={dashboard}",
                    f"--ray-client-server-port={client}",
                    f"--temp-dir={self.temp_dir}", '--resources={"head": 1}',
                ],
            )  # fmt: skip
            try:
                self._wait_started(self.head)
                break
            except RuntimeError:
                _killpg(self.head.proc, signal.SIGKILL)
                if attempt == 2:
                    raise
        for _ in range(workers):
            self._join(cpus)
        self.identify()
        self.started_s = time.monotonic() - t0
        return self

    def _add(self, cpus: float) -> Node:
        self.count += 1
        name = f"worker{self.count}"
        node = self._start(
            name,
            [f"--address={self.address}", f"--num-cpus={cpus}", f'--resources={{"{name}": 1}}'],
        )
        self.workers.append(node)
        return node

    def _join(self, cpus: float, tries: int = 3) -> Node:
        """A worker node, started again when it gives up: `ray start` waits a fixed 30 s for
        its raylet to register, which a machine busy with other tests can exceed."""
        for attempt in range(tries):
            node = self._add(cpus)
            try:
                self._wait_started(node)
                return node
            except RuntimeError:
                _killpg(node.proc, signal.SIGKILL)
                self.workers.remove(node)
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def add_worker(self, cpus: float = 1) -> Node:
        """Join one more worker node (the way a replacement machine joins)."""
        node = self._join(cpus)
        self.identify()
        return node

    def alive_workers(self) -> list[Node]:
        return [w for w in self.workers if w.alive()]

    def nodes(self) -> list[dict]:
        """Ray's view of the alive nodes: [{"id", "resources"}], from a short-lived driver."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False); "
            "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} "
            "for n in ray.nodes() if n['Alive']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env(), capture_output=True, text=True,
            timeout=120, check=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    def identify(self) -> None:
        """Set each node's Ray node id (found by the custom resource named after it)."""
        byname = {w.name: w for w in self.workers}
        if self.head is not None:
            byname["head"] = self.head
        for entry in self.nodes():
            for key in entry["resources"]:
                if key in byname:
                    byname[key].node_id = entry["id"]

    @staticmethod
    def _wait_started(node: Node, timeout: float = 180) -> None:
        """Until `ray start` says the node runs (its raylet registered with the head)."""
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in node.log.read_text():
            if not node.alive():
                raise RuntimeError(f"{node.name} exited: {node.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} did not start: {node.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def worker(self, node_id: str) -> Node:
        """The worker node with Ray node id node_id."""
        return next(w for w in self.workers if w.node_id == node_id)

    def kill(self, node: Node) -> float:
        """Lose a node at once (SIGKILL to all its processes); the time it was killed."""
        _killpg(node.proc, signal.SIGKILL)
        return time.time()

    def stop(self) -> None:
        """Stop every node this cluster started (workers first, then the head)."""
        for node in [*self.workers, self.head]:
            if node is not None and node.alive():
                _killpg(node.proc, signal.SIGTERM, wait=20)
            if node is not None:
                _killpg(node.proc, signal.SIGKILL)


def _killpg(proc: subprocess.Popen, sig: int, wait: float = 10) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        pass
