"""Where the zoo keeps things.

- `ZOO_HOME`: this machine's folder (default `$XDG_DATA_HOME/adapter-zoo`): the default registry database
  `registry.db` and, unless `ZOO_STORE` names a shared one, the blob store.
- `ZOO_STORE`: a blob store shared by several machines (a NAS folder); each machine keeps its own `ZOO_HOME`.
- `ZOO_REGISTRY` (or `--registry`): which registry: `postgresql://user@host:port/db` (a team's), a `*.json` file
  (the interchange format, e.g. the repo's catalogue), or an SQLite file (`*.db`, `sqlite:///path`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from zoo.errors import ZooError


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
    would fold `//` and make a folder named `postgresql:`), paths with `~` expanded. What cannot be a registry
    (see `check_location`) is refused in one line."""
    given = os.fspath(explicit) if explicit is not None else os.environ.get("ZOO_REGISTRY")
    if given is None:
        return str(zoo_home() / "registry.db")  # the default: its folder is made on the first write
    check_location(given)
    return given if is_url(given) else str(Path(given).expanduser())


#: `word:` or `word+word:` at the start: a URL's scheme, never a file name (a file named so is written `./x`).
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9.-]*(\+[A-Za-z0-9.-]+)?:")
_URL_FORMS = "postgresql://user@host:port/db, sqlite:///path, a *.db file or a *.json file"


def is_url(location: str) -> bool:
    """Whether `location` starts with a scheme (`postgresql:`, `sqlite:`, a mistyped one too)."""
    return bool(_SCHEME.match(location))


def check_location(location: str) -> None:
    """Refuse, in one line, a registry location that is a mistyped URL, a scheme zoo does not speak, an
    in-memory database (nothing would persist), blank or padded text, or a path that is no registry file: a
    missing folder other than ZOO_HOME (a typo, never made silently) or something other than a regular file (a FIFO hangs)."""
    fix = f"write {_URL_FORMS}"
    if not location.strip() or location == "-":
        raise ZooError(f"invalid registry {location!r}", fix)
    if location != location.strip():
        raise ZooError(f"invalid registry {location!r}: it starts or ends with a space", "remove the spaces")
    if location == ":memory:" or location.startswith("sqlite://") and location.endswith(":memory:") or location == "sqlite://":
        raise ZooError(f"invalid registry {location!r}: an in-memory database keeps nothing", fix)
    if is_url(location):
        scheme, _, rest = location.partition(":")
        if scheme.lower() not in ("postgresql", "postgres", "postgresql+psycopg", "sqlite") or not rest.startswith("//"):
            raise ZooError(f"invalid registry URL {location!r}", fix)
        if scheme.lower() != "sqlite":
            return
        if not rest.startswith("///") or len(rest) == 3:
            raise ZooError(f"invalid registry URL {location!r}", "write sqlite:///relative/path.db or sqlite:////absolute/path.db")
        path = Path(rest[3:].split("?", 1)[0]).expanduser()
    else:
        path = Path(location).expanduser()
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise ZooError(f"registry {path} is {kind}", "point --registry / ZOO_REGISTRY at a registry file (*.db or *.json)")
    if not path.absolute().parent.is_dir() and path.absolute().parent != zoo_home().absolute():  # ZOO_HOME is made on first write
        raise ZooError(f"the folder of registry {path} does not exist", f"create {path.absolute().parent} first, or fix the path")
