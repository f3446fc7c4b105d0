"""Checks on input the zoo does not trust, where no format module owns them.

- An adapter folder's files must not be symlinks leading out of it: `zoo add` copies what it reads into the
  store (and `zoo push` to the Hub), so a link to `~/.ssh/id_rsa` named `adapter_config.json` would leak it.
  Each file is opened once, without following links out of the folder, and copied; only the copy is read.
- A base model whose config maps transformers' Auto classes to code shipped with the model (`auto_map`) is
  loaded only when the caller passed `trust_remote_code=True`: it is never implied, and transformers is never
  left to ask on the terminal.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from zoo.errors import ZooError

PathLike = str | os.PathLike


_MAX_LINKS = 40  # as the kernel allows in one path


def open_inside(folder: Path, name: str) -> int | None:
    """A read-only descriptor of the regular file `name` of `folder`, or None if there is none.

    The path is walked one component at a time from `folder`, each opened with `O_NOFOLLOW`: a link is
    followed only by reading it here and only while it stays inside `folder`, so a file swapped for a link
    to `~/.ssh/id_rsa` at any moment is refused, never opened. The caller reads the file through this one
    descriptor (`zoo add` copies it into the store, then parses and hashes the copy).
    """
    root = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the folder itself as the user named it
    dirs, todo, links = [root], name.split("/"), 0
    try:
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if len(dirs) == 1:
                    raise _outside(folder, name)
                os.close(dirs.pop())
                continue
            last = not todo
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)  # a FIFO must not block
            try:
                fd = os.open(part, flags, dir_fd=dirs[-1])
            except FileNotFoundError:
                return None
            except OSError as e:
                links += 1
                try:
                    target = os.readlink(part, dir_fd=dirs[-1])
                except FileNotFoundError:
                    return None
                except OSError as not_a_link:
                    if not_a_link.errno != errno.EINVAL or links > _MAX_LINKS:
                        raise e from None
                    todo.insert(0, part)  # swapped back for a file meanwhile: open it again
                    continue
                if links > _MAX_LINKS or target.startswith("/"):
                    raise _outside(folder, name) from None
                todo[:0] = target.split("/")
                continue
            if not last:
                dirs.append(fd)
                continue
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ZooError(f"{Path(folder) / name} is not a regular file", "an adapter folder holds plain files")
            os.set_blocking(fd, True)
            return fd
        return None
    finally:
        for d in dirs:
            os.close(d)


def _outside(folder: Path, name: str) -> ZooError:
    path = Path(folder) / name
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return ZooError(f"{path} is a symlink to {target}, outside the adapter folder", "copy the file into the folder: zoo never follows links out of it")


def copy_inside(folder: Path, names: Iterable[str], dest: Path) -> list[str]:
    """Copy the files `names` of `folder` that exist into `dest` (opened once each by `open_inside`); returns
    the names copied (the store fsyncs what it keeps). What is parsed, hashed and stored afterwards is this copy, never the folder."""
    copied = []
    for name in names:
        fd = open_inside(Path(folder), name)
        if fd is None:
            continue
        with os.fdopen(fd, "rb") as f, open(dest / name, "xb") as out:
            while os.sendfile(out.fileno(), f.fileno(), None, 1 << 30):  # in the kernel: no buffer here
                pass
        copied.append(name)
    return copied


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
        config = _config(base, name, revision)
        if classes := remote_code_classes(config):
            raise ZooError(
                f"base model {str(base)!r} needs its own code to load ({', '.join(classes)} in {name}), which zoo does not run unless asked",
                "pass trust_remote_code=True (`zoo run --trust-remote-code`) if you trust its author",
            )


def _config(base: PathLike, name: str, revision: str | None) -> dict[str, Any]:
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
