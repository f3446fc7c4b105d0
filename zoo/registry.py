"""The registry's interface, the rules every backend shares, and the JSON-file backend.

Three backends answer the same `RegistryBackend` interface (`open_registry` picks one from the location):

- SQLite (`zoo/registry_db.py`): the default, `$ZOO_HOME/registry.db`;
- PostgreSQL (`zoo/registry_db.py`, the same schema): a team's registry, `postgresql://user@host:port/db`;
- a JSON file (`registry.json`, below): the interchange format (`zoo export` / `zoo import`) and the repo's
  catalogue. Reads take no lock: the file is only ever replaced whole (temp file + fsync + rename), so a reader
  sees the old index or the new one. Writers serialise on `<registry>.lock` and re-read under the lock.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from zoo.errors import ZooError
from zoo.locks import wait_for
from zoo.manifest import CompositionManifest, Manifest, MemberRef, Source, validation_message
from zoo.paths import is_url
from zoo.refs import split_ref  # the one reference parser (re-exported: the backends import it from here)
from zoo.store import fsync_dir

LOCK_TIMEOUT_S = 60

#: Called inside a write transaction, after the entry's row is in and before it commits (the link folder
#: is made there, so a failure leaves neither row nor half an entry).
BeforeCommit = Callable[[Manifest], None]


# --- the rules every backend applies -------------------------------------------------------------------------


def same_origin(a: Source, b: Source) -> bool:
    """Versions of one thing: the same Hub repo, or local folders (a retrained adapter is often saved to a new
    checkpoint folder); never two compositions, never a Hub repo and a local folder."""
    if a.kind != b.kind or a.kind == "composition":
        return False
    return a.kind == "local" or a.repo_id == b.repo_id


def next_version(manifest: Manifest, same: list[Manifest], new_version_of_same_source: bool) -> int:
    """The version `manifest` gets beside the existing versions `same` of its name; refuses a name that exists
    unless `new_version_of_same_source` and every version came from the same source."""
    if same and not (new_version_of_same_source and all(same_origin(m.source, manifest.source) for m in same)):
        other = " from another source" if new_version_of_same_source else ""
        raise ZooError(f"an adapter named {manifest.name!r} already exists{other}", "pick another --name, or `zoo remove` it first")
    return max((m.version for m in same), default=0) + 1


def members_of(m: Manifest) -> list[MemberRef]:
    """The entries a composition needs to work (a weighted sum's members are provenance only: it has its own weights)."""
    return m.members if isinstance(m, CompositionManifest) else []


def check_member(composition: Manifest, member: MemberRef, found: Manifest | None) -> None:
    """A member must be registered, with the weights the composition pinned."""
    ref = f"{member.name}@{member.version}"
    if found is None:
        raise ZooError(f"{composition.name}: member {ref} is not in the registry", f"add {member.name!r} first (or compose again)")
    weights = getattr(found, "weights", None)
    if weights is None or weights.sha256 != member.sha256:
        raise ZooError(f"{composition.name}: member {ref} has other weights than the composition pinned", "compose it again from the registered members")


def refuse_dependents(ref: str, dependents: list[str]) -> None:
    """One line naming the compositions that still use what `zoo remove ref` would remove."""
    if dependents:
        shown = ", ".join(dependents[:5]) + (f" (+{len(dependents) - 5} more)" if len(dependents) > 5 else "")
        raise ZooError(
            f"{ref} is a member of {shown}",
            f"remove {'that composition' if len(dependents) == 1 else 'those compositions'} first, or `zoo remove {ref} --cascade` to remove {'it' if len(dependents) == 1 else 'them'} too",
        )


def matches(m: Manifest, base: str | None, method: str | None, task: str | None) -> bool:
    """The filters of `zoo list`: base model (substring), method or composition kind, task."""
    return (base is None or base in (m.base_model.name_or_path or "")) and (method is None or m.label == method) and (task is None or m.task == task)


class RegistryBackend:
    """What every registry answers. Writes are single transactions: an entry is in whole, or not at all."""

    #: Shown to users (a path, or a URL without its password).
    location: str
    #: The folder relative local source paths are relative to (None: every recorded path is absolute).
    folder: Path | None
    #: A location that opens this very registry again, without any password (recorded in the store, see `zoo.gc`).
    identity: str
    #: Whether it is a file on this machine (not a database server).
    is_file: bool = True

    def read(self) -> list[Manifest]:
        """All manifests, in the order they were added."""
        raise NotImplementedError

    def versions(self, name: str) -> list[Manifest]:
        """Every version of `name`, oldest first."""
        raise NotImplementedError

    def select(self, *, base: str | None = None, method: str | None = None, task: str | None = None, limit: int | None = None) -> list[Manifest]:
        """Entries matching the filters (see `matches`), in the order they were added; the first `limit`."""
        raise NotImplementedError

    def count(self, *, base: str | None = None, method: str | None = None, task: str | None = None) -> int:
        raise NotImplementedError

    def json_lines(self, *, base: str | None = None, method: str | None = None, task: str | None = None, limit: int | None = None) -> Iterator[bytes]:
        """The matching manifests as stored, one compact JSON object each (validated when written, not again)."""
        raise NotImplementedError

    def add(self, manifest: Manifest, *, new_version_of_same_source: bool = False, before_commit: BeforeCommit | None = None) -> Manifest:
        """Register `manifest` (its version decided in the transaction; see `next_version`); returns it as stored."""
        raise NotImplementedError

    def add_many(self, manifests: list[Manifest]) -> list[str | None]:
        """Register manifests as they are (names and versions kept), in batched transactions: per manifest None
        (added), "unchanged" (the same entry is there) or why it conflicts (not added)."""
        raise NotImplementedError

    def remove(self, ref: str, *, cascade: bool = False) -> list[Manifest]:
        """Unregister 'name' (every version) or 'name@version'; refuses while a composition uses one of them,
        unless `cascade` (then those go too). Returns what was removed."""
        raise NotImplementedError

    def dangling(self) -> list[tuple[str, str]]:
        """(composition ref, member ref) for every member that is not registered with the pinned weights."""
        raise NotImplementedError

    def blob_hashes(self) -> set[str]:
        """The sha256 of every file any entry names (what `zoo gc` keeps)."""
        raise NotImplementedError

    def from_source(self, kind: str, repo_id: str | None, revision: str | None) -> list[Manifest]:
        """Entries whose files came from that Hub repo commit (`zoo pull` of it again is a no-op)."""
        return [m for m in self.read() if (m.source.kind, m.source.repo_id, m.source.revision) == (kind, repo_id, revision)]

    def resolve(self, ref: str) -> Manifest:
        """The manifest for 'name' (its latest version) or 'name@version'."""
        name, version = split_ref(ref)
        found = self.versions(name)
        if not found:
            raise ZooError(f"no adapter named {name!r} in {self.location}", "see `zoo list`, or `zoo add PATH --name NAME`")
        if version is None:
            return max(found, key=lambda m: m.version)
        for m in found:
            if m.version == version:
                return m
        raise ZooError(f"{name!r} has no version {version}", f"versions: {', '.join(str(m.version) for m in found)}")

    def source_folder(self, path: str) -> Path:
        """A recorded local source path as a folder on this machine."""
        p = Path(path)
        return p if p.is_absolute() or self.folder is None else self.folder / p


def open_registry(location: str) -> RegistryBackend:
    """The backend for a location: `postgresql://…` → PostgreSQL, `*.json` → a JSON file, anything else
    (`*.db`, `sqlite:///…`) → SQLite."""
    if location.endswith(".json") and not is_url(location):
        return Registry(Path(location))
    from zoo.registry_db import DbRegistry

    return DbRegistry.open(location)


# --- the JSON file ------------------------------------------------------------------------------------------


class RegistryFile(BaseModel):
    """The on-disk shape of `registry.json`."""

    format: Literal["adapter-zoo/registry"] = "adapter-zoo/registry"
    schema_version: Literal[1] = 1
    adapters: list[Manifest] = Field(default_factory=list)


# The file is JSON with one entry per line, so that each line is validated once per process: a transaction
# re-reads the index after other processes wrote it, and validating every manifest each time would make
# n adds cost O(n²) pydantic work (800 adds: minutes). Any other layout (edited by hand) is parsed whole.
HEAD = b'{"format": "adapter-zoo/registry", "schema_version": 1, "adapters": ['
TAIL = b"]}"
_MANIFEST = TypeAdapter(Manifest)
_by_line: dict[bytes, Manifest] = {}
_by_id: dict[int, tuple[Manifest, bytes]] = {}  # id → (manifest, line); holding the manifest keeps its id unique


def _entry(line: bytes) -> Manifest:
    if (m := _by_line.get(line)) is None:
        m = _by_line[line] = _MANIFEST.validate_json(line)
        _by_id[id(m)] = (m, line)
    return m


def manifest_line(m: Manifest) -> bytes:
    """`m` as one line of compact JSON (the registry file's and the database's form of an entry)."""
    if (known := _by_id.get(id(m))) is None:  # entries are values: changes are model_copy()s, never in place
        line = m.model_dump_json().encode()
        known = _by_id[id(m)] = (m, line)
        _by_line.setdefault(line, m)
    return known[1]


def _file_mode(path: Path) -> int:
    """The mode a rewritten `path` keeps: its own if it exists, else what the umask allows of 0666."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_registry_file(path: Path, lines: Iterable[bytes]) -> int:
    """Write a registry file from entry lines, atomically (temp file, fsync, rename, directory fsync); returns
    how many entries it holds. Streams: 100,000 entries never sit in memory at once."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    count = 0
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp makes 0600: a registry or an export is meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(HEAD)
            for line in lines:
                f.write(b",\n" + line if count else b"\n" + line)  # the comma goes before the next line: no lookahead
                count += 1
            f.write(b"\n" + TAIL + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return count


def read_registry_file(path: Path) -> list[Manifest]:
    """Every manifest of a registry file (none if it does not exist); a one-line `ZooError` if it is not one."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:  # a folder, no permission
        raise ZooError(f"cannot read registry {path} ({e.strerror})", "point --registry / ZOO_REGISTRY at a registry file") from None
    lines = raw.split(b"\n")
    if lines[0] == HEAD and lines[-2:] == [TAIL, b""]:  # as written here: one entry per line
        try:
            return [_entry(line.removesuffix(b",")) for line in lines[1:-2]]
        except ValidationError:
            pass  # edited by hand: the full parse says what is wrong
    try:
        return RegistryFile.model_validate_json(raw).adapters
    except ValidationError as e:
        raise ZooError(validation_message(e, f"registry {path}"), "fix or move the file; nothing was changed") from None


class Registry(RegistryBackend):
    """A registry in one JSON file at `path` (created on first write): the repo's catalogue, `zoo export`'s output."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.location = str(self.path)
        self.folder = self.path.parent
        self.identity = str(self.path.absolute())

    def read(self) -> list[Manifest]:
        return read_registry_file(self.path)

    @contextmanager
    def transaction(self) -> Iterator[list[Manifest]]:
        """Lock, read, let the caller edit the list in place, write it back atomically."""
        from filelock import FileLock, Timeout

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path) + ".lock")

        def acquire(seconds: float) -> bool:
            try:
                lock.acquire(timeout=seconds)
                return True
            except Timeout:
                return False

        wait_for(acquire, f"the lock of registry {self.path}", LOCK_TIMEOUT_S)
        try:
            adapters = self.read()
            before = list(adapters)
            yield adapters
            if adapters != before:
                write_registry_file(self.path, (manifest_line(m) for m in adapters))
        finally:
            lock.release()

    def versions(self, name: str) -> list[Manifest]:
        return [m for m in self.read() if m.name == name]

    def select(self, *, base=None, method=None, task=None, limit=None) -> list[Manifest]:
        found = [m for m in self.read() if matches(m, base, method, task)]
        return found if limit is None else found[:limit]

    def count(self, *, base=None, method=None, task=None) -> int:
        return len(self.select(base=base, method=method, task=task))

    def json_lines(self, *, base=None, method=None, task=None, limit=None) -> Iterator[bytes]:
        return (manifest_line(m) for m in self.select(base=base, method=method, task=task, limit=limit))

    def add(self, manifest, *, new_version_of_same_source=False, before_commit=None) -> Manifest:
        with self.transaction() as adapters:
            same = [m for m in adapters if m.name == manifest.name]
            manifest = manifest.model_copy(update={"version": next_version(manifest, same, new_version_of_same_source)})
            by_ref = {m.ref: m for m in adapters}
            for member in members_of(manifest):
                check_member(manifest, member, by_ref.get(f"{member.name}@{member.version}"))
            adapters.append(manifest)
            if before_commit:
                before_commit(manifest)
        return manifest

    def add_many(self, manifests: list[Manifest]) -> list[str | None]:
        results: list[str | None] = []
        with self.transaction() as adapters:
            by_ref = {m.ref: m for m in adapters}
            for m in manifests:
                results.append(_import_one(m, by_ref))
                if results[-1] is None:
                    adapters.append(m)
                    by_ref[m.ref] = m
        return results

    def remove(self, ref: str, *, cascade: bool = False) -> list[Manifest]:
        self.resolve(ref)  # a clear error if nothing matches
        name, version = split_ref(ref)
        with self.transaction() as adapters:
            removed = [m for m in adapters if m.name == name and version in (None, m.version)]
            gone = {m.ref for m in removed}
            dependents = [m for m in adapters if m.ref not in gone and any(f"{x.name}@{x.version}" in gone for x in members_of(m))]
            if not cascade:
                refuse_dependents(ref, [m.ref for m in dependents])
            removed += dependents
            adapters[:] = [m for m in adapters if m not in removed]
        return removed

    def dangling(self) -> list[tuple[str, str]]:
        adapters = self.read()
        by_ref = {m.ref: m for m in adapters}
        found = []
        for m in adapters:
            for x in members_of(m):
                try:
                    check_member(m, x, by_ref.get(f"{x.name}@{x.version}"))
                except ZooError:
                    found.append((m.ref, f"{x.name}@{x.version}"))
        return found

    def blob_hashes(self) -> set[str]:
        return {f.sha256 for m in self.read() for f in m.files}


def _import_one(m: Manifest, by_ref: dict[str, Manifest]) -> str | None:
    """Whether `m` can join entries `by_ref` as it is: None (yes), "unchanged", or the conflict."""
    if (there := by_ref.get(m.ref)) is not None:
        return "unchanged" if manifest_line(there) == manifest_line(m) else f"{m.ref} is already registered with other content"
    for member in members_of(m):
        try:
            check_member(m, member, by_ref.get(f"{member.name}@{member.version}"))
        except ZooError as e:
            return e.message
    return None
