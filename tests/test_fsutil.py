import os
import stat

import pytest

from devise.fsutil import atomic_dir, atomic_path, printable


def test_atomic_path_replaces_whole_file_with_normal_mode(tmp_path):
    target = tmp_path / "out" / "data.json"
    mask = os.umask(0o022)
    try:
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.startswith(".data.json.")
            tmp.write_text("new")
            assert not target.exists()  # nothing visible until the block ends
    finally:
        os.umask(mask)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["data.json"]


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "data.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "version"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "part.parquet").write_text("half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "part.parquet").write_text("whole")
        assert not target.exists()
    assert (target / "part.parquet").read_text() == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["version"]


def test_printable_escapes_control_characters_and_bytes_that_are_not_utf8():
    assert printable("a\nb\tc\x1b[31m") == "a\\nb\\tc\\x1b[31m"
    assert printable(os.fsdecode(b"caf\xe9.png")) == "caf\\xe9.png"
    assert printable("café.png") == "café.png"
