"""A throwaway PostgreSQL server for the team-registry tests (standard library only, so `.ci/run` uses it too).

Debian's `postgresql` binaries (`/usr/lib/postgresql/<version>/bin`): `initdb` in a temp folder (as the
`postgres` user when we are root: PostgreSQL refuses to run as root), `pg_ctl start` listening on 127.0.0.1
on a free port, trust authentication, fsync off (a test server: the page cache is enough).

    python3 tests/pg.py start DIR   # prints the URL
    python3 tests/pg.py stop DIR
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql")
    return Path(found[-1])


def _as_owner(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path) -> str:
    """Initialise and start a server under `root`; returns its URL (`postgresql://postgres@127.0.0.1:PORT/postgres`)."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        for parent in root.parents:  # the postgres user must reach its folder
            if parent == Path(parent.anchor):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o001)
    run = lambda args: subprocess.run(_as_owner(args), check=True, capture_output=True, text=True)  # noqa: E731
    run([str(bindir() / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
    port = _free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    run([str(bindir() / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "-t", "60", "start"])
    (root / "url").write_text(url := f"postgresql://postgres@127.0.0.1:{port}/postgres")
    return url


def stop(root: Path) -> None:
    subprocess.run(_as_owner([str(bindir() / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "-w", "stop"]), capture_output=True)


def fresh_database(server_url: str, name: str) -> str:
    """A new empty database on the server; its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + "/" + name


if __name__ == "__main__":
    command, folder = sys.argv[1], Path(sys.argv[2])
    if command == "start":
        print(start(folder))
    else:
        stop(folder)
