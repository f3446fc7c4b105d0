"""Where the zoo keeps things: `ZOO_HOME` for the store, `ZOO_REGISTRY` (or `--registry`) for the index."""

from __future__ import annotations

import os
from pathlib import Path


def zoo_home() -> Path:
    """The store's root: `$ZOO_HOME`, else `$XDG_DATA_HOME/adapter-zoo`, else `~/.local/share/adapter-zoo`."""
    if home := os.environ.get("ZOO_HOME"):
        return Path(home).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "adapter-zoo"


def registry_path(explicit: str | os.PathLike | None = None) -> Path:
    """The registry file: the explicit path, else `$ZOO_REGISTRY`, else `<zoo home>/registry.json`."""
    if explicit:
        return Path(explicit).expanduser()
    if env := os.environ.get("ZOO_REGISTRY"):
        return Path(env).expanduser()
    return zoo_home() / "registry.json"
