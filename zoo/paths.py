"""Where the zoo keeps things.

- `ZOO_HOME`: this machine's folder (default `$XDG_DATA_HOME/adapter-zoo`): the default registry database
  `registry.db` and, unless `ZOO_STORE` names a shared one, the blob store.
- `ZOO_STORE`: a blob store shared by several machines (a NAS folder); each machine keeps its own `ZOO_HOME`.
- `ZOO_REGISTRY` (or `--registry`): which registry: `postgresql://user@host:port/db` (a team's), a `*.json` file
  (the interchange format, e.g. the repo's catalogue), or an SQLite file (`*.db`, `sqlite:///path`).
"""

from __future__ import annotations

import os
from pathlib import Path


def zoo_home() -> Path:
    """This machine's zoo folder: `$ZOO_HOME`, else `$XDG_DATA_HOME/adapter-zoo`, else `~/.local/share/adapter-zoo`."""
    if home := os.environ.get("ZOO_HOME"):
        return Path(home).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "adapter-zoo"


def store_root() -> Path:
    """The blob store: `$ZOO_STORE` (shared by a team), else `$ZOO_HOME`."""
    if store := os.environ.get("ZOO_STORE"):
        return Path(store).expanduser()
    return zoo_home()


def store_is_shared() -> bool:
    """Blobs live in a store other machines write too (`$ZOO_STORE`): what is read from it is hash-checked."""
    return bool(os.environ.get("ZOO_STORE"))


def registry_location(explicit: str | os.PathLike | None = None) -> str:
    """The registry: the explicit location, else `$ZOO_REGISTRY`, else `<zoo home>/registry.db`.

    A location is a URL (`postgresql://…`, `sqlite:///…`) or a path; URLs are returned as they are (a `Path`
    would fold `//` and make a folder named `postgresql:`), paths with `~` expanded."""
    location = os.fspath(explicit) if explicit else os.environ.get("ZOO_REGISTRY") or str(zoo_home() / "registry.db")
    return location if is_url(location) else str(Path(location).expanduser())


def is_url(location: str) -> bool:
    return "://" in location and location.split("://", 1)[0].replace("+", "").isalpha()
