import os
import stat

import pytest

from devise.fsutil import atomic_path


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
