"""`zoo gc`: free the blobs no registry entry names, safe against a concurrent add.

An add stores its blobs first and registers them last, so for a moment a blob is in the store that nothing
names yet. Adds therefore hold a shared lock on `<store>/.gc.lock` from their first blob to their commit, and gc
holds it exclusively while it reads which blobs are named and deletes the rest: it never sees an add half-way.
(Belt and braces: a blob written after gc started is never deleted.) The lock is an `flock`, dropped by the
kernel when its holder dies.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from zoo.locks import wait_for
from zoo.store import Store, fsync_dir

_adding = {"depth": 0, "fd": -1}  # this process's shared hold (adds nest: compose → register_folder → register)


def _lock(store: Store) -> int:
    store.root.mkdir(parents=True, exist_ok=True)
    return os.open(store.root / ".gc.lock", os.O_RDWR | os.O_CREAT, 0o644)


def _flock(fd: int, mode: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


@contextmanager
def adding(store: Store) -> Iterator[None]:
    """Held by an add from its first blob to its commit: gc waits for it (and it for a running gc)."""
    if _adding["depth"] == 0:
        fd = _lock(store)
        try:
            wait_for(lambda s: _flock(fd, fcntl.LOCK_SH, s), f"`zoo gc` on the store {store.root}")
        except BaseException:
            os.close(fd)
            raise
        _adding["fd"] = fd
    _adding["depth"] += 1
    try:
        yield
    finally:
        _adding["depth"] -= 1
        if _adding["depth"] == 0:
            os.close(_adding["fd"])  # closing drops the lock


@dataclass
class Garbage:
    """A blob nothing names: its sha256, its size, and whether it was deleted."""

    sha256: str
    size: int
    deleted: bool


def collect_garbage(named: Callable[[], set[str]], store: Store, *, delete: bool) -> list[Garbage]:
    """The blobs of `store` nothing names, deleted when `delete` (else a dry run).

    Holds the store's gc lock exclusively, so no add is between its first blob and its commit; then asks
    `named()` (the registry's `blob_hashes`) which blobs are in use. Blobs written after gc started are kept
    whatever happens; temp files (`.incoming-*`) belong to writers and are left alone."""
    start = time.time()
    fd = _lock(store)
    try:
        wait_for(lambda s: _flock(fd, fcntl.LOCK_EX, s), f"the adds in progress on the store {store.root}")
        keep = named()
        found = []
        for path in sorted(store.blobs.iterdir()) if store.blobs.is_dir() else []:
            if path.name.startswith(".") or path.name in keep:
                continue
            st = path.lstat()
            if st.st_mtime > start:
                continue
            found.append(Garbage(path.name, st.st_size, False))
            if delete:
                path.unlink()
                found[-1].deleted = True
        if delete and found:
            fsync_dir(store.blobs)
        return found
    finally:
        os.close(fd)
