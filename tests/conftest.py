"""Test isolation: every test gets its own store and registry, and nothing reaches the network but the local
Hub server of the `server` fixture."""

from __future__ import annotations

import os

import pytest

# huggingface_hub reads these once, at import: set them before any test module imports transformers
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def isolated_zoo(tmp_path, monkeypatch):
    """A fresh ZOO_HOME (its SQLite registry, its store) per test; the Hub client is offline unless a test starts a server."""
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "zoo-home"))
    monkeypatch.delenv("ZOO_REGISTRY", raising=False)
    monkeypatch.delenv("ZOO_STORE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return tmp_path


@pytest.fixture
def zoo_cli():
    """`zoo_cli("list", "--json")` runs the CLI in-process and returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from cli.main import main

    def run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A Hub server (tests/hubserver.py) that requires PLANTED_TOKEN for writes and private repos; the in-process
    client points at it with that token. Fails the test if a request crashed the server."""
    from tests.hubserver import PLANTED_TOKEN, HubServer

    with HubServer(token=PLANTED_TOKEN) as hub_server:
        hub_server.configure_client(monkeypatch, tmp_path / "hf-home")
        yield hub_server
    assert hub_server.errors == [], hub_server.errors[0]


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server's URL: `$ZOO_TEST_POSTGRES` (CI starts one, see .ci/run), else a throwaway server
    started here from Debian's binaries (tests/pg.py) and stopped at the end. Never skipped."""
    if url := os.environ.get("ZOO_TEST_POSTGRES"):
        yield url
        return
    import shutil
    import tempfile
    from pathlib import Path

    from tests import pg

    root = Path(tempfile.mkdtemp(prefix="zoo-postgres-"))  # not under pytest's basetemp: 0700, and pruned by other runs
    try:
        yield pg.start(root / "server")
    finally:
        pg.stop(root / "server")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request):
    """A fresh, empty database on the test server for this test."""
    import re

    from tests import pg

    return pg.fresh_database(postgres_server, "t_" + re.sub(r"\W", "_", request.node.name.lower())[:50])
