"""The content-addressed store: every file lives once, named by its sha256.

Layout (like the Hugging Face cache): `blobs/sha256/<hash>` holds the bytes; `adapters/<name>/<version>/`
holds relative symlinks with the adapter's original file names, so the folder loads in PEFT or vLLM as is.
A blob appears only after its bytes were hashed, fsynced and renamed into place: a half-written file is
never visible under a hash.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from zoo.errors import ZooError
from zoo.manifest import FileEntry, Manifest, check_name

CHUNK = 1 << 20


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex sha256, size) of a file, streamed."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """Blobs by sha256 under `root`, plus per-adapter folders of links to them."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def has(self, entry: FileEntry) -> bool:
        blob = self.blob_path(entry.sha256)
        return blob.is_file() and not blob.is_symlink() and blob.stat().st_size == entry.size  # a link may lead out of the store

    def put(self, src: Path, name: str) -> FileEntry:
        """Copy `src` into the store, hashing while copying (the hash is measured, never taken on trust)."""
        self.blobs.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            entry = FileEntry(path=name, sha256=digest.hexdigest(), size=size)
            if self.has(entry):
                os.unlink(tmp)
            else:
                os.replace(tmp, self.blob_path(entry.sha256))
                fsync_dir(self.blobs)
            return entry
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def verify(self, entry: FileEntry) -> str | None:
        """None if the blob is intact, else what is wrong with it."""
        blob = self.blob_path(entry.sha256)
        if blob.is_symlink():
            return f"a symlink to {os.readlink(blob)}, not a file in the store"
        if not blob.is_file():
            return "missing"
        digest, size = sha256_file(blob)
        if size != entry.size:
            return f"size {size:,} != {entry.size:,}"
        if digest != entry.sha256:
            return f"sha256 {digest[:12]}… != {entry.sha256[:12]}…"
        return None

    def adapter_dir(self, manifest: Manifest) -> Path:
        """`adapters/<name>/<version>/`: the adapter's files under their own names (links into blobs)."""
        folder = self.root / "adapters" / check_name(manifest.name) / str(manifest.version)
        missing = [f.path for f in manifest.files if not self.has(f)]
        if missing:
            raise ZooError(f"{manifest.ref}: files {missing} are not in the store {self.root}", f"run `zoo verify --repair {manifest.name}`")
        if not folder.resolve().is_relative_to(self.root.resolve()):  # a planted link: never write links elsewhere
            raise ZooError(f"{folder} leads out of the store (to {folder.resolve()})", "remove the link: the folder is made again")
        folder.mkdir(parents=True, exist_ok=True)
        for f in manifest.files:
            link = folder / f.path
            target = os.path.relpath(self.blob_path(f.sha256), link.parent)
            if link.is_symlink() and os.readlink(link) == target:
                continue
            tmp = link.with_name(f".{link.name}.tmp")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            os.replace(tmp, link)
        return folder

    def drop_adapter_dir(self, manifest: Manifest) -> None:
        """Remove the adapter's link folder (blobs stay: other adapters may share them)."""
        folder = self.root / "adapters" / check_name(manifest.name) / str(manifest.version)
        for f in manifest.files:
            (folder / f.path).unlink(missing_ok=True)
        for d in (folder, folder.parent):
            try:
                d.rmdir()
            except OSError:
                pass
