"""`zoo export` / `zoo import`: a registry as one `registry.json` file (the repo catalogue's format).

Export streams the stored manifests as they are (one entry per line); import registers a file's manifests with
their names and versions, after making sure every blob is in the store with the right hash: taken from the store
(re-hashed once per blob), else fetched from the entry's recorded source like `zoo verify --repair` does.
Entries go in in batched transactions; an entry that conflicts (the same NAME@VERSION with other content, a
member that is not registered, a blob that cannot be had) is reported and skipped, the others go in.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from zoo.api import PathLike, _source_path, open_registry, open_store
from zoo.errors import ZooError
from zoo.gc import adding, registry_record, remember_registry
from zoo.manifest import Manifest
from zoo.registry import Registry, RegistryBackend, write_registry_file
from zoo.store import Store


def export_registry(out: PathLike | None = None, *, registry: PathLike | None = None) -> int:
    """Write the registry as a `registry.json` file at `out` (atomically), or to stdout; returns the entry count.

    Local source paths are written relative to the file's folder when they lie inside it, else absolute."""
    reg = open_registry(registry)
    target = Path(out).resolve().parent if out is not None else None
    lines = _rebased_lines(reg, target)
    if out is not None:
        if Path(out).is_dir():
            raise ZooError(f"{out} is a folder", "give --out a file name, e.g. registry.json")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        return write_registry_file(Path(out), lines)
    from zoo.registry import HEAD, TAIL

    stdout, count = sys.stdout, 0  # text: stdout may be a StringIO (tests, notebooks)
    stdout.write(HEAD.decode())
    for line in lines:
        stdout.write((",\n" if count else "\n") + line.decode())
        count += 1
    stdout.write("\n" + TAIL.decode() + "\n")
    stdout.flush()
    return count


def _rebased_lines(reg: RegistryBackend, target: Path | None) -> Iterator[bytes]:
    """The registry's entry lines, local source paths recorded relative to `target` (a folder) where inside it."""
    here = reg.folder.resolve() if reg.folder is not None else None
    for line in reg.json_lines():
        if b'"kind":"local"' not in line or here == target:
            yield line  # nothing to rebase: the bytes as stored
            continue
        data = json.loads(line)
        path = data["source"].get("path")
        if data["source"]["kind"] == "local" and path:
            folder = os.path.normpath(reg.source_folder(path).absolute())
            inside = target is not None and Path(folder).is_relative_to(target)
            data["source"]["path"] = os.path.relpath(folder, target) if inside else folder
        yield json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass
class ImportReport:
    """What `zoo import` did: entries added, entries already there unchanged, and (ref, why) per conflict."""

    added: int = 0
    unchanged: int = 0
    conflicts: list[tuple[str, str]] = field(default_factory=list)


def import_registry(path: PathLike, *, registry: PathLike | None = None, progress: bool = False) -> ImportReport:
    """Register every manifest of the registry file `path` (names and versions kept); see the module docstring."""
    source = Registry(Path(path))
    if not source.path.is_file():
        raise ZooError(f"{path} is not a file", "give the registry.json to import (written by `zoo export`)")
    manifests = source.read()
    reg, store = open_registry(registry), open_store()
    report = ImportReport()
    with adding(store), tempfile.TemporaryDirectory() as work:
        remember_registry(store, registry_record(reg.identity, reg.is_file))
        ready: list[Manifest] = []
        checked: dict[str, str | None] = {}  # sha256 → None (in the store, verified) or why not
        for m in _progress(manifests, progress, "fetching blobs"):
            problem = _ensure_blobs(m, source, store, Path(work), checked)
            if problem:
                report.conflicts.append((m.ref, problem))
            else:
                ready.append(_rebased(m, source, reg))
        for m, result in zip(ready, reg.add_many(ready)):
            if result is None:
                report.added += 1
            elif result == "unchanged":
                report.unchanged += 1
            else:
                report.conflicts.append((m.ref, result))
    return report


def _ensure_blobs(m: Manifest, source: Registry, store: Store, work: Path, checked: dict[str, str | None]) -> str | None:
    """None once every file of `m` is in the store with its hash, else why it cannot be."""
    from zoo.repair import _fetch

    for f in m.files:
        if f.sha256 not in checked or checked[f.sha256] is not None:
            problem = store.verify(f)
            if problem is not None:
                try:
                    fetched, _ = _fetch(m, f, work, source)  # hash-checked against the manifest
                    store.blob_path(f.sha256).unlink(missing_ok=True)  # a corrupt copy of the right size would be kept
                    store.put(fetched, f.path)
                    problem = store.verify(f)
                except ZooError as e:
                    problem = e.message.removeprefix(f"{m.ref}: ")  # names the file and the source already
            checked[f.sha256] = problem if problem is None or problem.startswith(f.path) else f"{f.path}: {problem}"
        if checked[f.sha256] is not None:
            return checked[f.sha256]
    return None


def _rebased(m: Manifest, source: Registry, reg: RegistryBackend) -> Manifest:
    """`m` with a relative local source path (relative to the imported file) recorded for `reg`."""
    path = m.source.path
    if m.source.kind != "local" or not path or Path(path).is_absolute():
        return m
    recorded = _source_path(source.source_folder(path), reg)
    return m if recorded == path else m.model_copy(update={"source": m.source.model_copy(update={"path": recorded})})


def _progress(items: list, shown: bool, what: str):
    if not shown or len(items) < 1000:
        return items
    from rich.progress import track

    return track(items, description=what, transient=True)
