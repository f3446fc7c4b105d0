"""`zoo gc`: free the blobs no registry entry names, safe against a concurrent add.

An add stores its blobs first and registers them last, so for a moment a blob is in the store that nothing
names yet. Adds therefore hold a shared lock on `<store>/.gc.lock` from their first blob to their commit, and gc
holds it exclusively while it reads which blobs are named and deletes the rest: it never sees an add half-way.
(Belt and braces: a blob written after gc started is never deleted.) The lock is an `flock`, dropped by the
kernel when its holder dies.

Several registries may name blobs of one store (a JSON catalogue beside the default SQLite file, a team's
PostgreSQL database on a shared store): every registry that writes to a store is recorded in its `registries`
file (one JSON line each: where it is and, for a file, on which machine), and gc keeps what ANY of them names.
It refuses, deleting nothing, when one of them cannot be read here, or when the registry it was given is not
among them (a typo'd --registry would otherwise count as an empty registry and free everything).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from zoo.errors import ZooError
from zoo.locks import wait_for
from zoo.store import Store, fsync_dir

REGISTRIES = "registries"  # in the store's root: every registry that ever wrote to the store
_remembered: set[tuple[str, str]] = set()  # (store root, registry record) known to be in the file: one check per process

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


def registry_record(identity: str, is_file: bool) -> str:
    """The `registries` line for a registry: its identity (see `RegistryBackend.identity`), and this machine's
    name when it is a file (another machine's file of the same path is another registry)."""
    return json.dumps({"registry": identity, "host": socket.gethostname() if is_file else None}, sort_keys=True)


def remember_registry(store: Store, record: str) -> None:
    """Record that the registry `record` writes to `store` (call it inside `adding`, before the commit: a gc then
    either ran before the entry existed or sees the registry)."""
    if (str(store.root), record) in _remembered:
        return
    store.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(store.root / REGISTRIES, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # appends of concurrent first writers never interleave or repeat
        with os.fdopen(os.dup(fd), "rb") as f:
            known = f.read().decode(errors="replace").splitlines()
        if record not in known:
            os.write(fd, record.encode() + b"\n")
            os.fsync(fd)
    finally:
        os.close(fd)
    _remembered.add((str(store.root), record))


def recorded_registries(store: Store) -> list[dict]:
    """The registries recorded in `store`'s `registries` file (a one-line `ZooError` if it is unreadable)."""
    path = store.root / REGISTRIES
    try:
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ZooError(f"cannot read {path} ({e})", "restore the file (one JSON line per registry writing to this store); nothing was deleted") from None


def named_by_every_registry(given, store: Store) -> set[str]:
    """The blobs any registry recorded in `store` names (`given`, a `RegistryBackend`, must be one of them); a
    one-line `ZooError` when one of them cannot be read here: gc then deletes nothing."""
    from zoo.registry import open_registry

    records = recorded_registries(store)
    here = socket.gethostname()
    if json.loads(registry_record(given.identity, given.is_file)) not in records:
        raise ZooError(
            f"registry {given.location} has never written to the store {store.root}: it does not know the blobs in use",
            "run `zoo gc` with the --registry / ZOO_REGISTRY your adds used (listed in the store's `registries` file); nothing was deleted",
        )
    named: set[str] = set()
    for r in records:
        identity = r.get("registry")
        try:
            if r.get("host") not in (None, here):
                raise ZooError(f"it is a file on the machine {r['host']}")
            reg = given if identity == given.identity else open_registry(identity)
            path = getattr(reg, "path", None)
            if path is not None and not path.is_file():
                raise ZooError("it is not there")
            named |= reg.blob_hashes()
        except (ZooError, OSError, TypeError, AttributeError) as e:
            reason = e.message if isinstance(e, ZooError) else str(e)
            raise ZooError(
                f"the store {store.root} is also used by registry {identity} which cannot be read here ({reason})",
                "run `zoo gc` where every registry in the store's `registries` file can be read; nothing was deleted",
            ) from None
    return named


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
