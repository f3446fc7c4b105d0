"""The registry: a JSON index of manifests (`registry.json`).

Reads take no lock: the file is only ever replaced whole (temp file + fsync + rename), so a reader sees
the old index or the new one, never a mix. Writers serialise on `<registry>.lock` and re-read under the
lock, so concurrent `zoo add`s across processes all land.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from zoo.errors import ZooError
from zoo.manifest import Manifest, validation_message
from zoo.refs import split_ref
from zoo.store import fsync_dir

LOCK_TIMEOUT_S = 60


class RegistryFile(BaseModel):
    """The on-disk shape of `registry.json`."""

    format: Literal["adapter-zoo/registry"] = "adapter-zoo/registry"
    schema_version: Literal[1] = 1
    adapters: list[Manifest] = Field(default_factory=list)


# The file is JSON with one entry per line, so that each line is validated once per process: a transaction
# re-reads the index after other processes wrote it, and validating every manifest each time would make
# n adds cost O(n²) pydantic work (800 adds: minutes). Any other layout (edited by hand) is parsed whole.
_HEAD = b'{"format": "adapter-zoo/registry", "schema_version": 1, "adapters": ['
_TAIL = b"]}"
_MANIFEST = TypeAdapter(Manifest)
_by_line: dict[bytes, Manifest] = {}
_by_id: dict[int, tuple[Manifest, bytes]] = {}  # id → (manifest, line); holding the manifest keeps its id unique


def _entry(line: bytes) -> Manifest:
    if (m := _by_line.get(line)) is None:
        m = _by_line[line] = _MANIFEST.validate_json(line)
        _by_id[id(m)] = (m, line)
    return m


def _line(m: Manifest) -> bytes:
    if (known := _by_id.get(id(m))) is None:  # entries are values: changes are model_copy()s, never in place
        line = m.model_dump_json().encode()
        known = _by_id[id(m)] = (m, line)
        _by_line.setdefault(line, m)
    return known[1]


class Registry:
    """The index at `path` (created on first write)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[Manifest]:
        """All manifests, in the order they were added."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:  # a folder, no permission
            raise ZooError(f"cannot read registry {self.path} ({e.strerror})", "point --registry / ZOO_REGISTRY at a registry file") from None
        lines = raw.split(b"\n")
        if lines[0] == _HEAD and lines[-2:] == [_TAIL, b""]:  # as written below: one entry per line
            try:
                return [_entry(line.removesuffix(b",")) for line in lines[1:-2]]
            except ValidationError:
                pass  # edited by hand: the full parse says what is wrong
        try:
            return RegistryFile.model_validate_json(raw).adapters
        except ValidationError as e:
            raise ZooError(validation_message(e, f"registry {self.path}"), "fix or move the file; nothing was changed") from None

    def _write(self, adapters: list[Manifest]) -> None:
        lines = [_line(m) for m in adapters]
        text = b"\n".join([_HEAD, *(line + b"," for line in lines[:-1]), *lines[-1:], _TAIL, b""])
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_dir(self.path.parent)

    @contextmanager
    def transaction(self) -> Iterator[list[Manifest]]:
        """Lock, read, let the caller edit the list in place, write it back atomically."""
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S):
                adapters = self.read()
                before = list(adapters)
                yield adapters
                if adapters != before:
                    self._write(adapters)
        except Timeout:
            raise ZooError(f"registry {self.path} is locked by another process", f"retry, or remove {self.path}.lock if no zoo process is running") from None

    def versions(self, name: str) -> list[Manifest]:
        return [m for m in self.read() if m.name == name]

    def resolve(self, ref: str) -> Manifest:
        """The manifest for 'name' (its latest version) or 'name@version'."""
        name, version = split_ref(ref)
        found = self.versions(name)
        if not found:
            raise ZooError(f"no adapter named {name!r} in {self.path}", "see `zoo list`, or `zoo add PATH --name NAME`")
        if version is None:
            return max(found, key=lambda m: m.version)
        for m in found:
            if m.version == version:
                return m
        raise ZooError(f"{name!r} has no version {version}", f"versions: {', '.join(str(m.version) for m in found)}")
