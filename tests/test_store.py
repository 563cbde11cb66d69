"""The embeddings store keeps good data: runs whose inputs failed commit nothing, garbage
collection keeps the last version with rows, damaged versions are found, skipped and repaired,
version names cannot leave the store, and bad paths are one line. In-process (--local) runs on
a 12-image tree; no Ray."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from devise import cli
from devise.model import DeviseHead, HeadSpec, save_model
from devise.search import EmbeddingIndex
from devise.store import (
    CURRENT_FILE,
    DAMAGED_DIR,
    LOCK_FILE,
    STAGING_DIR,
    VERSIONS_DIR,
    DamagedVersionError,
    Store,
    read_manifest,
    read_version,
)

CLASSES = ["cat", "dog", "car", "ship"]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    from conftest import make_image, write_vec

    monkeypatch.setenv("DEVISE_HOME", str(tmp_path / "home"))
    vec = tmp_path / "tiny.vec"
    write_vec(vec, [*CLASSES, "the"], dim=8, seed=1)
    rows = []
    for c, name in enumerate(CLASSES):
        for i in range(3):
            p = make_image(tmp_path / "images" / name / f"img_{i}.png", 10 * c + i)
            rows.append({"path": str(p), "label": name, "class_name": name, "split": "test"})
    catalog = tmp_path / "catalog.parquet"
    pd.DataFrame(rows).to_parquet(catalog)
    torch.manual_seed(0)
    spec = HeadSpec(in_dim=64, out_dim=8, backbone="tiny", image_size=32, vectors=str(vec))
    model = save_model(tmp_path / "model", DeviseHead(spec).eval())
    return {"tmp": tmp_path, "model": model, "catalog": catalog, "rows": rows}


def _embed_cli(setup, out, *flags, catalog=None) -> int:
    args = ["--model", str(setup["model"]), "--catalog", str(catalog or setup["catalog"])]
    return cli.main(["embed", *args, "--out", str(out), "--local", "--batch-size", "4", *flags])


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_runs_whose_inputs_all_failed_never_replace_or_collect_a_good_version(setup, capsys):
    """Three scheduled runs against an unmounted volume (every path missing) with the default
    --keep-versions 3: each exits non-zero, commits nothing, and the good version stays."""
    out = setup["tmp"] / "emb"
    assert _embed_cli(setup, out) == 0
    good = (out / CURRENT_FILE).read_text().strip()
    capsys.readouterr()
    gone = pd.DataFrame(setup["rows"]).assign(path=lambda d: "/mnt/unmounted" + d["path"])
    bad_catalog = setup["tmp"] / "gone.parquet"
    gone.to_parquet(bad_catalog)
    for _ in range(3):
        assert _embed_cli(setup, out, catalog=bad_catalog) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith("devise embed: error: 12 of 12 inputs failed (12 missing, e.g. ")
        assert f"nothing was committed and {good} stays current" in line
    assert Store.open(out).versions() == [good]
    assert (out / CURRENT_FILE).read_text().strip() == good
    assert len(EmbeddingIndex.open(out)) == 12
    assert not (out / LOCK_FILE).exists()
    # A catalog whose path column holds ints is the same case, not a crash.
    pd.DataFrame({"path": range(12), "label": "cat", "split": "test"}).to_parquet(bad_catalog)
    assert _embed_cli(setup, out, catalog=bad_catalog) == 2
    assert "12 of 12 inputs failed" in capsys.readouterr().err


def test_the_error_share_threshold_is_a_flag(setup, capsys):
    out = setup["tmp"] / "emb"
    rows = pd.DataFrame(setup["rows"])
    rows.loc[:6, "path"] = [f"/missing/{i}.png" for i in range(7)]  # 7 of 12 missing
    half = setup["tmp"] / "half.parquet"
    rows.to_parquet(half)
    assert _embed_cli(setup, out, catalog=half) == 2
    assert "7 of 12 inputs failed" in capsys.readouterr().err
    assert Store.open(out).versions() == []
    assert _embed_cli(setup, out, "--max-error-fraction", "0.6", catalog=half) == 0
    assert read_manifest(out).errors == 7 and read_manifest(out).rows == 5


def test_garbage_collection_keeps_the_newest_version_with_rows(tmp_path):
    store = Store.open(tmp_path / "emb", create=True)
    rows = pd.DataFrame({"path": ["/x/a.png", "/x/b.png"]})
    good = store.write_version(rows, np.eye(2, 8), model_id="m", keep_versions=2)
    for _ in range(3):  # versions with no rows at all (every input an error)
        store.write_version(
            rows, np.eye(2, 8), model_id="m", reasons=["bad", "bad"], keep_versions=2
        )
    names = store.versions()
    assert good in names and len(names) == 3  # the two newest plus the last one with rows
    assert len(read_version(store.root, good)[1]) == 2


def test_incremental_refuses_when_every_old_path_vanished(setup, capsys, tmp_path):
    """--incremental against a catalog of other, existing files (a wrong mount or catalog) would
    list every embedded image as removed: refused unless the threshold says otherwise."""
    from conftest import make_image

    out = setup["tmp"] / "emb"
    assert _embed_cli(setup, out) == 0
    other = [make_image(tmp_path / "other" / f"o_{i}.png", 500 + i) for i in range(3)]
    cat = tmp_path / "other.parquet"
    pd.DataFrame({"path": [str(p) for p in other], "label": "cat", "split": "test"}).to_parquet(cat)
    capsys.readouterr()
    assert _embed_cli(setup, out, "--incremental", catalog=cat) == 2
    line = _one_line(capsys.readouterr().err)
    assert "12 of the 12 paths of" in line and "nothing was committed" in line
    assert len(Store.open(out).versions()) == 1
    assert _embed_cli(setup, out, "--incremental", "--max-error-fraction", "1", catalog=cat) == 0
    assert read_manifest(out).removed == 12 and read_manifest(out).rows == 3


def _truncate_a_part(out: Path) -> Path:
    manifest = read_manifest(out)
    part = out / VERSIONS_DIR / manifest.version / manifest.parts[0].file
    data = part.read_bytes()
    part.unlink()  # a hard link may share the inode with another version: damage only this one
    part.write_bytes(data[: len(data) // 2])
    return part


def test_a_truncated_part_is_reported_skipped_and_repaired(setup, capsys, caplog):
    out = setup["tmp"] / "emb"
    assert _embed_cli(setup, out, "--chunk-rows", "4") == 0
    first = read_manifest(out).version
    assert _embed_cli(setup, out, "--chunk-rows", "4") == 0  # a full run: a second version
    second = read_manifest(out).version
    part = _truncate_a_part(out)
    capsys.readouterr()
    # Readers: the damaged version is named in one line; the default falls back to the older.
    with pytest.raises(DamagedVersionError, match=f"Version {second} of .* is damaged: .*"):
        read_version(out, second)
    with caplog.at_level(logging.WARNING, logger="devise.store"):
        index = EmbeddingIndex.open(out)
    assert index.version == first and len(index) == 12
    warning = caplog.records[-1].getMessage()
    assert str(part) in warning and f"using version {first}" in warning
    rc = cli.main(["search", "cat", "--embeddings", str(out), "--version", second])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and str(part) in line and "damaged" in line
    # A full re-embed works whatever the old versions look like.
    assert _embed_cli(setup, out, "--chunk-rows", "4") == 0
    third = read_manifest(out).version
    assert len(EmbeddingIndex.open(out)) == 12
    # --repair: the damaged version is moved aside, and only its lost rows are embedded again.
    _truncate_a_part(out)
    capsys.readouterr()
    assert _embed_cli(setup, out, "--repair", "--chunk-rows", "4") == 0
    stdout = capsys.readouterr().out
    assert "4 embedded, 0 resumed, 8 unchanged" in stdout
    assert f"Repaired: moved {second}, {third} to {out / DAMAGED_DIR}" in stdout
    assert set(Store.open(out).versions()) == {first, read_manifest(out).version}
    moved = sorted(d.name[: len(second)] for d in (out / DAMAGED_DIR).iterdir())
    assert moved == [second, third]
    assert Store.open(out).damaged() == {}
    assert len(EmbeddingIndex.open(out)) == 12


def test_a_corrupt_manifest_and_a_flipped_byte_are_found(setup):
    out = setup["tmp"] / "emb"
    assert _embed_cli(setup, out) == 0
    store = Store.open(out)
    name = store.current()
    manifest = read_manifest(out)
    part = out / VERSIONS_DIR / name / manifest.parts[0].file
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size, same footer: only the checksum can tell
    part.unlink()
    part.write_bytes(bytes(data))
    assert list(store.damaged()) == [name]
    with pytest.raises(DamagedVersionError, match="does not match its checksum"):
        read_version(out, name)
    (out / VERSIONS_DIR / name / "manifest.json").write_text("{not json")
    with pytest.raises(DamagedVersionError, match="manifest.json is not a valid manifest"):
        store.verify(name)


def test_current_and_version_accept_only_a_version_of_the_store(setup, tmp_path, capsys, caplog):
    out = setup["tmp"] / "emb"
    assert _embed_cli(setup, out) == 0
    name = read_manifest(out).version
    other = tmp_path / "other"
    Store.open(other, create=True).write_version(
        pd.DataFrame({"path": ["/elsewhere.png"]}), np.eye(1, 8), model_id="x"
    )
    (out / VERSIONS_DIR / "evil").symlink_to(other / VERSIONS_DIR)
    for text in [b"../../other/versions/000001-x\n", b"\x89PNG\x00\xff\xfe", b"evil/000001-x"]:
        (out / CURRENT_FILE).write_bytes(text)
        with caplog.at_level(logging.WARNING, logger="devise.store"):
            index = EmbeddingIndex.open(out)
        assert index.version == name and "/elsewhere.png" not in index.paths
        assert str(out / CURRENT_FILE) in caplog.records[-1].getMessage()
    capsys.readouterr()
    rc = cli.main(["search", "cat", "--embeddings", str(out), "--version", "../../other/x"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "'../../other/x' is not a version of" in line


def test_bad_paths_are_one_line_and_leave_outputs_intact(setup, tmp_path, capsys):
    out = setup["tmp"] / "emb"
    assert _embed_cli(setup, out) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    not_parquet = tmp_path / "catalog.csv"
    not_parquet.write_text("path,label\n/x.png,cat\n")
    model = ["--model", str(setup["model"])]
    cases = [
        (["embed", *model, "--catalog", str(not_parquet), "--out", str(out), "--local"],
         "is not a readable parquet file"),
        (["embed", *model, "--catalog", str(setup["catalog"]), "--out", str(not_parquet),
          "--local"], "is a file, not an embeddings folder"),
        (["search", "cat", "--embeddings", str(not_parquet)], "is a file, not an embeddings folder"),
        (["catalog", str(setup["tmp"] / "images"), "--out", str(out)], "is a folder"),
    ]  # fmt: skip
    for argv, text in cases:
        rc = cli.main(argv)
        line = _one_line(capsys.readouterr().err)
        assert rc == 2 and text in line, (argv, line)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert not_parquet.read_text() == "path,label\n/x.png,cat\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only modes")
def test_a_read_only_out_is_one_line(setup, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert _embed_cli(setup, ro / "emb") == 2
        assert "Cannot create the embeddings folder" in _one_line(capsys.readouterr().err)
    finally:
        ro.chmod(0o755)


def test_verify_content_finds_a_same_size_overwrite_with_its_mtime_put_back(setup, capsys):
    out = setup["tmp"] / "emb"
    assert _embed_cli(setup, out, "--verify", "content") == 0
    target = Path(setup["rows"][0]["path"])
    donor = Path(setup["rows"][4]["path"]).read_bytes()
    st = target.stat()
    with open(target, "r+b") as f:  # other pixels, same size
        f.write(donor[: st.st_size].ljust(st.st_size, b"\0"))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert _embed_cli(setup, out, "--incremental") == 0
    assert "0 embedded, 0 resumed, 12 unchanged" in capsys.readouterr().out  # stat cannot tell
    assert _embed_cli(setup, out, "--incremental", "--verify", "content") == 0
    assert "1 embedded, 0 resumed, 11 unchanged" in capsys.readouterr().out


def test_staging_writer_leaves_no_half_chunk(tmp_path):
    """A flush interrupted between its two files leaves neither: the rerun's chunk list is
    exactly the finished chunks."""
    from devise.store import embedding_schema

    store = Store.open(tmp_path / "emb", create=True)
    folder = store.staging("m")
    todo = pd.DataFrame(
        {"path": ["/a", "/b"], "label": None, "class_name": None, "size_bytes": 1, "mtime_ns": 1}
    )
    w = store.writer(folder, todo, embedding_schema(8), "m", chunk_rows=10)
    w.add({"row": np.arange(2), "embedding": np.eye(2, 8), "error": np.array(["", ""])})
    w.schema = None  # writing the part file now fails, after errors-00000 was written
    with pytest.raises(AttributeError):
        w.flush()
    assert sorted(p.name for p in folder.iterdir()) == []
    assert STAGING_DIR in str(folder)


def test_manifest_records_sizes_and_checksums(setup):
    out = setup["tmp"] / "emb"
    assert _embed_cli(setup, out) == 0
    manifest = json.loads(
        (out / VERSIONS_DIR / read_manifest(out).version / "manifest.json").read_text()
    )
    for p in manifest["parts"]:
        data = (out / VERSIONS_DIR / manifest["version"] / p["file"]).read_bytes()
        assert p["bytes"] == len(data) and p["crc32"] > 0


SLOW_EMBED = """
import sys, time
import devise.pipeline as pipeline
decode = pipeline.decode_batch
def slow(*args, **kw):
    time.sleep(0.3)  # a slow volume: the run is still going when the signal comes
    return decode(*args, **kw)
pipeline.decode_batch = slow
from devise.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("signum", "code", "word"), [(15, 143, "terminated"), (2, 130, "interrupted")]
)
def test_a_signal_during_embed_stops_cleanly_and_the_rerun_resumes(
    setup, tmp_path, capsys, signum, code, word
):
    """SIGTERM (a scheduler, a pod eviction) or Ctrl-C in the middle of a real `devise embed`
    process: it exits within seconds with one line, no lock and no half-written files, keeps the
    finished chunks, and the same command afterwards resumes from them."""
    import subprocess
    import sys
    import time

    from conftest import make_image

    rows = [
        {
            "path": str(make_image(tmp_path / "many" / f"{i}.png", i)),
            "label": "cat",
            "split": "test",
        }
        for i in range(80)
    ]
    catalog = tmp_path / "many.parquet"
    pd.DataFrame(rows).to_parquet(catalog)
    out = tmp_path / "emb"
    argv = ["embed", "--model", str(setup["model"]), "--catalog", str(catalog), "--out", str(out),
            "--local", "--batch-size", "4", "--chunk-rows", "8"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_EMBED, *argv], env=env, stderr=subprocess.PIPE, text=True
    )
    staging = out / STAGING_DIR
    deadline = time.monotonic() + 120
    while not list(staging.glob("*/part-*.parquet")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no chunk was staged"
        time.sleep(0.05)
    proc.send_signal(signum)
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert time.monotonic() - t0 < 10 and proc.returncode == code
    assert "Traceback" not in err  # the run's own progress lines come first, then one line
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"devise embed: {word}; nothing was committed") and "resume" in line
    assert not (out / LOCK_FILE).exists() and Store.open(out).versions() == []
    left = sorted(p.name for p in staging.rglob("*") if p.is_file())
    parts = [n for n in left if n.startswith("part-")]
    assert parts and left == sorted(parts + [n.replace("part-", "errors-") for n in parts])
    capsys.readouterr()
    assert _embed_cli(setup, out, "--chunk-rows", "8", catalog=catalog) == 0
    done = 8 * len(parts)
    assert f"80 images embedded, 0 errors (this run: {80 - done} embedded, {done} resumed" in (
        capsys.readouterr().out
    )


def test_a_store_written_before_the_typed_manifest_opens_and_reads(tmp_path):
    """tests/data/store-v1 was written by the store code before Manifest existed (two embed
    runs, the second incremental, then one write_version): every version verifies, its manifest
    reads into typed fields, and writing it back gives the same bytes as on disk."""
    from devise.store import Manifest

    emb = tmp_path / "emb"
    shutil.copytree(Path(__file__).parent / "data" / "store-v1" / "emb", emb)
    store = Store.open(emb)
    names = store.versions()
    assert names == ["000001-3f9ee23060656d32", "000002-3f9ee23060656d32", "000003-direct"]
    assert store.current() == "000003-direct"
    for name in names:
        manifest = store.verify(name, content=True)  # sizes, row counts and CRC-32 of every part
        on_disk = (emb / VERSIONS_DIR / name / "manifest.json").read_text(encoding="utf-8")
        assert manifest.to_json() == on_disk
        assert Manifest.from_dict(json.loads(on_disk)) == manifest
    second = store.manifest("000002-3f9ee23060656d32")
    assert (second.rows, second.errors, second.embedded, second.reused) == (7, 0, 1, 6)
    assert second.base_version == "000001-3f9ee23060656d32" and second.content_hashes == 7
    assert second.model_dir == "/tmp/wta/fix/model" and second.details["backbone"] == "tiny"
    assert [p.rows for p in second.parts] == [3, 3, 1] and second.dim == 8
    third, table = store.read()
    assert third.version == "000003-direct" and third.model_dir is None
    assert (third.rows, third.errors, third.vectors, third.vectors_id) == (2, 1, "words.vec", "abc")
    assert table.column("path").to_pylist() == ["/data/a.jpg", "/data/b.jpg"]
    assert store.errors().loc[0, "reason"] == "cannot decode"
    index = EmbeddingIndex.open(emb)
    assert index.version == "000003-direct" and len(index) == 2 and index.dim == 4
