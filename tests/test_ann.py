"""The approximate index: recall against exact, atomic commit, incremental update, export."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

faiss = pytest.importorskip("faiss")

from devise import ann
from devise.api import Index
from devise.cli import main as cli_main
from devise.search import EmbeddingIndex
from devise.similarity import top_k
from devise.store import Manifest, Store, embedding_matrix

DIM = 32


def clustered(n: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """(n, DIM) unit rows around `clusters` centres (a spread within each cluster)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_version(emb_dir: Path, table: pd.DataFrame, x: np.ndarray, **kw) -> str:
    return Store.open(emb_dir, create=True).write_version(table, x, **kw)


def rows(names: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"path": names, "label": [n.split("/")[1] for n in names]})


def names(a: int, b: int) -> list[str]:
    return [f"/img/c{i % 7}/{i}.jpg" for i in range(a, b)]


@pytest.fixture
def emb(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """An embeddings folder with one version of 4,000 clustered rows in 8 parts."""
    x = clustered(4000)
    write_version(tmp_path / "emb", rows(names(0, 4000)), x, model_id="m1", chunk_rows=500)
    return tmp_path / "emb", x


def version_matrix(emb_dir: Path) -> tuple[np.ndarray, list[str]]:
    _, table = Store.open(emb_dir).read()
    return embedding_matrix(table), table.column("path").to_pylist()


def test_small_ivf_index_reaches_its_recall_against_exact(emb):
    emb_dir, _ = emb
    r = ann.build_index(emb_dir, kind="ivf-pq", target_recall=0.9, local=True, queries=200)
    assert r.kind == "ivf-pq" and r.recall >= 0.9
    meta = ann.load(r.folder.parent).meta
    assert meta["recall_at_10"] == pytest.approx(r.recall, abs=1e-4)
    assert meta["params"]["nprobe"] >= 1 and meta["rows"] == 4000

    # Fresh queries (not the build's held-out rows) against exact search over the same rows.
    matrix, _ = version_matrix(emb_dir)
    index = ann.load(r.folder.parent, expect_rows=len(matrix))
    noise = 0.2 * np.random.default_rng(9).standard_normal((300, DIM)).astype(np.float32)
    queries = matrix[:300] + noise / np.sqrt(DIM)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, exact = top_k(matrix, queries, 10)
    _, approx = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.85
    # Given the rows, scores are exact cosine.
    scores, ids = index.search(queries[:5], 10, matrix=matrix)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", matrix[ids], queries[:5]), atol=1e-5)
    assert ann.load(r.folder.parent).bytes_per_vector() < 4 * DIM


def test_crash_before_the_switch_leaves_exact_search(emb, monkeypatch):
    emb_dir, _ = emb
    version_dir = Store.open(emb_dir).version().folder
    before = sorted(p.name for p in version_dir.iterdir())
    real_rename = os.rename

    def crash(src, dst):
        if Path(dst).name == ann.INDEX_DIR:
            raise OSError("killed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="killed"):
        ann.build_index(emb_dir, kind="flat", local=True, queries=50)
    monkeypatch.undo()
    assert sorted(p.name for p in version_dir.iterdir()) == before  # nothing half-written left
    assert ann.load(version_dir) is None
    index = EmbeddingIndex.open(emb_dir)
    matrix, _ = version_matrix(emb_dir)
    _, idx = index.search(matrix[:3], 5)
    assert list(idx[:, 0]) == [0, 1, 2]

    # A crash while replacing a committed index leaves that index, or none: never a broken one.
    ann.build_index(emb_dir, kind="flat", local=True, queries=50)
    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError):
        ann.build_index(emb_dir, kind="flat", local=True, queries=50)
    monkeypatch.undo()
    loaded = ann.load(version_dir)
    assert loaded is None or loaded.rows == 4000


def test_incremental_update_finds_added_rows_and_never_returns_removed(emb):
    emb_dir, x = emb
    first = ann.build_index(emb_dir, kind="ivf-pq", target_recall=0.9, local=True, queries=200)
    v1 = first.meta["version"]
    # New version: rows 0..299 removed, 300 new rows, the rest kept (in a different row order).
    keep = np.arange(300, 4000)
    new = clustered(300, seed=5)
    paths = names(300, 4000) + names(4000, 4300)
    order = np.random.default_rng(1).permutation(len(paths))
    table = rows([paths[i] for i in order])
    vectors = np.concatenate([x[keep], new])[order]
    write_version(emb_dir, table, vectors, model_id="m1", chunk_rows=700)
    r = ann.update_index(emb_dir, previous=v1)
    assert r is not None and r.meta["built_from"] == v1
    assert r.meta["update"] == {
        "added": 300,
        "removed": 300,
        "seconds": r.meta["update"]["seconds"],
    }

    index = ann.load(r.folder.parent, expect_rows=4000)
    _, current_paths = version_matrix(emb_dir)
    removed = set(names(0, 300))
    # Added rows are found (their own vector's best hit is themselves).
    _, ids = index.search(new, 1)
    assert [current_paths[i] for i in ids[:, 0]] == names(4000, 4300)
    # Kept rows moved to new row ids: the ids returned still name the right files.
    _, ids = index.search(x[300:400], 1)
    assert [current_paths[i] for i in ids[:, 0]] == names(300, 400)
    # Removed rows never come back, even when their exact vectors are the query.
    index.set_params({"nprobe": 256, "k_factor": 50})
    _, ids = index.search(x[:300], 50)
    assert ids.min() >= 0
    assert removed.isdisjoint(current_paths[i] for i in ids.ravel())

    # Search (the CLI's and the Python API's path) uses the index; --exact does not.
    searched = EmbeddingIndex.open(emb_dir)
    assert searched.ann is not None and EmbeddingIndex.open(emb_dir, exact=True).ann is None
    scores, ids = searched.search(x[:300], 10)
    assert removed.isdisjoint(searched.paths[ids.ravel()])
    q = x[:300]
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", searched.matrix[ids], q), atol=1e-5)
    best = np.max(q @ searched.matrix.T, axis=1)  # approximate: most, not all, top-1s found
    assert np.mean(np.isclose(scores[:, 0], best, atol=1e-5)) >= 0.9


def test_large_change_rebuilds_and_flat_index_updates(emb):
    emb_dir, x = emb
    v1 = ann.build_index(emb_dir, kind="flat", local=True, queries=50).meta["version"]
    write_version(emb_dir, rows(names(100, 4000)), x[100:], model_id="m1", chunk_rows=1000)
    r = ann.update_index(emb_dir, previous=v1)
    assert r.meta["update"]["removed"] == 100 and r.recall == 1.0
    index = ann.load(r.folder.parent)
    _, ids = index.search(x[100:110], 1)
    assert list(ids[:, 0]) == list(range(10))
    v2 = r.meta["version"]
    write_version(emb_dir, rows(names(3000, 5000)), clustered(2000, 3), model_id="m1")
    r = ann.update_index(emb_dir, previous=v2)
    assert "update" not in r.meta and r.meta["built_from"] is None  # rebuilt from scratch


def test_export_reads_in_duckdb(emb, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    emb_dir, x = emb
    out = tmp_path / "out" / "emb.parquet"
    assert cli_main(["export", str(emb_dir), "--to", str(out)]) == 0
    assert pq.read_schema(out).field("embedding").type.list_size == DIM
    con = duckdb.connect()
    q = x[7].tolist()
    got = con.execute(
        "SELECT row, path, list_cosine_similarity(embedding, ?::FLOAT[]) AS score, id "
        "FROM read_parquet(?) ORDER BY score DESC LIMIT 3",
        [q, str(out)],
    ).fetchall()
    assert got[0][0] == 7 and got[0][1] == names(7, 8)[0] and got[0][2] == pytest.approx(1.0)
    # id is the 16-hex id search, --json and the API return for that image.
    assert got[0][3] == Index.open(emb_dir, exact=True).search_vectors(x[7][None], 1)[0][0]["id"]
    exact = x @ x[7]
    assert [r[0] for r in got] == list(np.argsort(-exact)[:3])
    # The fixed-size array functions need the size spelled out (parquet keeps no list size).
    (score,) = con.execute(
        f"SELECT array_cosine_similarity(embedding::FLOAT[{DIM}], ?::FLOAT[{DIM}]) "
        "FROM read_parquet(?) WHERE row = 7",
        [q, str(out)],
    ).fetchone()
    assert score == pytest.approx(1.0, abs=1e-5)
    n, ids, rows = con.execute(
        f"SELECT count(*), sum(row), count(DISTINCT id) FROM '{out}'"
    ).fetchone()
    assert n == 4000 and ids == sum(range(4000)) and rows == 4000


def test_cli_index_builds_with_ray_tasks_and_reports_bad_input(emb, ray_session, capsys):
    emb_dir, _ = emb
    rc = cli_main(
        [
            "index",
            str(emb_dir),
            "--kind",
            "flat",
            "--num-tasks",
            "2",
            "--cpus-per-task",
            "0.5",
            "--queries",
            "50",
        ]
    )
    assert rc == 0
    assert "recall@10 1.000" in capsys.readouterr().out
    meta = ann.load(Store.open(emb_dir).version().folder).meta
    assert meta["tasks"] == 2 and meta["rows"] == 4000
    assert cli_main(["index", str(emb_dir.parent / "nope"), "--local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_index_api_uses_the_index_unless_exact(emb):
    emb_dir, x = emb
    ann.build_index(emb_dir, kind="ivf-pq", target_recall=0.9, local=True, queries=200)
    index = Index.open(emb_dir)
    assert index.info()["search"].startswith("ivf-pq (recall@10 ")
    exact = Index.open(emb_dir, exact=True)
    assert exact.info()["search"] == "exact" and exact.reopen() is exact
    hits = index.search_vectors(x[:50], k=5)
    want = exact.search_vectors(x[:50], k=5)
    # Each approximate score is the exact cosine of the row it names; most top-1s agree.
    for q, row in enumerate(hits):
        got = [h["score"] for h in row]
        rows_hit = [index.row(h["id"]) for h in row]
        np.testing.assert_allclose(got, index._base.matrix[rows_hit] @ x[q], atol=1e-5)
    same = np.mean([a[0]["path"] == b[0]["path"] for a, b in zip(hits, want)])
    assert same >= 0.9
    # `devise search --exact` reaches Index.open(exact=True).
    from devise.cli import build_parser

    args = build_parser().parse_args(["search", "--embeddings", str(emb_dir), "--exact", "dog"])
    assert args.exact is True
    args = build_parser().parse_args(["search", "--embeddings", str(emb_dir), "dog"])
    assert args.exact is False


def test_a_new_version_carries_the_index_when_faiss_is_there(emb, monkeypatch):
    emb_dir, x = emb
    Store.open(emb_dir).write_version(rows(names(0, 4000)), x, model_id="m1", chunk_rows=500)
    assert ann.carry_index(emb_dir, *_current(emb_dir)) is None  # no index before: nothing
    ann.build_index(emb_dir, kind="flat", local=True, queries=50)
    write_version(emb_dir, rows(names(50, 4050)), np.concatenate([x[50:], clustered(50, 7)]),
                  model_id="m1", chunk_rows=500)  # fmt: skip
    # Without faiss the new version is simply searched exactly: nothing built, nothing said.
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert ann.carry_index(emb_dir, *_current(emb_dir)) is None
    assert ann.load(Store.open(emb_dir).version().folder) is None
    monkeypatch.undo()
    line = ann.carry_index(emb_dir, *_current(emb_dir))
    assert line.startswith("Index updated from ") and "flat" in line
    loaded = ann.load(Store.open(emb_dir).version().folder, expect_rows=4000)
    assert loaded.meta["update"]["added"] == 50 and loaded.meta["update"]["removed"] == 50
    searched = EmbeddingIndex.open(emb_dir)
    _, ids = searched.search(x[:50], 20)
    assert set(names(0, 50)).isdisjoint(searched.paths[ids.ravel()])


def _current(emb_dir: Path) -> tuple[str, Manifest]:
    store = Store.open(emb_dir)
    return store.current(), store.manifest()


def test_index_command_is_light_and_names_the_extra(emb, monkeypatch, capsys):
    import inspect

    from devise.cli import build_parser

    flags = {a.dest: a for a in build_parser(command="index")._actions}
    assert set(flags["kind"].choices) == {"auto", *ann.KINDS}
    assert (
        flags["queries"].default == inspect.signature(ann.build_index).parameters["queries"].default
    )
    emb_dir, _ = emb
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)
    assert cli_main(["index", str(emb_dir), "--local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'devise[index]'" in err[0]


@pytest.mark.parametrize("kind", ["ivf-pq", "hnsw"])
def test_a_cold_query_with_an_index_reads_only_the_parts_of_the_rows_it_returns(
    emb, monkeypatch, kind
):
    """Opening with an index reads no part; a search reads the label columns of only the parts
    holding its hits, and answers what the fully loaded index answers."""
    emb_dir, x = emb
    ann.build_index(emb_dir, kind=kind, target_recall=0.9, local=True, queries=200)
    opened: list[str] = []
    real = pq.ParquetFile

    def spy(source, *a, **kw):
        opened.append(str(source))
        return real(source, *a, **kw)

    monkeypatch.setattr(pq, "ParquetFile", spy)
    index = Index.open(emb_dir)
    assert opened == [] and len(index) == 4000
    hits = index.search_vectors(x[[1234]], k=3)[0]
    assert index._base._matrix is None and index._base._paths is None  # nothing read in full
    rows_hit = {int(h["path"].rsplit("/", 1)[1].split(".")[0]) for h in hits}
    parts = {Path(p).name for p in opened}
    assert len(parts) == len({r // 500 for r in rows_hit}) <= 3  # the hits' parts only, of 8
    monkeypatch.setattr(pq, "ParquetFile", real)
    full = Index.open(emb_dir)
    full._base.paths  # noqa: B018 -- load the columns: records come from memory
    assert full.search_vectors(x[[1234]], k=3)[0] == hits
    assert hits[0]["path"] == names(1234, 1235)[0]


def _flip_bytes(path: Path, seed: int, n: int = 64) -> None:
    """Random bit flips in the second half of a file (same size, as a disk or copy error)."""
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    for pos in rng.integers(len(data) // 2, len(data), n):
        data[pos] ^= 1 << int(rng.integers(0, 8))
    path.write_bytes(bytes(data))


def _exact_fallback(emb_dir: Path, x: np.ndarray, caplog, want: str) -> None:
    """Index.open says once why it searches exactly, and its answers are the exact ones."""
    caplog.clear()
    with caplog.at_level("WARNING"):
        index = Index.open(emb_dir)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "Searching exactly" in warnings[0], warnings
    assert want in warnings[0] and "devise index" in warnings[0], warnings
    assert index.info()["search"] == "exact"
    exact = Index.open(emb_dir, exact=True)
    assert index.search_vectors(x[:20], 10) == exact.search_vectors(x[:20], 10)


@pytest.mark.parametrize("kind", ["ivf-pq", "hnsw"])
def test_bit_flips_in_an_index_are_caught_by_its_checksum(emb, caplog, capsys, kind):
    emb_dir, x = emb
    r = ann.build_index(emb_dir, kind=kind, target_recall=0.9, local=True, queries=100)
    files = ann.load(r.folder.parent).meta["files"]
    assert set(files) == ({"index.faiss", "vectors.f32"} if kind == "ivf-pq" else {"index.faiss"})
    _flip_bytes(r.folder / ann.INDEX_FILE, seed=3)
    _exact_fallback(emb_dir, x, caplog, "checksum")
    # The CLI: one warning line, exact results, exit 0.
    caplog.clear()
    code = cli_main(["search", "--embeddings", str(emb_dir), "--json", "--vectors", "x", "q"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "IndexError" not in err
    assert sum("Searching exactly" in r.getMessage() for r in caplog.records) == 1
    assert code == 2 and len(err.strip().splitlines()) == 1  # then only the --vectors error


@pytest.mark.parametrize(
    "meta_text, want",
    [
        ("{garbage", "not JSON"),
        ("", "not JSON"),
        ("{}", "no index description"),
        ("[1, 2]", "no index description"),
        ('{"kind": "flat", "params": {"nprobe": "many"}}', "impossible"),
        ('{"kind": "flat", "params": {"efSearch": -5}}', "impossible"),
        ('{"kind": "bogus"}', "kind"),
        ('{"kind": "flat", "params": {}}', "no checksums"),
    ],
)
def test_unreadable_or_impossible_index_json_means_exact_search(emb, caplog, meta_text, want):
    emb_dir, x = emb
    r = ann.build_index(emb_dir, kind="flat", local=True, queries=50)
    (r.folder / ann.INDEX_META).write_text(meta_text)
    _exact_fallback(emb_dir, x, caplog, want)


def test_impossible_nprobe_and_bad_vectors_file_mean_exact_search(emb, caplog):
    import json

    emb_dir, x = emb
    r = ann.build_index(emb_dir, kind="ivf-pq", target_recall=0.9, local=True, queries=100)
    meta_path = r.folder / ann.INDEX_META
    good = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**good, "params": {**good["params"], "nprobe": 10**6}}))
    _exact_fallback(emb_dir, x, caplog, "impossible")
    # An empty or odd-sized vectors.f32, its checksum record matching (a bad build, not a flip).
    vectors = r.folder / ann.VECTORS_FILE
    data = vectors.read_bytes()
    for body in (b"", data[:-3]):
        vectors.write_bytes(body)
        files = {
            **good["files"],
            "vectors.f32": {"bytes": len(body), "sha256": ann.file_sha256(vectors)},
        }
        meta_path.write_text(json.dumps({**good, "files": files}))
        _exact_fallback(emb_dir, x, caplog, "vectors.f32 holds")


def test_an_index_that_fails_at_search_time_answers_exactly(emb, caplog, monkeypatch):
    emb_dir, x = emb
    ann.build_index(emb_dir, kind="flat", local=True, queries=50)
    index = Index.open(emb_dir)
    assert index.info()["search"].startswith("flat")

    def broken(*a, **kw):
        raise IndexError("index 123456789 is out of bounds")

    monkeypatch.setattr(index._base.ann, "search", broken)
    with caplog.at_level("WARNING"):
        hits = index.search_vectors(x[:5], 3)
    assert hits == Index.open(emb_dir, exact=True).search_vectors(x[:5], 3)
    assert index.info()["search"] == "exact"
    assert sum("Searching exactly" in r.getMessage() for r in caplog.records) == 1


def test_an_index_build_holds_the_writer_lock_against_embeds_and_other_builds(emb, capsys):
    """A build takes EMB_DIR's lock as an embedding run does: while it runs, a second build and
    a writer of versions each get one LockHeldError line naming it, and nothing is written; a
    build started while an embedding run holds the lock gets one line too, or waits for it with
    --wait-lock."""
    from devise.store import LockHeldError

    emb_dir, x = emb
    before = Store.open(emb_dir).versions()
    seen: list[str] = []

    def while_building() -> None:
        with pytest.raises(LockHeldError) as second:
            ann.build_index(emb_dir, kind="flat", local=True, queries=20)
        with pytest.raises(LockHeldError) as writer:
            write_version(emb_dir, rows(names(0, 10)), x[:10], model_id="m1")
        seen.extend([str(second.value), str(writer.value)])

    r = ann.build_index(emb_dir, kind="flat", local=True, queries=20, _after_shards=while_building)
    assert r.rows == 4000 and ann.load(r.folder.parent) is not None
    for line in seen:
        assert "\n" not in line and line.startswith("Another run (devise index, pid ")
        assert "--wait-lock SECONDS" in line
    assert Store.open(emb_dir).versions() == before  # the refused writer committed nothing
    assert not (emb_dir / "LOCK").exists()  # released after the build

    # An embedding run holds the lock: `devise index` exits 75 with one line naming it.
    embed_lock = Store.open(emb_dir).lock()
    with embed_lock:
        assert cli_main(["index", str(emb_dir), "--kind", "flat", "--local"]) == 75
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Another run (devise embed, pid " in err[0], err
        # --wait-lock: the build waits for the run to finish, then takes the lock.
        threading.Timer(1.0, embed_lock.release).start()
        argv = ["index", str(emb_dir), "--kind", "flat", "--local", "--wait-lock", "30"]
        assert cli_main(argv) == 0
    assert "Indexed 4000 rows" in capsys.readouterr().out
