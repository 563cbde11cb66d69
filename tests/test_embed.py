"""The embedding job on Ray: parquet layout, kill-and-resume, the lock, model changes and
incremental runs (new, changed and deleted files).

Ray Data runs cost 10-30 s here, so one module fixture embeds a small tree once; the
incremental test, which changes that tree, runs last.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from devise import cli
from devise.config import EmbedConfig, Resources
from devise.embed import embed
from devise.model import DeviseHead, HeadSpec, model_id, save_model
from devise.search import EmbeddingIndex
from devise.store import (
    CURRENT_FILE,
    LOCK_FILE,
    STAGING_DIR,
    VERSIONS_DIR,
    EmbedLock,
    LockHeldError,
    embedding_matrix,
    list_versions,
    plan_run,
    read_manifest,
    read_parquet_meta,
    read_version,
)

WORDS = ["cat", "dog", "car", "ship", "ankle", "boot", "shoe", "bridge", "kitten", "the"]
CLASSES = ["cat", "dog", "car", "ship"]
RAY_FLAGS = ["--num-workers", "2", "--cpus-per-worker", "0.5", "--decode-cpus", "0.5"]


def _image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    return path


def _save_head(path: Path, vec_file: Path, seed: int) -> Path:
    from devise.vectors import load_vectors

    wv = load_vectors(vec_file)
    torch.manual_seed(seed)
    spec = HeadSpec(
        in_dim=64, out_dim=8, backbone="tiny", image_size=32, vectors=str(vec_file),
        vectors_id=wv.vectors_id, class_names=CLASSES,
    )  # fmt: skip
    return save_model(path, DeviseHead(spec).eval())


def _config(setup, out, **kw) -> EmbedConfig:
    args = {
        "model_dir": str(setup["model"]), "out": str(out), "catalog": str(setup["catalog"]),
        "resources": Resources(2, 0.5, 0.5, batch_size=4),
    }  # fmt: skip
    args.update(kw)
    return EmbedConfig(**args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_session):
    """A 24-image catalog (4 classes x 6), a random head, and one full embedding run through
    jobs/embed.py."""
    from conftest import write_vec

    tmp = tmp_path_factory.mktemp("embed")
    mp = pytest.MonkeyPatch()
    mp.setenv("DEVISE_HOME", str(tmp / "home"))  # word-vector caches stay in the test folder
    vec = tmp / "tiny.vec"
    write_vec(vec, WORDS, dim=8, seed=1)
    rows = []
    for c, name in enumerate(CLASSES):
        for i in range(6):
            p = _image(tmp / "images" / name / f"img_{i}.png", 10 * c + i)
            rows.append({"path": str(p), "label": name, "class_name": name, "split": "test"})
    catalog = tmp / "catalog.parquet"
    pd.DataFrame(rows).to_parquet(catalog)
    model = _save_head(tmp / "run" / "model", vec, seed=0)
    out = tmp / "emb"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jobs.embed import main as job_main

    args = ["--model", str(model), "--catalog", str(catalog), "--out", str(out)]
    rc = job_main([*args, "--batch-size", "4", "--chunk-rows", "10", *RAY_FLAGS])
    assert rc == 0
    yield {"tmp": tmp, "vec": vec, "model": model, "catalog": catalog, "out": out, "rows": rows}
    mp.undo()


@pytest.mark.timeout(240)
def test_embed_writes_a_versioned_parquet_table(setup):
    out = setup["out"]
    version = (out / CURRENT_FILE).read_text().strip()
    assert list_versions(out) == [version]
    manifest = read_manifest(out)
    mid = model_id(setup["model"])
    assert version.endswith(mid) and manifest.model_id == mid
    assert manifest.dim == 8 and manifest.rows == 24 and manifest.errors == 0
    assert manifest.vectors == str(setup["vec"]) and manifest.vectors_id
    assert len(manifest.parts) >= 2  # chunks of 10 rows
    _, table = read_version(out)
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: float>[8]"
    meta = read_parquet_meta(out / VERSIONS_DIR / version / manifest.parts[0].file)
    assert meta["model_id"] == mid and meta["dim"] == "8" and meta["vectors_id"]
    df = table.to_pandas()
    assert sorted(df["path"]) == sorted(r["path"] for r in setup["rows"])
    assert (df["model_id"] == mid).all()
    by_path = {r["path"]: r["label"] for r in setup["rows"]}
    assert all(by_path[p] == lab for p, lab in zip(df["path"], df["label"]))
    st = os.stat(df["path"][0])
    assert df["size_bytes"][0] == st.st_size and df["mtime_ns"][0] == st.st_mtime_ns
    m = embedding_matrix(table)
    assert m.dtype == np.float32 and np.allclose(np.linalg.norm(m, axis=1), 1.0, atol=1e-5)
    assert len(pq.read_table(out / "errors.parquet")) == 0
    assert not (out / LOCK_FILE).exists() and not any((out / STAGING_DIR).iterdir())


@pytest.mark.timeout(240)
def test_killed_run_resumes_without_duplicates_or_recompute(setup, tmp_path):
    """A Ray run dies after its first chunk (a stale lock and a half-written file stay behind);
    the rerun reuses that chunk as is and embeds only the rest."""
    out = tmp_path / "emb"
    staging = out / STAGING_DIR / model_id(setup["model"])
    first = {}

    def die_after_first_chunk(part):
        first["inode"] = os.stat(part.path).st_ino
        first["rows"] = part.rows
        (staging / ".part-00001.parquet.dead.tmp").write_bytes(b"PAR1 half written")
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        embed(_config(setup, out, chunk_rows=8), on_part=die_after_first_chunk)
    # A chunk closes at the first pipeline batch that reaches chunk_rows rows.
    assert 8 <= first["rows"] < 24 and current_is_empty(out)
    # What SIGKILL leaves: the lock of a process that no longer exists.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    (out / LOCK_FILE).write_text(
        json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename, "token": "x",
                    "started": "then"})
    )  # fmt: skip
    # The rerun in this process (no second Ray start-up): staging and commit are the same code.
    result = embed(_config(setup, out, chunk_rows=8, local=True))
    n = first["rows"]
    assert result.resumed == n and result.embedded == 24 - n and result.rows == 24
    _, table = read_version(out)
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 24
    assert set(paths) == {r["path"] for r in setup["rows"]}
    version_dir = out / VERSIONS_DIR / result.version
    inodes = {os.stat(version_dir / p.file).st_ino for p in read_manifest(out).parts}
    assert first["inode"] in inodes  # the first chunk's file itself, not a recomputation
    # Same model, same images: the same embeddings as the fixture's uninterrupted run.
    ref = EmbeddingIndex.open(setup["out"])
    got = EmbeddingIndex.open(out)
    order = np.argsort(got.paths)
    ref_order = np.argsort(ref.paths)
    assert np.allclose(got.matrix[order], ref.matrix[ref_order], atol=1e-5)
    assert not (out / LOCK_FILE).exists()


def current_is_empty(out: Path) -> bool:
    return not (out / CURRENT_FILE).exists() and list_versions(out) == []


def test_a_second_writer_waits_or_exits_cleanly(setup, tmp_path, capsys):
    out = tmp_path / "emb"
    holder = EmbedLock(out)
    holder.acquire()
    with pytest.raises(LockHeldError, match="Another run"):
        EmbedLock(out).acquire()
    args = ["--model", str(setup["model"]), "--catalog", str(setup["catalog"]), "--out", str(out)]
    rc = cli.main(["embed", *args, "--local"])
    err = capsys.readouterr().err.strip()
    assert rc == LockHeldError.EXIT_CODE == 75 and err.startswith(
        "devise embed: error: Another run (devise embed, pid "
    )
    assert list_versions(out) == []
    # --wait-lock: the second run waits for the first to finish, then takes the lock.
    timer = threading.Timer(0.5, holder.release)
    timer.start()
    t0 = time.monotonic()
    waiter = EmbedLock(out, wait_s=10)
    waiter.acquire()
    assert time.monotonic() - t0 >= 0.4
    waiter.release()
    assert not (out / LOCK_FILE).exists()


def test_an_index_build_holding_the_lock_refuses_an_embedding_run(setup, tmp_path, capsys):
    """`devise index` holds the same lock: an embedding run meanwhile exits 75 with one line
    naming the build, and commits nothing."""
    out = tmp_path / "emb"
    args = ["--model", str(setup["model"]), "--catalog", str(setup["catalog"]), "--out", str(out)]
    with EmbedLock(out, command="devise index"):
        rc = cli.main(["embed", *args, "--local"])
    err = capsys.readouterr().err.strip()
    assert rc == 75 and "\n" not in err, err
    assert err.startswith("devise embed: error: Another run (devise index, pid "), err
    assert list_versions(out) == [] and not (out / LOCK_FILE).exists()


def test_plan_marks_new_changed_unchanged_missing_and_removed():
    table = pd.DataFrame(
        {
            "path": ["a", "b", "c", "d"],
            "label": None,
            "class_name": None,
            "size_bytes": [1, 2, 3, -1],
            "mtime_ns": [10, 20, 31, -1],
        }
    )
    base = pd.DataFrame(
        {"path": ["a", "c", "e"], "size_bytes": [1, 3, 5], "mtime_ns": [10, 30, 50]}
    )
    plan = plan_run(table, base, previous_paths=["a", "c", "e"])
    assert list(plan.keep["path"]) == ["a"]
    assert list(plan.todo["path"]) == ["b", "c"]  # new, and changed mtime
    assert list(plan.missing["path"]) == ["d"]
    assert plan.removed == ["e"]


@pytest.mark.timeout(240)
def test_a_new_model_writes_a_new_version_and_switches_when_complete(setup, tmp_path):
    out = tmp_path / "emb"
    first = embed(_config(setup, out, local=True))
    model2 = _save_head(tmp_path / "model2", setup["vec"], seed=5)
    second = embed(_config(setup, out, model_dir=str(model2), local=True, incremental=True))
    assert second.version != first.version and second.base_version is None
    assert second.embedded == 24 and second.model_id == model_id(model2)
    assert (out / CURRENT_FILE).read_text().strip() == second.version
    assert EmbeddingIndex.open(out).model_id == second.model_id
    assert EmbeddingIndex.open(out, first.version).model_id == first.model_id
    # Back to the first model, incrementally: its own last version is the base.
    third = embed(_config(setup, out, local=True, incremental=True))
    assert third.base_version == first.version and third.embedded == 0 and third.reused == 24


@pytest.mark.timeout(240)
def test_incremental_handles_exactly_the_added_changed_and_deleted_files(setup, capsys):
    """Runs last: it changes the fixture's image tree."""
    out, tmp = setup["out"], setup["tmp"]
    before = EmbeddingIndex.open(out)
    rows = list(setup["rows"])
    added = [_image(tmp / "images" / "dog" / f"new_{i}.png", 100 + i) for i in range(3)]
    rows += [{"path": str(p), "label": "dog", "class_name": "dog", "split": "test"} for p in added]
    changed = Path(rows[0]["path"])
    _image(changed, 999)  # new pixels, new size/mtime
    deleted = rows.pop(5)["path"]
    os.remove(deleted)
    pd.DataFrame(rows).to_parquet(setup["catalog"])
    has_faiss = importlib.util.find_spec("faiss") is not None
    if has_faiss:  # the version has an index: the new version gets it too
        from devise import ann

        ann.build_index(out, kind="flat", local=True, queries=10)
    args = ["--model", str(setup["model"]), "--catalog", str(setup["catalog"]), "--out", str(out)]
    rc = cli.main(["embed", *args, "--incremental", "--batch-size", "4", *RAY_FLAGS])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "4 embedded, 0 resumed, 22 unchanged, 1 removed" in printed
    # 4 added + 2 removed (the deleted and the changed file) of 26 rows: past 20 %, rebuilt.
    assert (f"Index rebuilt from {before.version}: flat" in printed) == has_faiss
    assert ("Index" in printed) == has_faiss
    manifest = read_manifest(out)
    assert manifest.embedded == 4 and manifest.reused == 22 and manifest.removed == 1
    assert manifest.base_version == before.version and manifest.rows == 26
    removed = pq.read_table(out / VERSIONS_DIR / manifest.version / "removed.parquet")
    assert removed.column("path").to_pylist() == [deleted]
    after = EmbeddingIndex.open(out)
    assert deleted not in set(after.paths) and len(set(after.paths)) == 26
    assert {str(p) for p in added} <= set(after.paths)
    old = dict(zip(before.paths, before.matrix))
    new = dict(zip(after.paths, after.matrix))
    assert not np.allclose(new[str(changed)], old[str(changed)])
    same = [p for p in new if p in old and p != str(changed)]
    assert len(same) == 22 and all(np.array_equal(new[p], old[p]) for p in same)
    # The deleted image is never a search result any more.
    _, idx = after.search(after.matrix, k=len(after))
    assert deleted not in {after.paths[i] for i in idx.ravel()}
    if has_faiss:
        carried = ann.load(out / VERSIONS_DIR / manifest.version, expect_rows=26)
        assert carried.rows == 26 and "update" not in carried.meta  # rebuilt, not updated
        assert EmbeddingIndex.open(out).ann is not None
    # The previous version is still complete for a reader that opened it earlier.
    assert len(EmbeddingIndex.open(out, before.version)) == 24
    # With --keep-versions 1 the index is carried before the old version is removed.
    third = ["--incremental", "--keep-versions", "1", "--batch-size", "4", *RAY_FLAGS]
    assert cli.main(["embed", *args, *third]) == 0
    printed = capsys.readouterr().out
    latest = read_manifest(out).version
    assert sorted(p.name for p in (out / VERSIONS_DIR).iterdir()) == [latest]
    if has_faiss:
        assert f"Index updated from {manifest.version}: flat" in printed
        assert ann.load(out / VERSIONS_DIR / latest, expect_rows=26).rows == 26
