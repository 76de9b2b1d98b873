"""fastcur._atomic: the atomic-write helpers every saver uses (adapters, LaLoRA, IMSM gate,
continual results and state): one file (`atomic_write`) or a whole folder (`atomic_folder`)."""
import os
import stat
import subprocess
import sys

import pytest

from fastcur._atomic import _STAGING, _host, atomic_folder, atomic_write, atomic_write_text


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


# -- atomic_folder ----------------------------------------------------------------------------
def _write(folder, name, text):
    with open(os.path.join(folder, name), "w") as f:
        f.write(text)


def test_atomic_folder_creates_replaces_and_carries_other_files(tmp_path):
    target = tmp_path / "adapter"
    with atomic_folder(target) as staging:
        _write(staging, "a.json", "v1")
        _write(staging, "old.bin", "v1")
    assert sorted(os.listdir(target)) == ["a.json", "old.bin"]
    (target / "optimizer.pt").write_text("keep me")
    (target / "sub").mkdir()
    (target / "sub" / "x").write_text("nested")
    with atomic_folder(target, replaces=["old.bin"]) as staging:
        assert os.path.dirname(staging) == str(tmp_path) and os.listdir(staging) == []
        _write(staging, "a.json", "v2")
    assert sorted(os.listdir(target)) == ["a.json", "optimizer.pt", "sub"]
    assert (target / "a.json").read_text() == "v2"
    assert (target / "optimizer.pt").read_text() == "keep me" and (target / "sub" / "x").read_text() == "nested"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]          # no staging folder left
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask  # not mkdtemp's 0700


def test_atomic_folder_error_leaves_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "a.json").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(target) as staging:
            _write(staging, "a.json", "half")
            raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["adapter"] and (target / "a.json").read_text() == "old"


def test_atomic_folder_sweeps_staging_left_by_a_dead_writer(tmp_path):
    target = tmp_path / "adapter"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    stale = tmp_path / f".adapter{_STAGING}-{dead}-{_host()}-abc"
    stale.mkdir()
    (stale / "half.safetensors").write_text("x")
    elsewhere = tmp_path / f".adapter{_STAGING}-{dead}-otherhost-abc"   # another machine's: left alone
    elsewhere.mkdir()
    with atomic_folder(target) as staging:
        _write(staging, "a.json", "new")
    assert sorted(os.listdir(tmp_path)) == sorted(["adapter", elsewhere.name])


def test_atomic_folder_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        with atomic_folder(tmp_path / "f"):
            pass


def test_atomic_folder_refuses_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for target in (".", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(ValueError, match="current working directory.*subfolder"):
            with atomic_folder(target):
                pass
    with atomic_folder("sub") as staging:
        _write(staging, "a.json", "x")
    assert os.listdir(tmp_path / "sub") == ["a.json"]
