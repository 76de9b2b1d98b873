"""fastcur._atomic: the one atomic-write helper every saver uses (adapters, LaLoRA, IMSM gate,
continual results and state)."""
import os
import stat

import pytest

from fastcur._atomic import atomic_write, atomic_write_text


def test_writes_with_plain_open_permissions_and_creates_the_folder(tmp_path):
    path = tmp_path / "sub" / "results.json"
    atomic_write_text(path, "{}")
    assert path.read_text() == "{}"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask   # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    path.write_text("old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, write)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
