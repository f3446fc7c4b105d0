"""Secrets: a planted Hub token — in `HF_TOKEN`, in the token file `hf auth login` writes, and a wrong one — shows up
in no output stream, log record, exception (with its chain), manifest, card, registry, store file or request
other than the Authorization header, after push, pull, search and their error paths.

adapter-zoo has no `--token` option (a token on the command line lands in shell history and `ps`): the client
takes it from `HF_TOKEN` or the token file, which is what these tests plant.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import traceback
from pathlib import Path

import pytest

import zoo
from tests.handmade import write_adapter
from tests.hubserver import PLANTED_TOKEN, HubServer
from zoo.errors import ZooError

WRONG = "hf_WRONG_" + secrets.token_hex(16)
BASE = "org/tiny-base"


def chain(e: BaseException) -> str:
    """Everything an exception can show: its traceback text, with every cause and (even suppressed) context."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts += [str(e), repr(e), *traceback.format_exception(e)]
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


@pytest.fixture
def captured_logs():
    """Every log record of every logger, down to DEBUG (the Hub client's, httpx's, ours)."""
    stream, root = io.StringIO(), logging.getLogger()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s %(args)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_a_planted_token_appears_nowhere(tmp_path, monkeypatch, zoo_cli, captured_logs):
    texts: list[str] = []  # every output stream and exception we saw

    def cli(expected_code: int, *args: str) -> str:
        code, out, err = zoo_cli(*args)
        texts.append(out + err)
        assert code == expected_code, (args, out, err)
        return err

    def api_error(call, *args, **kwargs) -> ZooError:
        with pytest.raises(ZooError) as caught:
            call(*args, **kwargs)
        texts.append(chain(caught.value))
        return caught.value

    for seed, name in enumerate(("sql", "chat"), 1):
        folder = write_adapter(tmp_path / name, seed)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": BASE, "task_type": "CAUSAL_LM"}))
        zoo.add(folder, name=name, task="demo")

    hf_home = tmp_path / "hf-home"
    with HubServer(token=PLANTED_TOKEN) as server:
        server.configure_client(monkeypatch, hf_home)  # HF_TOKEN=PLANTED_TOKEN
        cli(0, "push", "sql", "org/sql", "--private")
        cli(0, "push", "sql", "org/sql", "--branch", "dev")
        cli(0, "pull", "org/sql", "--name", "sql-copy")
        cli(0, "pull", "org/sql@dev", "--name", "sql-dev", "--json")
        cli(0, "search", "--base", BASE)
        cli(0, "search", "--base", BASE, "--json")
        cli(2, "pull", "org/missing")
        cli(2, "pull", "org/sql@nope")
        cli(2, "push", "nobody", "org/x")
        api_error(zoo.pull, "org/missing")
        api_error(zoo.pull, "org/sql@nope")

        monkeypatch.setenv("HF_TOKEN", WRONG)  # a wrong token: refused, and quoted nowhere either
        assert "authentication failed" in cli(2, "push", "chat", "org/chat")
        assert "authentication failed" in cli(2, "pull", "org/sql")
        api_error(zoo.push, "chat", "org/chat")
        api_error(zoo.search, BASE)  # a private repo's listing needs the token; a wrong one is a 401

        monkeypatch.delenv("HF_TOKEN")  # the token only in the file `hf auth login` writes
        (hf_home / "token").write_text(PLANTED_TOKEN)
        cli(0, "push", "chat", "org/chat")
        cli(0, "pull", "org/chat", "--name", "chat-copy")
        requests = server.requests
        stored = [b.data for repo in server.repos.values() for c in repo.commits.values() for b in c.tree.values()]
        stored += list(server.lfs_objects.values())
    with HubServer(token=PLANTED_TOKEN) as gone:  # a server that is gone (never called: no pooled connection outlives it)
        gone.configure_client(monkeypatch, hf_home)
    assert "cannot reach" in cli(2, "pull", "org/chat@main")
    api_error(zoo.pull, "org/sql@dev")  # (not search: the client retries listings for 24 s before it gives up)

    # it really was used: writes went through authorized, and the wrong token met 401s
    assert any(r.method == "POST" and "/commit/" in r.path and r.authorized for r in requests)
    assert any(r.status == 401 for r in requests)
    logs = captured_logs.getvalue()
    assert "org/sql" in logs  # the client's own records were captured
    for secret in (PLANTED_TOKEN, WRONG):
        for text in texts + [logs]:
            assert secret not in text, text
        assert not any(secret.encode() in data for data in stored)  # cards, zoo.json, weights on the Hub
        assert all(secret not in r.path and not any(secret in v for v in r.headers.values()) for r in requests)
        for path in tmp_path.rglob("*"):  # registry, manifests, store, adapter folders, the client's cache
            if path.is_file() and path != hf_home / "token":
                assert secret.encode() not in path.read_bytes(), path
    assert Path(hf_home / "token").read_text() == PLANTED_TOKEN  # the one place it belongs, untouched
