"""Registry references, `NAME` or `NAME@VERSION`: one parser, so every command reads a reference the same way.

A version is ASCII digits without a leading zero (`s@2`, never `s@02`, `s@²` or `s@١`, which Python's
`str.isdigit` and `int` would accept and turn into some other version). Anything that is not a reference is
a path: a name never holds '/', so `./s` (or an absolute path) names the folder `s`, and a bare `s` always
means the registry entry, never a folder of that name that happens to be in the working directory.
"""

from __future__ import annotations

import os
import re

from zoo.errors import ZooError
from zoo.manifest import check_name

_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")  # ASCII only; 18 digits fit any int the manifest holds
_REF_HINT = "use NAME or NAME@VERSION with a whole-number version, e.g. sql@2 (a folder: ./NAME)"


def split_ref(ref: str) -> tuple[str, int | None]:
    """'name' → (name, None); 'name@3' → (name, 3).

    Raises:
        ZooError: `ref` is not a valid name, or its version is not a plain positive whole number.
    """
    name, sep, version = ref.partition("@")
    if sep and not _VERSION_RE.fullmatch(version):
        raise ZooError(f"invalid reference {ref!r}", _REF_HINT)
    try:
        check_name(name)
    except ZooError:
        raise ZooError(f"invalid reference {ref!r}", _REF_HINT) from None
    return name, int(version) if sep else None


def is_ref(text: str) -> bool:
    """Whether `text` reads as a registry reference."""
    try:
        split_ref(text)
    except ZooError:
        return False
    return True


def is_path(text: str) -> bool:
    """Whether a command that takes an entry or a path should read `text` as a path: it has a path separator or
    starts with '.' or '~' (`./s`, `/abs/s`, `~/s`), or it is no reference but names something on disk (`my folder`).
    Anything else is a reference, and a malformed one (`s@01`) gets the reference's own error, not "no such file"."""
    return "/" in text or os.sep in text or text.startswith((".", "~")) or (not is_ref(text) and os.path.lexists(text))
