"""`zoo verify --repair`: fetch missing or corrupt blobs again from the source the manifest records.

A local folder is read again, a Hub file is downloaded again at the pinned commit (through the real
`huggingface_hub` client); either way the bytes must hash to the manifest's sha256 before they replace the
blob, so a source that changed since is refused and never stored. A file converted on import (a pickle
stored as safetensors) is fetched as the original, checked against its recorded hash, and converted again.
What `zoo compose` computed (fusion weights, a weighted sum) has no source to fetch: that is reported.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from zoo.api import PathLike, open_registry, open_store
from zoo.errors import ZooError
from zoo.formats.folder import WEIGHTS_NAMES
from zoo.manifest import FileEntry, Manifest
from zoo.registry import RegistryBackend
from zoo.store import Store, sha256_file


@dataclass
class RepairResult:
    """One stored file that failed verification.

    Attributes:
        ref: `name@version` of the entry.
        path: the file's name in the adapter folder.
        problem: what verification found (`missing`, a size or sha256 mismatch, ...).
        repaired_from: where intact bytes came from (a folder, `repo@commit`); None when not repaired.
        error: one line saying why it could not be repaired; None when repaired.
    """

    ref: str
    path: str
    problem: str
    repaired_from: str | None = None
    error: str | None = None


def repair(ref: str | None = None, *, registry: PathLike | None = None) -> list[RepairResult]:
    """Re-fetch every missing or corrupt stored file of one entry (or all) from its recorded source.

    Args:
        ref (`str`, *optional*): `NAME` or `NAME@VERSION`; default every entry of the registry.
        registry: the registry (default `$ZOO_REGISTRY`, else `<ZOO_HOME>/registry.db`).

    Returns:
        One `RepairResult` per file that failed verification (intact files are not listed): `repaired_from`
        is set for each file now intact, `error` for each that could not be repaired (nothing is stored then).

    Example:
        >>> from zoo.repair import repair
        >>> [r.error for r in repair("llama-sql") if r.error]  # doctest: +SKIP
    """
    reg = open_registry(registry)
    manifests = [reg.resolve(ref)] if ref else reg.read()
    store = open_store()
    results = []
    for m in manifests:
        bad = [(f, problem) for f in m.files if (problem := store.verify(f))]
        with tempfile.TemporaryDirectory() as work:
            for f, problem in bad:
                result = RepairResult(m.ref, f.path, problem)
                if store.verify(f) is None:  # a blob shared with an entry repaired just before
                    result.repaired_from = "the store (repaired above)"
                else:
                    try:
                        fetched, result.repaired_from = _fetch(m, f, Path(work), reg)
                        store.put(fetched, f.path)  # replaces whatever is there (corrupt bytes, a link, a folder)
                    except ZooError as e:
                        result.error = str(e)
                results.append(result)
        if bad and all(r.error is None for r in results if r.ref == m.ref):
            store.adapter_dir(m)  # the entry's folder of links, made again if it was lost too
    return results


def _fetch(m: Manifest, f: FileEntry, work: Path, reg: RegistryBackend) -> tuple[Path, str]:
    """A verified copy of `f` from `m`'s source, and where it came from."""
    source = m.source
    original = _converted_from(m, f)
    wanted = original or f
    if source.kind == "local" and source.path:
        folder = reg.source_folder(source.path)
        fetched, origin = folder / wanted.path, str(folder)
        if not fetched.is_file():
            raise ZooError(f"{m.ref}: {f.path} cannot be repaired: {fetched} is gone", f"restore it, or `zoo remove {m.ref}` and add it again")
    elif source.kind == "hub" and source.repo_id and source.revision:
        origin = f"{source.repo_id}@{source.revision[:12]}"
        try:
            fetched = _download(source.repo_id, source.revision, wanted.path, work)
        except ZooError as e:
            raise ZooError(f"{m.ref}: {f.path} cannot be repaired: {e}") from None
    else:
        raise ZooError(
            f"{m.ref}: {f.path} cannot be repaired: it was computed by `zoo compose` and has no source to fetch again",
            f"compose (and train) it again, or `zoo remove {m.ref}`",
        )
    _check(fetched, wanted, m, origin)
    if original:
        fetched = _convert(fetched, work / f"converted-{f.path}")
        _check(fetched, f, m, f"{origin} (converted)")
    return fetched, origin


def _check(path: Path, expected: FileEntry, m: Manifest, origin: str) -> None:
    sha, size = sha256_file(path)
    if (sha, size) != (expected.sha256, expected.size):
        raise ZooError(
            f"{m.ref}: {expected.path} cannot be repaired: {origin} now has sha256 {sha[:12]}… ({size:,} bytes), "
            f"the manifest {expected.sha256[:12]}… ({expected.size:,} bytes)",
            "the source changed since it was registered: add it again under a new name",
        )


def _converted_from(m: Manifest, f: FileEntry) -> FileEntry | None:
    """The recorded original (e.g. `adapter_model.bin`) that stored file `f` was converted from, if any."""
    pickles = {pickle: safetensors for safetensors, pickle in WEIGHTS_NAMES.values()}
    return next((o for o in m.source.original_files if pickles.get(o.path) == f.path), None)


def _convert(pickle: Path, out: Path) -> Path:
    """A pickle converted as `zoo add --allow-pickle` did (its hash was checked, so it is the one the user allowed)."""
    from safetensors.torch import save_file

    from zoo.formats.peft import load_pickle_state

    state = load_pickle_state(pickle)
    save_file({k: v.contiguous() for k, v in state.items()}, out, metadata={"format": "pt"})
    return out


def _download(repo_id: str, revision: str, path: str, work: Path) -> Path:
    """One file of the pinned commit, downloaded again into an empty cache in `work` (the client's own cache
    would hand back its copy, which may be what went bad)."""
    from huggingface_hub import hf_hub_download

    from zoo.hub import hub_errors

    with hub_errors(repo_id, revision):
        return Path(hf_hub_download(repo_id, path, revision=revision, cache_dir=work / "hub-cache"))
