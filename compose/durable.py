"""Durable writes, shared by the streaming merge and the zoo's store: fsync, and temp folders that a killed
writer leaves behind and a later run removes safely.

A temp folder is held by its writer through an `flock` on the `.lock` file inside it, which the kernel drops
when the writer dies however it dies (SIGKILL included). `sweep` removes the folders whose lock it can take
— their writers are gone — and never one whose writer is alive. A folder whose lock file is absent (its
writer is between creating the folder and the lock, or has just let the lock go before renaming the folder
into place) is left alone until it is an hour old. Torch-free and zoo-free, so both layers can use it.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"
UNLOCKED_GRACE_S = 3600  # a folder with no lock file is a writer's leftover once this old


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Make a file's bytes durable (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HeldTempDir:
    """A temp folder and the lock on it (see the module docstring); `release()` lets the lock go early."""

    def __init__(self, path: Path, lock_fd: int):
        self.path, self._fd = path, lock_fd

    def release(self) -> None:
        """Drop the lock file and the lock (before the folder is renamed into place: the lock file must not
        travel with it)."""
        if self._fd is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


@contextmanager
def held_temp_dir(parent: Path, prefix: str, *, private: bool = True) -> Iterator[HeldTempDir]:
    """A new folder `parent/<prefix>XXXX`, locked for this process until the block ends, then removed if it
    is still there (a caller that renamed it into place calls `release()` first). `private`: only this user
    may open it (mkdtemp's 0700); else the umask decides, as for any new folder (one renamed into place for
    people to use, such as a merged checkpoint)."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent)) if private else new_dir(parent, prefix)
        try:
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except (FileNotFoundError, FileExistsError):  # a sweeper took the new folder for a leftover: take another
            continue
        except BaseException:  # out of inodes, say: no empty folder left behind
            shutil.rmtree(path, ignore_errors=True)
            raise
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a sweeper that got in first deletes it
        if _same_file(path / LOCK_NAME, fd):
            break
        os.close(fd)
    held = HeldTempDir(path, fd)
    try:
        yield held
    finally:
        if held._fd is not None:
            shutil.rmtree(path, ignore_errors=True)
            os.close(held._fd)


def new_dir(parent: Path, prefix: str) -> Path:
    """`parent/<prefix><random>`, made by mkdir (which fails rather than reuse a name) with the umask's mode."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def sweep(parent: Path, prefix: str) -> list[Path]:
    """Remove the folders `parent/<prefix>*` that no live writer holds; returns what was removed."""
    removed = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(prefix)]
    except FileNotFoundError:
        return removed
    for entry in entries:
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if _older_than(path, UNLOCKED_GRACE_S):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer holds it (or the file system has no locks: never guess)
            os.close(fd)
            continue
        try:
            if _same_file(path / LOCK_NAME, fd):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        finally:
            os.close(fd)
    return removed


def _same_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (not removed or replaced meanwhile)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - os.lstat(path).st_mtime > seconds
    except FileNotFoundError:
        return False
