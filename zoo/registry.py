"""The registry: a JSON index of manifests (`registry.json`).

Reads take no lock: the file is only ever replaced whole (temp file + fsync + rename), so a reader sees
the old index or the new one, never a mix. Writers serialise on `<registry>.lock` and re-read under the
lock, so concurrent `zoo add`s across processes all land.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from zoo.errors import ZooError
from zoo.manifest import Manifest, validation_message
from zoo.store import fsync_dir

LOCK_TIMEOUT_S = 60


class RegistryFile(BaseModel):
    """The on-disk shape of `registry.json`."""

    format: Literal["adapter-zoo/registry"] = "adapter-zoo/registry"
    schema_version: Literal[1] = 1
    adapters: list[Manifest] = Field(default_factory=list)


def split_ref(ref: str) -> tuple[str, int | None]:
    """'name' → (name, None); 'name@3' → (name, 3)."""
    name, sep, version = ref.partition("@")
    if not sep:
        return name, None
    if not version.isdigit():
        raise ZooError(f"invalid reference {ref!r}", "use NAME or NAME@VERSION with a whole-number version")
    return name, int(version)


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
        try:
            return RegistryFile.model_validate_json(raw).adapters
        except ValidationError as e:
            raise ZooError(validation_message(e, f"registry {self.path}"), "fix or move the file; nothing was changed") from None

    def _write(self, adapters: list[Manifest]) -> None:
        data = RegistryFile(adapters=adapters).model_dump(mode="json", exclude_defaults=False)
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
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
