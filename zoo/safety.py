"""Checks on input the zoo does not trust, where no format module owns them.

- An adapter folder's files must not be symlinks leading out of it: `zoo add` copies what it reads into the
  store (and `zoo push` to the Hub), so a link to `~/.ssh/id_rsa` named `adapter_config.json` would leak it.
- A base model whose config maps transformers' Auto classes to code shipped with the model (`auto_map`) is
  loaded only when the caller passed `trust_remote_code=True`: it is never implied, and transformers is never
  left to ask on the terminal.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from zoo.errors import ZooError

PathLike = str | os.PathLike


def check_links(folder: Path, names: Iterable[str]) -> None:
    """Refuse the files `names` of `folder` that are symlinks resolving outside `folder`."""
    root = Path(folder).resolve()
    for name in names:
        path = Path(folder) / name
        if not path.is_symlink():
            continue
        try:
            inside = path.resolve(strict=True).is_relative_to(root)
        except (OSError, RuntimeError):  # dangling, or a loop
            inside = False
        if not inside:
            raise ZooError(
                f"{path} is a symlink to {os.readlink(path)}, outside the adapter folder",
                "copy the file into the folder: zoo never follows links out of it",
            )


def remote_code_classes(config: dict[str, Any]) -> list[str]:
    """The classes a config's `auto_map` names that transformers does not have itself (so only the model's
    own code defines them). A model whose `auto_map` only repeats built-in classes (e.g. Phi-3) loads without it."""
    import transformers

    auto_map = config.get("auto_map") or {}
    if not isinstance(auto_map, dict):
        return [repr(auto_map)]
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if r is not None]
    return sorted({str(r) for r in refs if not isinstance(r, str) or not hasattr(transformers, r.rpartition(".")[2])})


def refuse_remote_code(base: PathLike, trust_remote_code: bool, *, files: Iterable[str] = ("config.json",), revision: str | None = None) -> None:
    """Raise a one-line `ZooError` if `base` (a local folder or Hub id) needs its own code and the caller did
    not pass `trust_remote_code=True`. `files`: the configs to look at (`tokenizer_config.json` for tokenizers)."""
    if trust_remote_code:
        return
    for name in files:
        config = base_json(base, name, revision)
        if classes := remote_code_classes(config):
            raise ZooError(
                f"base model {str(base)!r} needs its own code to load ({', '.join(classes)} in {name}), which zoo does not run unless asked",
                "pass trust_remote_code=True (`zoo run --trust-remote-code`) if you trust its author",
            )


def base_json(base: PathLike, name: str, revision: str | None = None) -> dict[str, Any]:
    """`name` of a local folder, or of a Hub repo (through transformers' cache, which `from_pretrained` then reuses);
    {} when there is none: loading reports that."""
    from zoo.formats.peft import read_json_config

    if Path(base).is_dir():
        path = Path(base) / name
    else:
        from transformers.utils import cached_file

        try:
            found = cached_file(
                str(base), name, revision=revision,
                _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
            )
        except (OSError, ValueError):  # not a repo id, offline without a cache: from_pretrained says so
            return {}
        if found is None:
            return {}
        path = Path(found)
    return read_json_config(path, name) if path.is_file() else {}
