"""The registry side of the Python API: add, list, show, remove and verify adapters.

    >>> import zoo
    >>> zoo.add("runs/my-lora", name="my-lora", task="sentiment")      # doctest: +SKIP
    >>> [m.ref for m in zoo.list_adapters(task="sentiment")]           # doctest: +SKIP

Every function takes `registry=` (a path or URL; default `$ZOO_REGISTRY`, else `<ZOO_HOME>/registry.db`):
`postgresql://user@host:port/db` is a team's PostgreSQL registry, `*.json` a registry file, anything else SQLite.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, TypeVar

from pydantic import ValidationError

from compose.errors import CompositionError
from zoo.errors import ZooError
from zoo.formats.folder import folder_files, read_adapter_folder
from zoo.formats.tensor_values import check_tensor_values
from zoo.gc import Garbage
from zoo.interrupts import deferred as _deferred_signals
from zoo.manifest import AdapterManifest, BaseModelRef, DtypeSize, Manifest, MethodConfig, SizeInfo, Source, check_name, validation_message
from zoo.paths import registry_location, store_root
from zoo.refs import is_ref
from zoo.registry import RegistryBackend
from zoo.safety import copy_inside
from zoo.store import Store, no_space

PathLike = str | os.PathLike
M = TypeVar("M")


def open_registry(registry: PathLike | None = None) -> RegistryBackend:
    """The registry at `registry` (a path or URL), else `$ZOO_REGISTRY`, else `<ZOO_HOME>/registry.db`."""
    from zoo.registry import open_registry as open_location

    return open_location(registry_location(registry))


def open_store() -> Store:
    """The blob store: `$ZOO_STORE` (shared by a team), else `$ZOO_HOME`."""
    return Store(store_root())


def split_adapters(adapters: PathLike | Iterable[PathLike]) -> list[str]:
    """'a+b', a folder, or ['a', Path('b')] → ['a', 'b']."""
    if isinstance(adapters, os.PathLike):
        adapters = [adapters]
    items = adapters.split("+") if isinstance(adapters, str) else [os.fspath(a) for a in adapters]
    if any(not a.strip() for a in items):
        raise ZooError(f"empty adapter name in {adapters!r}", "write a+b or a list of names")
    return items  # not stripped: 'a ' is refused by the reference parser here as by every other command


# --- measuring an adapter ---------------------------------------------------------------------------


def measure_tensors(weights: Path) -> SizeInfo:
    """Params and bytes (total and per dtype) of a safetensors file, from its header."""
    from zoo.formats.safetensors_header import read_safetensors_header

    by_dtype: dict[str, DtypeSize] = {}
    for t in read_safetensors_header(weights).tensors.values():
        got = by_dtype.get(t.dtype, DtypeSize(params=0, bytes=0))
        by_dtype[t.dtype] = DtypeSize(params=got.params + t.numel, bytes=got.bytes + t.nbytes)
    return SizeInfo(trainable_params=sum(d.params for d in by_dtype.values()), bytes=sum(d.bytes for d in by_dtype.values()), by_dtype=by_dtype)


def measure_size(weights: Path, config: MethodConfig, raw_config: dict | None = None) -> SizeInfo:
    """Sizes from the safetensors header, after the checks `zoo inspect` makes of it with the adapter's own
    config (`raw_config`), so nothing is stored that inspect refuses; for LoRA every module's rank must be
    the one the config gives it (shapes are checked against the model when attached)."""
    from zoo.inspect import inspect_adapter

    if raw_config is None and config.method == "lora":
        raw_config = {"peft_type": "LORA", **config.model_dump()}
    if raw_config is not None:
        report = inspect_adapter(weights, config=raw_config)
    if config.method != "lora":
        return measure_tensors(weights)
    for row in report.modules:
        if row.rank != config.rank_for(row.module):
            raise ZooError(
                f"{row.module}: the weights have rank {row.rank}, the config says {config.rank_for(row.module)}",
                "fix r / rank_pattern in adapter_config.json",
            )
    return measure_tensors(weights)


# --- registry operations ---------------------------------------------------------------------------


def add(
    path: PathLike,
    *,
    name: str | None = None,
    task: str | None = None,
    tags: Iterable[str] = (),
    license: str | None = None,
    allow_pickle: bool = False,
    base: PathLike | None = None,
    registry: PathLike | None = None,
) -> AdapterManifest:
    """Import an adapter folder (written by PEFT or AdapterHub) into the store and register it.

    Sizes, ranks and hashes are measured from the files. A name that exists takes changed files from the same
    folder, or from another local folder, as its next version (`name@2`); the same files as its latest version
    change nothing and return it; a name pulled from the Hub or made by `compose` is refused.

    Example:
        >>> zoo.add("outputs/checkpoint-500", name="llama-sql", task="text-to-sql")  # doctest: +SKIP
    """
    from zoo.formats.adapterhub import FUSION_CONFIG_NAME

    folder = Path(path)
    name = check_name(entry_name(folder, name))
    if not folder.exists():
        raise ZooError(f"{folder} does not exist")
    if not folder.is_dir():
        raise ZooError(f"{folder} is not a folder", "point at the folder holding adapter_config.json")
    reg = open_registry(registry)
    source = Source(kind="local", path=_source_path(folder, reg))
    with open_store().staging() as stage, _reported_as(stage, folder):
        copy_inside(folder, folder_files(), stage)  # each file opened once, no link out of the folder followed
        if (stage / FUSION_CONFIG_NAME).is_file():
            from zoo.composition import register_fusion_folder

            return register_fusion_folder(stage, name=name, source=source, task=task, tags=tags, allow_pickle=allow_pickle, staged=True, registry=registry)
        return register_folder(
            stage, name=name, source=source, task=task, tags=tags, license=license, allow_pickle=allow_pickle, base=base, staged=True,
            new_version=True, registry=registry,
        )


def entry_name(path: PathLike, name: str | None = None) -> str:
    """The registry name `add` gives a folder: `name`, else the folder's own name."""
    return Path(path).resolve().name if name is None else name


@contextmanager
def _reported_as(stage: Path, folder: Path) -> Iterator[None]:
    """Errors and warnings about the staged copy name the user's folder instead."""
    def mend(text: str) -> str:
        return text.replace(str(stage), str(folder))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except ZooError as e:
            raise ZooError(mend(e.message), e.hint and mend(e.hint)) from None
        except CompositionError as e:
            raise CompositionError(mend(str(e))) from None
    for w in caught:
        warnings.warn_explicit(mend(str(w.message)), w.category, w.filename, w.lineno)


def register_folder(
    folder: Path,
    *,
    name: str,
    source: Source,
    task: str | None = None,
    tags: Iterable[str] = (),
    license: str | None = None,
    allow_pickle: bool = False,
    base: PathLike | None = None,
    base_model: BaseModelRef | None = None,
    new_version_of_same_source: bool = False,
    new_version: bool = False,
    staged: bool = False,
    registry: PathLike | None = None,
) -> AdapterManifest:
    """Store an adapter folder's files and register them under `name` (see `add` and `register`).
    `base_model` replaces the base the folder records (a composition's is its members'); `new_version`: as
    `new_version_of_same_source`, and the same files as the latest version register nothing (it is returned);
    `staged`: `folder` is a `Store.staging()` folder, whose files are moved into the store, not copied."""
    name = check_name(name)
    reg = open_registry(registry)
    if reg.versions(name) and not (new_version_of_same_source or new_version):
        raise ZooError(f"an adapter named {name!r} already exists", "pick another --name, or `zoo remove` it first")
    from zoo.gc import adding

    store = open_store()
    with tempfile.TemporaryDirectory() as work:
        adapter = read_adapter_folder(folder, allow_pickle=allow_pickle, workdir=Path(work), model_config=_base_config(base))
        size = measure_size(adapter.weights, adapter.config, adapter.raw_config)
        check_tensor_values(adapter.weights)
        with adding(store):  # from the first blob to the commit: a concurrent `zoo gc` keeps these blobs
            files = [store.put(path, stored_name, move=staged and path.parent == folder) for stored_name, path in adapter.files.items()]
            manifest = _adapter_manifest(adapter, name, source, size, files, task, tags, license)
            manifest = manifest.model_copy(update={"base_model": base_model}) if base_model else manifest
            if new_version and (latest := max(reg.versions(name), key=lambda m: m.version, default=None)) and _same_files(latest, manifest):
                return latest
            return register(manifest, new_version_of_same_source=new_version_of_same_source or new_version, registry=registry)


def _same_files(a: Manifest, b: Manifest) -> bool:
    return a.kind == b.kind and {(f.path, f.sha256) for f in a.files} == {(f.path, f.sha256) for f in b.files}


def _adapter_manifest(adapter, name, source, size, files, task, tags, license) -> AdapterManifest:
    """The manifest of an adapter folder read by `read_adapter_folder`, its files stored."""
    if adapter.converted_from:
        source = source.model_copy(update={"original_files": [adapter.converted_from]})
    return build_manifest(
        AdapterManifest,
        name=name,
        method=adapter.config,
        format=adapter.format,
        base_model=adapter.base_model,
        task_type=adapter.task_type,
        size=size,
        files=files,
        source=source,
        task=task,
        tags=sorted(set(tags)),
        license=license,
        extra_config=adapter.unknown_keys,
    )


def build_manifest(kind: type[M], what: str = "adapter", **fields: Any) -> M:
    """`kind(**fields)`, with an invalid field (a type or value the input got wrong) as a one-line `ZooError`."""
    try:
        return kind(**fields)
    except ValidationError as e:
        raise ZooError(validation_message(e, what)) from None


def _base_config(base: PathLike | None) -> dict | None:
    """A local base's config.json (AdapterHub prefixes need its attention layout), or None."""
    if base is None:
        return None
    from zoo.formats.peft import read_json_config

    path = Path(base)
    return read_json_config(path / "config.json" if path.is_dir() else path, "config.json")


def register(manifest: Manifest, *, new_version_of_same_source: bool = False, registry: PathLike | None = None) -> Manifest:
    """Add a manifest whose files are already in the store; refuses a name that exists, unless
    `new_version_of_same_source` and every version of that name came from the same Hub repo or local
    folder: then it becomes the next version (decided in the registry's transaction).

    A composition's members must be registered with the weights it pinned. Blobs, then the folder of links,
    then the registry row, which commits last: the row never names a folder or a blob that is not there, and
    a failure before the commit leaves no entry (the folder is taken back)."""
    from zoo.gc import adding, registry_record, remember_registry

    store, linked = open_store(), []

    def link(m: Manifest) -> None:
        linked.append(m)
        store.adapter_dir(m)

    try:
        with adding(store), _deferred_signals():
            reg = open_registry(registry)
            remember_registry(store, registry_record(reg.identity, reg.is_file))
            return reg.add(manifest, new_version_of_same_source=new_version_of_same_source, before_commit=link)
    except BaseException as e:
        for m in linked:
            store.drop_adapter_dir(m)
        if isinstance(e, OSError) and (full := no_space(e, store.root)) is not e:
            raise full from None
        raise


def _source_path(folder: Path, reg: RegistryBackend) -> str:
    """The folder as recorded: relative to the registry's folder when it lies beside it (a shipped index
    such as the repo's registry.json stays valid wherever the repo is cloned), else absolute."""
    folder = folder.resolve()
    home = reg.folder.resolve() if reg.folder is not None else None
    return str(folder.relative_to(home)) if home is not None and folder.is_relative_to(home) else str(folder)


def adapter_folder(manifest: Manifest, *, registry: PathLike | None = None) -> Path:
    """The stored folder of `manifest`, every blob checked against its sha256 (once per process): the one
    way zoo reads a registered entry's files (load, compose, merge, inspect, push). Files missing from the
    store are fetched again from a local source first (e.g. a registry shipped with its adapters), and must
    hash to the manifest's sha256; a corrupt blob is refused in one line (`zoo verify --repair` repairs it)."""
    store = open_store()
    missing = [f for f in manifest.files if not store.present(f)]
    if missing and manifest.source.kind == "local" and manifest.source.path:
        source = open_registry(registry).source_folder(manifest.source.path)
        for f in missing:
            if (source / f.path).is_file():
                got = store.put(source / f.path, f.path)
                if got.sha256 != f.sha256:
                    raise ZooError(f"{source / f.path} changed since it was registered (sha256 {got.sha256[:12]}… != {f.sha256[:12]}…)", "re-add it under a new name")
    return store.adapter_dir(manifest)


def list_adapters(
    *, base: str | None = None, method: str | None = None, task: str | None = None, registry: PathLike | None = None
) -> list[Manifest]:
    """Registered adapters (every version), filtered by base model (substring), method (or composition kind)
    and task, in the order they were added."""
    return open_registry(registry).select(base=base, method=method, task=task)


def show(ref: str, *, registry: PathLike | None = None) -> Manifest:
    """The manifest of 'name' (latest version) or 'name@version'."""
    return open_registry(registry).resolve(ref)


def lookup(ref: str, *, registry: PathLike | None = None) -> Manifest:
    """The registry entry `ref` names, for commands that take an entry or a path: a bare name always means the
    entry; if there is none but the working directory holds a file or folder of that name, the error says to
    write `./NAME` (a folder never silently takes an entry's place, nor the other way round)."""
    try:
        return open_registry(registry).resolve(ref)
    except ZooError as e:
        if is_ref(ref) and os.path.lexists(ref):
            kind = "folder" if os.path.isdir(ref) else "file"
            raise ZooError(f"{e.message}; {ref!r} is a {kind} here, and a bare name means a registry entry", f"write ./{ref} to use the {kind}") from None
        raise


def remove(ref: str, *, cascade: bool = False, registry: PathLike | None = None) -> list[Manifest]:
    """Unregister 'name' (every version) or 'name@version'; returns what was removed.

    Refuses (one line naming them) while a composition uses one of those entries; `cascade=True` removes
    those compositions too. The blobs stay in the store until `zoo gc`."""
    removed = open_registry(registry).remove(ref, cascade=cascade)
    store = open_store()
    for m in removed:
        store.drop_adapter_dir(m)
    return removed


@dataclass
class VerifyResult:
    ref: str
    path: str
    problem: str | None  # None: intact


def verify(ref: str | None = None, *, registry: PathLike | None = None) -> list[VerifyResult]:
    """Re-hash every stored file of one adapter (or all) against its manifest; a composition's member that
    is not registered (with the weights it pinned) is reported too, as `path="member NAME@V"`."""
    reg = open_registry(registry)
    manifests = [reg.resolve(ref)] if ref else reg.read()
    store = open_store()
    results = [VerifyResult(m.ref, f.path, store.verify(f)) for m in manifests for f in m.files]
    wanted = {m.ref for m in manifests}
    results += [VerifyResult(comp, f"member {member}", "dangling: not in the registry with the pinned weights") for comp, member in reg.dangling() if comp in wanted]
    return results


def gc(*, delete: bool = False, registry: PathLike | None = None) -> list[Garbage]:
    """The store's blobs no registry entry names (what `zoo remove` left behind), deleted when `delete`.

    Safe against concurrent adds (see `zoo.gc`). Keeps what any registry that ever wrote to the store names
    (a shared `ZOO_STORE` too); refuses, deleting nothing, if one of them cannot be read here or if `registry`
    never wrote to the store.

    Example:
        >>> sum(g.size for g in zoo.api.gc())  # bytes a `zoo gc --yes` would free  # doctest: +SKIP
    """
    from zoo.gc import collect_garbage, named_by_every_registry

    reg, store = open_registry(registry), open_store()
    return collect_garbage(lambda: named_by_every_registry(reg, store), store, delete=delete)


def schema() -> dict:
    """The manifest's JSON Schema."""
    from zoo.manifest import manifest_schema

    return manifest_schema()
