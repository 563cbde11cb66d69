"""Outputs only where they belong: export, montage, catalog and evaluate refuse devices, FIFOs,
sockets, folders where a file is expected, paths under a file and paths inside an embeddings
store, each with one line and exit code 2, and nothing is overwritten or created."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from devise.cli import main as cli_main
from devise.fsutil import OutputPathError, atomic_path, check_output_dir, check_output_file
from devise.store import Store


@pytest.fixture
def emb(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = pd.DataFrame({"path": [f"/img/c{i % 2}/{i}.jpg" for i in range(20)]})
    Store.open(tmp_path / "emb", create=True).write_version(rows, x, model_id="m1")
    return tmp_path / "emb"


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, code: int, want: str) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert want in err and "Traceback" not in err, err


def test_export_refuses_a_fifo_a_socket_and_a_folder_and_leaves_them(emb, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    _one_line_error(capsys, cli_main(["export", str(emb), "--to", str(fifo)]), "a FIFO")
    assert fifo.is_fifo()
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        _one_line_error(capsys, cli_main(["export", str(emb), "--to", str(sock_path)]), "socket")
        assert sock_path.is_socket()
    folder = tmp_path / "dir"
    folder.mkdir()
    _one_line_error(capsys, cli_main(["export", str(emb), "--to", str(folder)]), "is a folder")
    assert folder.is_dir() and not list(folder.iterdir())


def test_export_refuses_a_character_device(emb, capsys):
    # /dev/null exists on every test machine; as root a rename would replace the device.
    code = cli_main(["export", str(emb), "--to", "/dev/null"])
    _one_line_error(capsys, code, "a device")
    assert Path("/dev/null").is_char_device()


def test_export_never_writes_inside_an_embeddings_store(emb, capsys):
    before = _snapshot(emb)
    version = Store.open(emb).current()
    part = next((emb / "versions" / version).glob("part-*.parquet"))
    for target in (part, emb / "CURRENT", emb / "versions" / version / "new.parquet"):
        code = cli_main(["export", str(emb), "--to", str(target)])
        _one_line_error(capsys, code, "inside the embeddings folder")
    assert _snapshot(emb) == before
    assert len(Store.open(emb).read()[1]) == 20  # the version still reads


def test_export_under_a_file_is_one_line(emb, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code = cli_main(["export", str(emb), "--to", str(tmp_path / "afile" / "out.parquet")])
    _one_line_error(capsys, code, "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"


def test_export_over_a_regular_file_replaces_it(emb, tmp_path):
    out = tmp_path / "out.parquet"
    out.write_text("old")
    assert cli_main(["export", str(emb), "--to", str(out)]) == 0
    import pyarrow.parquet as pq

    t = pq.read_table(out)
    assert t.num_rows == 20 and t.schema.field("id").type == "string"
    assert all(len(i) == 16 for i in t.column("id").to_pylist())


def test_atomic_path_refuses_to_rename_over_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputPathError, match="FIFO"), atomic_path(fifo) as tmp:
        tmp.write_text("x")
    assert fifo.is_fifo() and [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_check_output_file_names_the_suffixes_and_check_output_dir_refuses_files(tmp_path, emb):
    with pytest.raises(OutputPathError, match=r"must end with \.png"):
        check_output_file(tmp_path / "montage", "--montage", (".png",))
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f", "--out")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f" / "sub", "--out")
    with pytest.raises(OutputPathError, match="inside the embeddings folder"):
        check_output_dir(emb / "report", "--out")
    assert check_output_dir(tmp_path / "new" / "report", "--out") == tmp_path / "new" / "report"
    # The store a command owns is allowed.
    assert check_output_file(emb / "x.json", "--x", owned=emb) == emb / "x.json"


def test_catalog_out_inside_a_store_is_refused(emb, tmp_path, capsys):
    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    before = _snapshot(emb)
    code = cli_main(["catalog", str(tmp_path / "images"), "--out", str(emb / "CURRENT")])
    _one_line_error(capsys, code, "inside the embeddings folder")
    assert _snapshot(emb) == before
