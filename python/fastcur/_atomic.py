"""Atomic file writes: a crash never leaves a half-written file where a complete one was."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """`write(tmp)` fills a temporary file in `path`'s folder (created if missing), which is then
    fsynced and renamed onto `path` (os.replace); on any error the temporary file is removed
    and `path` is left as it was. The file gets the permissions a plain `open(path, "w")` would
    (mkstemp's are 0600), and the rename is made durable by syncing the folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:                                   # make the rename itself durable (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write)


# -- whole folders ------------------------------------------------------------------------------
# A save of several files (an adapter's tensors and config, IMSM's gate beside them, a PEFT
# export) is written into a fresh sibling folder and switched into place with one rename, so
# that a crash at any instant leaves either the old folder or the new one, never a mix.
_STAGING = ".fastcur-staging"


def _staging_prefix(base: str) -> str:
    return f".{base}{_STAGING}-"


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(parent: str, base: str) -> None:
    """Remove staging folders of `base` left by writers on this host that no longer run (a save
    killed with kill -9 leaves its staging folder, or the old version it had switched out)."""
    prefix = _staging_prefix(base)
    host = _host()
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        pid, _, rest = name[len(prefix):].partition("-")
        if not pid.isdigit() or not rest.startswith(host + "-"):
            continue                        # another host's writer (a shared file system): not ours to judge
        if int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _fsync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: str, b: str) -> bool:
    """Swap the folders at paths `a` and `b` in one atomic step (Linux renameat2 with
    RENAME_EXCHANGE); False where the system or file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


@contextlib.contextmanager
def atomic_folder(directory: str | os.PathLike, *, replaces: Iterable[str] = ()) -> Iterator[str]:
    """`with atomic_folder(d, replaces=names) as staging:` write the new files into `staging`
    (a fresh empty folder beside `d`); on a normal exit the staging folder becomes `d` in one
    rename, so a reader (or a crash at any instant) sees either the old folder or the new one.

    Files of the old `d` that the writer did not write and that are not in `replaces` (names
    of the old version to drop) are carried over as hard links (copies where links fail), so
    a save into a folder holding other files (a Trainer checkpoint) keeps them. On an error
    inside the block the staging folder is removed and `d` is left as it was. Staging folders
    left by a writer killed on this host are removed by the next `atomic_folder` on `d`.

    The switch is Linux's atomic exchange (renameat2 RENAME_EXCHANGE) where `d` exists, a
    plain rename where it does not; elsewhere the old folder is first renamed aside (a crash
    between the two renames leaves `d` missing and the old version in the staging folder).
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.islink(directory):
        directory = os.path.realpath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory!r} exists and is not a folder")
    cwd = os.getcwd()
    if cwd == directory or cwd.startswith(directory + os.sep):
        raise ValueError(f"{directory!r} is (or holds) the current working directory, which a folder switch "
                         f"would move away; save into a subfolder")
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    _sweep_stale(parent, base)
    staging = tempfile.mkdtemp(dir=parent, prefix=f"{_staging_prefix(base)}{os.getpid()}-{_host()}-")
    try:
        yield staging
        written = set(os.listdir(staging))
        skip = written | set(replaces)
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                if name in skip:
                    continue
                src, dst = os.path.join(directory, name), os.path.join(staging, name)
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
                elif os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                else:
                    _link_or_copy(src, dst)
        for name in written:
            path = os.path.join(staging, name)
            if os.path.isfile(path):
                _fsync_path(path)
        mode = (os.stat(directory).st_mode & 0o7777) if os.path.isdir(directory) else (0o777 & ~_umask())
        os.chmod(staging, mode)
        _fsync_path(staging)
        if not os.path.isdir(directory):
            os.rename(staging, directory)
        elif not _exchange(staging, directory):
            aside = staging + "-old"
            os.rename(directory, aside)
            os.rename(staging, directory)
            staging = aside
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)    # after the switch: the old version
