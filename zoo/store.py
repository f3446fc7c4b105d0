"""The content-addressed store: every file lives once, named by its sha256.

Layout (like the Hugging Face cache): `blobs/sha256/<hash>` holds the bytes; `adapters/<name>/<version>/`
holds relative symlinks with the adapter's original file names, so the folder loads in PEFT or vLLM as is.
A blob appears only after its bytes were hashed, fsynced and renamed into place: a half-written file is
never visible under a hash. Writes happen in `blobs/incoming/.incoming-*` folders, each locked by its writer
(`compose.durable`): the first write of a later process removes those whose writer died.

Blobs are trusted only once hashed: `has` and every read (`adapter_dir`) check a blob's sha256 once per
process (a cache keyed by the file's identity, size and times), so a blob corrupted on disk is refused, never
read into a composition or a merge, and never kept by dedupe.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from compose.durable import fsync_dir, held_temp_dir, sweep
from zoo.errors import ZooError
from zoo.manifest import FileEntry, Manifest, check_name

CHUNK = 1 << 20
INCOMING = ".incoming-"

# blob identity → the sha256 this process measured; any write to the file changes its mtime or ctime, and so
# the key: a rewritten blob is hashed again
_hashed: dict[tuple, str] = {}
_swept: set[Path] = set()  # stores whose leftovers this process removed already


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex sha256, size) of a file, streamed."""
    with open(path, "rb") as f:
        return _sha256_of(f)


def _sha256_of(f) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := f.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _identity(path: Path, st: os.stat_result) -> tuple:
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def no_space(error: OSError, root: Path) -> ZooError | OSError:
    """A full disk (blocks, inodes, quota) as one line that says nothing was stored."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ZooError(f"no space left in the store {root} ({error.strerror})", "free space (or inodes) there and retry; nothing was registered")
    return error


class Store:
    """Blobs by sha256 under `root`, plus per-adapter folders of links to them."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.incoming = self.root / "blobs" / "incoming"

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def problem(self, entry: FileEntry, *, recheck: bool = False) -> str | None:
        """None if the blob is intact, else what is wrong with it. Its sha256 is measured once per process
        (`recheck`: again)."""
        blob = self.blob_path(entry.sha256)
        try:
            st = os.lstat(blob)
        except FileNotFoundError:
            return "missing"
        if stat.S_ISLNK(st.st_mode):
            return f"a symlink to {os.readlink(blob)}, not a file in the store"
        if stat.S_ISDIR(st.st_mode):
            return "a directory, not a file"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size != entry.size:
            return f"size {st.st_size:,} != {entry.size:,}"
        if not recheck and _hashed.get(_identity(blob, st)) == entry.sha256:
            return None
        fd = os.open(blob, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            before = os.fstat(f.fileno())
            digest, size = _sha256_of(f)
        if size != entry.size:
            return f"size {size:,} != {entry.size:,}"
        if digest != entry.sha256:
            return f"sha256 {digest[:12]}… != {entry.sha256[:12]}…"
        _hashed[_identity(blob, before)] = entry.sha256
        return None

    def verify(self, entry: FileEntry) -> str | None:
        """None if the blob is intact, else what is wrong with it (always hashed again: `zoo verify`)."""
        return self.problem(entry, recheck=True)

    def has(self, entry: FileEntry) -> bool:
        """Whether the blob is there and intact (a link, which may lead out of the store, is not)."""
        return self.problem(entry) is None

    def present(self, entry: FileEntry) -> bool:
        """Whether a regular file (intact or not) is stored under the blob's name."""
        try:
            return stat.S_ISREG(os.lstat(self.blob_path(entry.sha256)).st_mode)
        except FileNotFoundError:
            return False

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A private folder on the store's disk, removed at the end (or, after a crash, by a later writer)."""
        self._sweep_once()
        try:
            with held_temp_dir(self.incoming, INCOMING) as held:
                yield held.path
        except OSError as e:
            raise no_space(e, self.root) from None

    def put(self, src: Path, name: str, *, move: bool = False) -> FileEntry:
        """Store `src`, hashing exactly the bytes stored (the hash is measured, never taken on trust).

        `move`: `src` is a file of this store's `staging()` folder: it is renamed into place, not copied.
        A blob already stored under the same hash is kept only if it is intact; else the new copy replaces it.
        """
        try:
            if move:
                digest, size = sha256_file(src)
                with open(src, "rb") as f:
                    os.fsync(f.fileno())
                return self._commit(Path(src), FileEntry(path=name, sha256=digest, size=size))
            with self.staging() as work:
                tmp = work / "blob"
                digest, size = hashlib.sha256(), 0
                with open(tmp, "wb") as out, open(src, "rb") as f:
                    while chunk := f.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                return self._commit(tmp, FileEntry(path=name, sha256=digest.hexdigest(), size=size))
        except OSError as e:
            raise no_space(e, self.root) from None

    def _commit(self, tmp: Path, entry: FileEntry) -> FileEntry:
        """Rename the hashed, fsynced `tmp` to its blob name, unless an intact blob is there already."""
        if self.has(entry):
            return entry
        blob = self.blob_path(entry.sha256)
        self.blobs.mkdir(parents=True, exist_ok=True)
        if blob.is_dir() and not blob.is_symlink():  # a folder where a blob should be: it holds nothing of ours
            shutil.rmtree(blob)
        os.replace(tmp, blob)
        fsync_dir(self.blobs)
        _hashed[_identity(blob, os.lstat(blob))] = entry.sha256
        return entry

    def _sweep_once(self) -> None:
        """Remove the temp folders of writers that died (SIGKILL, power loss), once per process."""
        if self.root not in _swept:
            sweep(self.incoming, INCOMING)
            _swept.add(self.root)

    def adapter_dir(self, manifest: Manifest) -> Path:
        """`adapters/<name>/<version>/`: the adapter's files under their own names (links into blobs), each
        blob checked against its sha256 (once per process) before the folder is handed out."""
        folder = self.root / "adapters" / check_name(manifest.name) / str(manifest.version)
        missing = [f.path for f in manifest.files if not self.present(f)]
        if missing:
            raise ZooError(f"{manifest.ref}: files {missing} are not in the store {self.root}", f"run `zoo verify --repair {manifest.ref}`")
        for f in manifest.files:
            if problem := self.problem(f):
                raise ZooError(f"{manifest.ref}: the stored {f.path} is corrupt ({problem})", f"run `zoo verify --repair {manifest.ref}`; nothing was read from it")
        if not folder.resolve().is_relative_to(self.root.resolve()):  # a planted link: never write links elsewhere
            raise ZooError(f"{folder} leads out of the store (to {folder.resolve()})", "remove the link: the folder is made again")
        folder.mkdir(parents=True, exist_ok=True)
        names = {f.path for f in manifest.files}
        for stray in folder.iterdir():  # left by an entry of this name and version that never committed
            if stray.name in names or stray.name.startswith("."):
                continue
            if stray.is_dir() and not stray.is_symlink():
                shutil.rmtree(stray)
            else:
                stray.unlink()
        for f in manifest.files:
            link = folder / f.path
            target = os.path.relpath(self.blob_path(f.sha256), link.parent)
            if link.is_symlink() and os.readlink(link) == target:
                continue
            tmp = link.with_name(f".{link.name}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            try:
                os.replace(tmp, link)
            except FileNotFoundError:  # another process making the same folder renamed our link for us
                if not (link.is_symlink() and os.readlink(link) == target):
                    raise
        return folder

    def drop_adapter_dir(self, manifest: Manifest) -> None:
        """Remove the adapter's link folder (blobs stay: other adapters may share them)."""
        folder = self.root / "adapters" / check_name(manifest.name) / str(manifest.version)
        for f in manifest.files:
            (folder / f.path).unlink(missing_ok=True)
            (folder / f".{f.path}.tmp").unlink(missing_ok=True)
        for d in (folder, folder.parent):
            try:
                d.rmdir()
            except OSError:
                pass
