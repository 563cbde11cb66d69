"""Jobs on a real multi-node Ray cluster on this machine (tests/ray_cluster.py: a head without
CPUs and worker nodes of 1 CPU, each its own raylet): training's workers, embedding's actors
and the index's tasks land on several nodes, and each job survives losing a worker node, its
driver or the head. The recovery times they print are the ones docs/cluster.md records.

Every job runs as its own driver process against the cluster (as under `ray job submit`),
and every test uses the one module cluster, replacing the nodes it lost; the head-loss test
runs last and restarts the whole cluster.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_class_tree, write_vec
from PIL import Image
from ray_cluster import LocalCluster

from devise import runs
from devise import training as T
from devise.catalog import build_catalog, write_catalog
from devise.store import Store, read_version

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DRIVER = str(REPO / "tests" / "cluster_driver.py")
WORDS = ["cat", "dog", "car", "ship", "ankle", "boot", "shoe", "bridge", "kitten", "the"]
WORKERS = 2  # worker nodes the tests expect at their start


def _report(what: str, seconds: float) -> None:
    """A recovery time, printed for docs/cluster.md (run with -s to see them)."""
    print(f"\n[cluster] {what}: {seconds:.1f} s", flush=True)


@pytest.fixture(scope="module")
def cluster():
    """A head (0 CPUs) and two worker nodes of 1 CPU each, stopped at the end whatever
    happened."""
    c = LocalCluster()
    try:
        c.start(workers=WORKERS, cpus=1)
        _report("cluster start (head + 2 worker nodes)", c.started_s)
        yield c
    finally:
        c.stop()


def _full(cluster: LocalCluster) -> LocalCluster:
    """The cluster with WORKERS worker nodes alive (a replacement joins for each one lost)."""
    while len(cluster.alive_workers()) < WORKERS:
        cluster.add_worker(cpus=1)
    return cluster


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A catalog of 5 colour classes ('ship' held out), a seeded .vec, a shared folder (the
    'NFS' every node reads: here the one filesystem) and 80 images + 1 broken for embedding."""
    base = tmp_path_factory.mktemp("cluster")
    root = write_class_tree(base / "classes", per_class=10)
    catalog = write_catalog(
        build_catalog(root, test_fraction=0.34, holdout=["ship"], seed=0), base / "catalog.parquet"
    )
    vec = base / "tiny.vec"
    write_vec(vec, WORDS, dim=8, seed=1)
    images = base / "images"
    for i in range(80):
        rng = np.random.default_rng(i)
        p = images / f"c{i % 4}" / f"img_{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(p)
    (images / "c0" / "broken.png").write_bytes(b"not a png")
    return {"base": base, "catalog": catalog, "vec": vec, "images": images}


@pytest.fixture(scope="module")
def model(inputs) -> Path:
    """A random head on the tiny backbone (what embedding runs)."""
    import torch

    from devise.model import DeviseHead, HeadSpec, save_model
    from devise.vectors import load_vectors

    wv = load_vectors(inputs["vec"], cache_dir=inputs["base"] / "vc")
    torch.manual_seed(0)
    spec = HeadSpec(
        in_dim=64, out_dim=8, backbone="tiny", image_size=32, vectors=str(inputs["vec"]),
        vectors_id=wv.vectors_id, class_names=["cat", "dog"], class_keys=["cat", "dog"],
    )  # fmt: skip
    return save_model(inputs["base"] / "model", DeviseHead(spec).eval())


def _run(cmd: list[str], env: dict, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
    )


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    """Wait for a driver (7 minutes at most, then kill it); its (stdout, stderr)."""
    try:
        return proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _lose_a_worker_node(cluster, proc: subprocess.Popen, found, pick, what: str):
    """Once found() returns something, kill the worker node that pick(it) names, then wait for
    the driver; (the node's time of death, the driver's stdout and stderr, what found gave)."""
    try:
        got = _wait_for(found, proc, what=what)
        killed_at = cluster.kill(cluster.worker(pick(got)))
        stdout, stderr = _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    return killed_at, stdout, stderr, got


def _wait_for(check, proc: subprocess.Popen, timeout: float = 300, what: str = ""):
    """Poll check() until it returns something truthy; fail if the driver exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the driver exited before {what}: {err[-3000:]}")
        time.sleep(0.3)
    pytest.fail(f"no {what} within {timeout} s")


# ---------------------------------------------------------------------------------------------
# Training


def _train_cmd(inputs: dict, out: Path, storage: Path, address: str) -> list[str]:
    return [
        sys.executable, str(REPO / "jobs" / "train.py"), "--catalog", str(inputs["catalog"]),
        "--out", str(out), "--vectors", str(inputs["vec"]), "--backbone", "tiny",
        "--image-size", "32", "--batch-size", "8", "--lr", "0.01", "--epochs", "3",
        "--num-workers", "2", "--cpus-per-worker", "0.25", "--decode-cpus", "0.25",
        "--feature-cache", str(inputs["base"] / "features"), "--head", "linear",
        "--storage", str(storage), "--placement-strategy", "SPREAD", "--address", address,
    ]  # fmt: skip


@pytest.mark.timeout(1500)
def test_training_spreads_its_workers_and_survives_losing_a_worker_node(cluster, inputs, tmp_path):
    """SPREAD puts the two DDP workers on different nodes. Killing the node of rank 1 while the
    run is in epoch 2 (rank 0 held after epoch 1's checkpoint): Ray Train restarts the worker
    group on the nodes left, from epoch 1's checkpoint; every epoch is in metrics.jsonl once,
    and the final test hit@1 is within 1 point of an uninterrupted run with the same seed."""
    c = _full(cluster)
    workers = {w.node_id for w in c.alive_workers()}
    shared = tmp_path / "shared"  # checkpoints on storage every node reads
    base_out, out = tmp_path / "uninterrupted", tmp_path / "lost-node"

    done = _run(_train_cmd(inputs, base_out, shared / "a", c.address), c.env())
    assert done.returncode == 0, done.stderr[-3000:]
    base = runs.read_metrics(base_out)
    assert [m["epoch"] for m in base] == [1, 2, 3]
    for m in base:  # two workers, two different worker nodes (never the head)
        assert len(set(m["worker_nodes"])) == 2 and set(m["worker_nodes"]) <= workers, m

    env = {**c.env(), T.PAUSE_ENV: "1", "PYTHONUNBUFFERED": "1"}
    cmd = _train_cmd(inputs, out, shared / "b", c.address)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at, _, stderr, first = _lose_a_worker_node(
        cluster, proc, lambda: runs.read_metrics(out), lambda m: m[0]["worker_nodes"][1],
        what="epoch 1's checkpoint",
    )  # fmt: skip
    lost = first[0]["worker_nodes"][1]
    assert proc.returncode == 0, stderr[-3000:]
    metrics = runs.read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]  # no epoch counted twice, none missing
    assert [m["start_epoch"] for m in metrics] == [1, 2, 2]  # restarted from epoch 1's state
    assert all(lost not in m["worker_nodes"] for m in metrics[1:])
    assert metrics[0] == first[0]  # epoch 1 was not trained again
    assert abs(metrics[-1]["test_hit1"] - base[-1]["test_hit1"]) <= 0.01
    assert (out / "model" / "spec.json").exists()
    _report("training: worker node killed -> next epoch stored", metrics[1]["time"] - killed_at)
    print(
        f"[cluster] training test hit@1: uninterrupted {base[-1]['test_hit1']:.3f}, after the "
        f"node loss {metrics[-1]['test_hit1']:.3f} ({metrics[-1]['test_count']} test images)"
    )


# ---------------------------------------------------------------------------------------------
# Embedding


def _embed_config(model: Path, inputs: dict, out: Path, address: str) -> str:
    return json.dumps(
        {
            "model_dir": str(model), "out": str(out), "images": str(inputs["images"]),
            "chunk_rows": 8, "executor": "ray", "address": address,
            "resources": {"num_workers": 2, "cpus_per_worker": 0.25, "decode_cpus": 0.25, "batch_size": 4},
        }
    )  # fmt: skip


def _chunks(hook: Path) -> list[dict]:
    path = hook / "chunks.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _result(hook: Path) -> dict:
    """What the driver's embed returned (it writes it to a file: Ray forwards cluster log lines
    to the driver's stdout, and one may come after any line the driver prints)."""
    return json.loads((hook / "result.json").read_text())


def _check_version(out: Path, inputs: dict) -> dict:
    """Every input exactly once: the good images as rows (no path twice), the broken one in
    errors.parquet; one committed version. Returns its manifest."""
    good = {str(p.resolve()) for p in inputs["images"].rglob("img_*.png")}
    manifest, table = read_version(out, columns=["path"])
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == len(good) and set(paths) == good
    errors = Store.open(out).errors()
    assert errors["path"].tolist() == [str(inputs["images"] / "c0" / "broken.png")]
    assert manifest.rows == len(good) and manifest.errors == 1
    assert len(Store.open(out).versions()) == 1
    return manifest


@pytest.mark.timeout(900)
def test_embedding_spreads_its_actors_and_survives_losing_a_node(cluster, inputs, model, tmp_path):
    """The two model actors run on the two worker nodes (each takes 1 s a batch, so the work is
    still spread when) one node is killed after the first chunk is staged, the driver held 5 s
    while Ray Data works on: the lost actor's work is done again on the node left, so every
    image is embedded exactly once and one version is committed."""
    c = _full(cluster)
    hook, out = tmp_path / "hook", tmp_path / "shared" / "emb"
    hook.mkdir()
    cmd = [sys.executable, DRIVER, "embed", _embed_config(model, inputs, out, c.address)]
    proc = subprocess.Popen(
        [*cmd, str(hook), "0", "5", "1.0"], env=c.env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def actors_once_chunked() -> set[str]:
        """The nodes of the model actors, once the first chunk is staged."""
        return _chunks(hook) and {p.name.split("-")[1] for p in hook.glob("actor-*")}

    killed_at, _, stderr, actors = _lose_a_worker_node(
        cluster, proc, actors_once_chunked, min, what="the first chunk"
    )
    assert proc.returncode == 0, stderr[-3000:]
    result = _result(hook)
    manifest = _check_version(out, inputs)
    assert result["rows"] + result["errors"] == 81 and result["resumed"] == 0
    workers = {w.node_id for w in c.workers}  # the lost node included
    assert len(actors) == 2 and actors <= workers  # a model actor on each worker node
    assert sum(result["nodes"].values()) == 81 and set(result["nodes"]) <= workers
    print(f"[cluster] embedding rows per node: {sorted(result['nodes'].values())}")
    assert manifest.details["nodes"] == result["nodes"]
    after = [x for x in _chunks(hook) if x["time"] > killed_at]
    _report("embedding: node killed -> version committed", time.time() - killed_at)
    assert after  # chunks were still staged after the loss


@pytest.mark.timeout(900)
def test_a_killed_embedding_driver_resumes_from_its_staged_chunks(cluster, inputs, model, tmp_path):
    """SIGKILL the driver after its second chunk: the rerun of the same job takes the staged
    chunks as they are (resumed), embeds only the rest, and commits one complete version."""
    c = _full(cluster)
    hook, out = tmp_path / "hook", tmp_path / "shared" / "emb"
    hook.mkdir()
    config = _embed_config(model, inputs, out, c.address)
    proc = subprocess.Popen(
        [sys.executable, DRIVER, "embed", config, str(hook), "1", "600"], env=c.env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: len(_chunks(hook)) >= 2, proc, what="two chunks")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    staged = sum(x["rows"] for x in _chunks(hook))
    assert Store.open(out).versions() == []  # nothing committed by the killed driver

    t0 = time.monotonic()
    rerun = _run([sys.executable, DRIVER, "embed", config, str(hook)], c.env())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = _result(hook)
    assert result["resumed"] >= 16 and result["resumed"] >= staged
    assert result["resumed"] + result["embedded"] == 81
    _check_version(out, inputs)
    _report("embedding: rerun after the driver was killed, to commit", time.monotonic() - t0)


# ---------------------------------------------------------------------------------------------
# Index build


@pytest.fixture
def emb(tmp_path) -> Path:
    """A version of 4,000 clustered 32-d rows in 8 parts."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 32))
    x = centres[rng.integers(0, 40, 4000)] + 0.5 * rng.standard_normal((4000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    names = [f"/img/c{i % 7}/{i}.jpg" for i in range(4000)]
    table = pd.DataFrame({"path": names, "label": [n.split("/")[2] for n in names]})
    emb_dir = tmp_path / "shared" / "emb"
    Store.open(emb_dir, create=True).write_version(table, x, model_id="m1", chunk_rows=500)
    return emb_dir


def _index(c: LocalCluster, emb: Path, hook: Path, retries: int) -> subprocess.Popen:
    args = [
        str(emb), "--kind", "ivf-pq", "--num-tasks", "4", "--cpus-per-task", "0.25",
        "--queries", "100", "--address", c.address,
    ]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, DRIVER, "index", str(hook), str(retries), "6", "--", *args],
        env=c.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _shard_nodes(hook: Path) -> set[str] | None:
    """The nodes shard tasks started on, once there are two of them."""
    nodes = {p.name.split("-")[1] for p in hook.glob("shard-*")}
    return nodes if len(nodes) == 2 else None


@pytest.mark.timeout(900)
def test_index_build_survives_losing_a_node_or_commits_nothing(cluster, emb, tmp_path):
    """Shard tasks run on both worker nodes; one node is killed while they run. With Ray's
    retries the lost shards are built again on the node left and the index commits complete;
    with no retries the build fails with one line and commits nothing (the index already
    there stays as it was)."""
    from devise import ann

    pytest.importorskip("faiss")
    c = _full(cluster)
    hook = tmp_path / "hook"
    hook.mkdir()
    proc = _index(c, emb, hook, retries=3)
    killed_at, stdout, stderr, nodes = _lose_a_worker_node(
        cluster, proc, lambda: _shard_nodes(hook), min, what="shard tasks on two nodes"
    )
    assert proc.returncode == 0, stderr[-3000:]
    _report("index: node killed -> index committed", time.time() - killed_at)
    assert "Indexed 4000 rows" in stdout
    version = Store.open(emb).version()
    index = ann.load(version.folder, expect_rows=4000)
    assert index is not None and index.rows == 4000
    assert index.meta["recall_at_10"] >= 0.95 and set(index.meta["nodes"]) == nodes
    before = (ann.index_dir(version.folder) / ann.INDEX_META).read_text()

    c = _full(cluster)
    hook2 = tmp_path / "hook2"
    hook2.mkdir()
    proc = _index(c, emb, hook2, retries=0)
    _, stdout, stderr, _ = _lose_a_worker_node(
        cluster, proc, lambda: _shard_nodes(hook2), min, what="shard tasks on two nodes"
    )
    assert proc.returncode == 75  # ann.IndexTasksLostError: try again later
    # One error sentence (Ray's forwarded cluster log lines may come before or after it).
    (line,) = [x for x in stderr.splitlines() if x.startswith("devise index: error:")]
    assert "nothing was committed" in line and "rerun `devise index`" in line, stderr[-3000:]
    assert "Traceback" not in stderr
    assert (ann.index_dir(version.folder) / ann.INDEX_META).read_text() == before
    assert not list(version.folder.glob(".index-tmp-*"))


# ---------------------------------------------------------------------------------------------
# The head


@pytest.mark.timeout(1500)
def test_losing_the_head_and_driver_then_resubmitting_resumes_training(cluster, inputs, tmp_path):
    """The head node goes down with the job's driver on it (as under `ray job submit`) after
    epoch 1's checkpoint: the whole cluster is gone. On a new cluster the same job resumes
    from the checkpoint in the shared --storage folder instead of starting over."""
    c = _full(cluster)
    out, storage = tmp_path / "run", tmp_path / "shared" / "checkpoints"
    env = {**c.env(), T.PAUSE_ENV: "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _train_cmd(inputs, out, storage, c.address), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        first = _wait_for(lambda: runs.read_metrics(out), proc, what="epoch 1's checkpoint")
        killed_at = cluster.kill(cluster.head)
        proc.kill()  # the driver ran on the head
        proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
    cluster.stop()
    assert not (out / "model").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert (storage / cfg["run_name"] / "epoch_0001" / "state.pt").exists()

    fresh = LocalCluster().start(workers=WORKERS, cpus=1)
    cluster.__dict__.update(fresh.__dict__)  # the module fixture stops the new one
    rerun = _run(_train_cmd(inputs, out, storage, cluster.address), cluster.env())
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = runs.read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[0] == first[0] and [m["start_epoch"] for m in metrics] == [1, 2, 2]
    assert "resuming after epoch 1" in rerun.stdout
    _report("head lost -> new cluster up", fresh.started_s)
    _report("head lost -> training finished on the new cluster", time.time() - killed_at)
