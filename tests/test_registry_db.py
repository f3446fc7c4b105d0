"""The registry on a database: SQLite by default, PostgreSQL for a team (a real server, tests/pg.py), the JSON
file behind the same interface; referential integrity, gc, export/import, migration, and the team under load."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import time
import traceback
from pathlib import Path

import pytest

import zoo
from tests.handmade import write_adapter
from zoo.errors import ZooError
from zoo.manifest import CompositionManifest, MemberRef, SizeInfo, Source

FORK = multiprocessing.get_context("fork")


@pytest.fixture(params=["sqlite", "json", "postgresql"])
def backend(request, monkeypatch, isolated_zoo):
    """Each backend in turn as the default registry (ZOO_REGISTRY)."""
    if request.param == "json":
        monkeypatch.setenv("ZOO_REGISTRY", str(isolated_zoo / "zoo-home" / "registry.json"))
    elif request.param == "postgresql":
        monkeypatch.setenv("ZOO_REGISTRY", request.getfixturevalue("postgres_url"))
    return request.param


def stack(name: str, *members: str, registry=None) -> CompositionManifest:
    """Register a stack composition of registered adapters (no tensors needed)."""
    refs = [MemberRef(name=m.name, version=m.version, sha256=m.weights.sha256) for m in (zoo.show(x, registry=registry) for x in members)]
    manifest = CompositionManifest(
        name=name, fusion="stack", members=refs, size=SizeInfo(trainable_params=0, bytes=0), files=[],
        source=Source(kind="composition", members=refs, recipe={"fusion": "stack"}),
    )
    return zoo.api.register(manifest, registry=registry)


def one_line_error(code: int, err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


# --- referential integrity ------------------------------------------------------------------------------------


def test_remove_of_a_composition_member_refuses_and_cascade_removes_both(backend, tmp_path, zoo_cli):
    for i, name in enumerate(("a", "b", "c"), 1):
        zoo.add(write_adapter(tmp_path / name, i), name=name)
    stack("ab", "a", "b")
    stack("ac", "a", "c")
    code, out, err = zoo_cli("remove", "a")
    one_line_error(code, err, "a is a member of ab@1, ac@1")
    assert "--cascade" in err
    assert sorted(m.ref for m in zoo.list_adapters()) == ["a@1", "ab@1", "ac@1", "b@1", "c@1"]  # nothing removed
    assert [r.problem for r in zoo.verify()] == [None] * 6
    assert [m.ref for m in zoo.remove("ab")] == ["ab@1"]  # a composition itself goes
    code, out, err = zoo_cli("remove", "a", "--cascade")
    assert code == 0 and out.split("\n")[:2] == ["removed a@1", "removed ac@1"], err
    assert sorted(m.ref for m in zoo.list_adapters()) == ["b@1", "c@1"]


def test_a_composition_of_a_member_that_is_not_registered_is_refused(backend, tmp_path):
    zoo.add(write_adapter(tmp_path / "a", 1), name="a")
    zoo.add(write_adapter(tmp_path / "b", 2), name="b")
    pinned = stack("ab", "a", "b")
    ghost = pinned.model_copy(update={"name": "ghost", "members": [*pinned.members[:1], MemberRef(name="zz", version=1, sha256="0" * 64)]})
    with pytest.raises(ZooError, match="member zz@1 is not in the registry"):
        zoo.api.register(ghost)
    other = pinned.model_copy(update={"name": "other", "members": [pinned.members[0].model_copy(update={"sha256": "1" * 64})]})
    with pytest.raises(ZooError, match="member a@1 has other weights"):
        zoo.api.register(other)
    assert [m.name for m in zoo.list_adapters()] == ["a", "b", "ab"]


def test_verify_reports_dangling_members_of_a_registry_file(tmp_path, monkeypatch, zoo_cli):
    registry = tmp_path / "catalogue.json"
    monkeypatch.setenv("ZOO_REGISTRY", str(registry))
    zoo.add(write_adapter(tmp_path / "a", 1), name="a")
    zoo.add(write_adapter(tmp_path / "b", 2), name="b")
    stack("ab", "a", "b")
    data = json.loads(registry.read_text())
    data["adapters"] = [e for e in data["adapters"] if e["name"] != "a"]  # edited by hand: the member is gone
    registry.write_text(json.dumps(data))
    code, out, _ = zoo_cli("verify")
    assert code == 1 and "BAD ab@1 member a@1: dangling" in out, out
    # migrated into SQLite, the dangling reference is kept (nothing is lost) and still reported
    home = Path(os.environ["ZOO_HOME"])
    registry.rename(home / "registry.json")
    monkeypatch.delenv("ZOO_REGISTRY", raising=False)
    code, out, _ = zoo_cli("verify")
    assert code == 1 and "BAD ab@1 member a@1: dangling" in out, out
    assert (home / "registry.json.bak").is_file() and not (home / "registry.json").exists()


# --- gc -------------------------------------------------------------------------------------------------------


def test_gc_frees_what_remove_left_and_keeps_what_is_named(backend, tmp_path, zoo_cli):
    a = zoo.add(write_adapter(tmp_path / "a", 1), name="a")
    b = zoo.add(write_adapter(tmp_path / "b", 2), name="b")
    blobs = Path(os.environ["ZOO_HOME"]) / "blobs" / "sha256"
    zoo.remove("a")
    code, out, _ = zoo_cli("gc")
    weights = a.file("adapter_model.safetensors")
    assert code == 0 and out.splitlines() == [f"unused {weights.sha256} {weights.size} B", f"1 unused blob(s), {weights.size} B; `zoo gc --yes` deletes them"], out
    assert (blobs / weights.sha256).exists()  # a dry run
    code, out, _ = zoo_cli("gc", "--yes")
    assert code == 0 and f"freed {weights.size} B (1 blob(s))" in out
    assert sorted(p.name for p in blobs.iterdir() if not p.name.startswith(".")) == sorted(f.sha256 for f in b.files)  # the shared config stays
    assert [r.problem for r in zoo.verify()] == [None, None]


def _slow_add(folder: Path, started) -> None:
    """An add that stores its blobs, then takes a while before registering (as a big add does)."""
    from zoo import api

    real, calls = api.open_registry, []

    def slow(registry=None):
        calls.append(registry)
        if len(calls) == 2:  # in `register`: the blobs are stored, the entry not yet
            started.set()
            time.sleep(1.5)
        return real(registry)

    api.open_registry = slow
    zoo.api.register_folder(folder, name="late", source=Source(kind="local", path=str(folder)))


def test_gc_never_frees_the_blobs_of_an_add_in_flight(tmp_path, capfd):
    folder = write_adapter(tmp_path / "late", 7)
    started = FORK.Event()
    child = FORK.Process(target=_slow_add, args=(folder, started))
    child.start()
    assert started.wait(30)  # its blobs are in the store, its entry not yet
    garbage = zoo.api.gc(delete=True)  # waits for the add to commit
    child.join(30)
    assert child.exitcode == 0 and garbage == []
    assert "waiting for the adds in progress" in capfd.readouterr().err
    assert [r.problem for r in zoo.verify("late")] == [None, None]


def test_blobs_read_from_a_shared_store_are_hash_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_STORE", str(tmp_path / "nas"))
    m = zoo.add(write_adapter(tmp_path / "a", 1), name="a")
    blob = tmp_path / "nas" / "blobs" / "sha256" / m.weights.sha256
    blob.write_bytes(blob.read_bytes()[:-1] + b"x")  # another machine's bad write: same size, other bytes
    with pytest.raises(ZooError, match=r"a@1: the stored adapter_model.safetensors is corrupt \(sha256"):
        zoo.api.adapter_folder(m)


def test_gc_keeps_what_any_registry_of_the_store_names_and_refuses_on_doubt(tmp_path, zoo_cli):
    a = zoo.add(write_adapter(tmp_path / "a", 1), name="a")  # the default registry
    other = tmp_path / "other.json"
    b = zoo.add(write_adapter(tmp_path / "b", 2), name="b", registry=other)  # another registry, the same store
    blobs = Path(os.environ["ZOO_HOME"]) / "blobs" / "sha256"
    everything = sorted(p.name for p in blobs.iterdir())
    one_line_error(*zoo_cli("gc", "--yes", "--registry", str(tmp_path / "typo.db"))[::2], "has never written to the store")
    one_line_error(*zoo_cli("gc", "--yes", "--registry", "registry.json")[::2], "has never written to the store")
    for registry in (None, str(other)):
        code, out, err = zoo_cli("gc", "--yes", *(["--registry", registry] if registry else []))
        assert code == 0 and "freed 0 B (0 blob(s))" in out, out + err  # each registry keeps the other's blobs
    assert sorted(p.name for p in blobs.iterdir()) == everything
    other.rename(tmp_path / "moved.json")  # a registry that cannot be read: nothing is deleted
    zoo.remove("a")
    one_line_error(*zoo_cli("gc", "--yes")[::2], "also used by registry")
    assert sorted(p.name for p in blobs.iterdir()) == everything and a.weights.sha256 != b.weights.sha256


# --- what a failure leaves ------------------------------------------------------------------------------------


def test_an_add_whose_links_fail_registers_nothing(backend, tmp_path, monkeypatch, zoo_cli):
    """The disk fills (ENOSPC on inodes) while the link folder is made: exit 2 and no entry (was: registered)."""
    from zoo.store import Store

    def full(self, manifest):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(Store, "adapter_dir", full)
        code, out, err = zoo_cli("add", write_adapter(tmp_path / "a", 1), "--name", "a")
    one_line_error(code, err, "No space left on device")
    assert zoo.list_adapters() == []
    assert zoo.add(tmp_path / "a", name="a").ref == "a@1"  # and the next add just works


def test_a_postgresql_url_never_becomes_a_folder(tmp_path, monkeypatch, zoo_cli):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ZOO_REGISTRY", "postgresql://nobody@127.0.0.1:1/zoo")
    code, out, err = zoo_cli("list")
    one_line_error(code, err, "registry postgresql://nobody@127.0.0.1:1/zoo:")
    code, out, err = zoo_cli("add", write_adapter(tmp_path / "src", 1), "--registry", "postgresql://nobody@127.0.0.1:1/zoo")
    one_line_error(code, err, "registry postgresql://nobody@127.0.0.1:1/zoo:")
    assert not [p for p in tmp_path.rglob("postgresql*")]  # was: a folder named postgresql:


def test_a_waiting_writer_says_so_and_the_hint_never_says_delete_a_lock(tmp_path, monkeypatch, capfd):
    zoo.add(write_adapter(tmp_path / "a", 1), name="a")
    monkeypatch.setattr("zoo.registry_db.LOCK_TIMEOUT_S", 2)
    holder = sqlite3.connect(Path(os.environ["ZOO_HOME"]) / "registry.db")
    holder.execute("BEGIN IMMEDIATE")  # another writer, alive
    with pytest.raises(ZooError) as e:
        zoo.add(write_adapter(tmp_path / "b", 2), name="b")
    holder.rollback()
    assert "waiting for the registry" in capfd.readouterr().err
    assert "still held by another process" in str(e.value) and not any(w in str(e.value) for w in ("remove", "delete", ".lock"))
    assert [m.name for m in zoo.list_adapters()] == ["a"]
    # the JSON file's lock the same way
    from filelock import FileLock

    registry = tmp_path / "catalogue.json"
    monkeypatch.setattr("zoo.registry.LOCK_TIMEOUT_S", 2)
    with FileLock(str(registry) + ".lock"):  # held by another writer
        with pytest.raises(ZooError) as e:
            zoo.add(write_adapter(tmp_path / "c", 3), name="c", registry=registry)
    assert "waiting for the lock of registry" in capfd.readouterr().err and "remove" not in str(e.value)


# --- export / import / migration --------------------------------------------------------------------------------


def test_export_then_import_into_an_empty_machine(backend, tmp_path, monkeypatch, zoo_cli):
    for i, name in enumerate(("a", "b"), 1):
        zoo.add(write_adapter(tmp_path / "src" / name, i), name=name, task="t")
    stack("ab", "a", "b")
    code, _, err = zoo_cli("export", "--out", tmp_path / "team.json")
    assert code == 0 and "exported 3 entries" in err
    code, printed, _ = zoo_cli("export")
    written = json.loads((tmp_path / "team.json").read_text())["adapters"]
    assert [e["name"] for e in json.loads(printed)["adapters"]] == [e["name"] for e in written] == ["a", "b", "ab"]
    # local sources are recorded relative to the written file where they lie beside it (the file travels with them)
    assert [e["source"]["path"] for e in written[:2]] == ["src/a", "src/b"]
    assert json.loads(printed)["adapters"][0]["source"]["path"] == str(tmp_path / "src" / "a")

    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "other-machine"))  # an empty store and registry
    monkeypatch.delenv("ZOO_REGISTRY", raising=False)
    code, out, err = zoo_cli("import", tmp_path / "team.json")
    assert code == 0 and out.strip() == f"imported 3 entries from {tmp_path / 'team.json'}; 0 already there; 0 conflict(s)", out + err
    assert [m.ref for m in zoo.list_adapters()] == ["a@1", "b@1", "ab@1"]
    assert [r.problem for r in zoo.verify()] == [None] * 4  # blobs fetched from the recorded sources, hash-checked
    code, out, _ = zoo_cli("import", tmp_path / "team.json")
    assert code == 0 and "0 entries" in out and "3 already there" in out

    data = json.loads((tmp_path / "team.json").read_text())
    data["adapters"][0]["task"] = "changed"  # the same a@1 with other content
    (tmp_path / "source.json").write_text(json.dumps(data))
    (tmp_path / "src" / "b" / "adapter_model.safetensors").write_bytes(b"other")
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "third-machine"))
    code, out, _ = zoo_cli("import", tmp_path / "source.json")
    assert code == 1
    assert "conflict b@1: adapter_model.safetensors cannot be repaired: " in out and "now has sha256" in out  # its source changed: refused
    assert "conflict ab@1: ab: member b@1 is not in the registry" in out
    assert [m.ref for m in zoo.list_adapters()] == ["a@1"]
    code, out, _ = zoo_cli("import", tmp_path / "team.json")
    assert code == 1 and "conflict a@1: a@1 is already registered with other content" in out


def test_a_registry_json_in_zoo_home_is_migrated_on_first_use(tmp_path, monkeypatch):
    home = Path(os.environ["ZOO_HOME"])
    old = home / "registry.json"
    first = zoo.add(write_adapter(home / "kept" / "a", 1), name="a", registry=old)  # recorded relative to ZOO_HOME
    zoo.add(write_adapter(tmp_path / "b", 2), name="b", registry=old)
    stack("ab", "a", "b", registry=old)
    before = old.read_bytes()
    assert first.source.path == "kept/a"
    assert [m.ref for m in zoo.list_adapters()] == ["a@1", "b@1", "ab@1"]  # the default registry: registry.db
    assert not old.exists() and (home / "registry.json.bak").read_bytes() == before
    with pytest.raises(ZooError, match="a is a member of ab@1"):
        zoo.remove("a")
    (home / "blobs" / "sha256" / first.files[1].sha256).unlink()
    from zoo.repair import repair

    assert [r.error for r in repair()] == [None]  # the relative source still resolves


def test_a_newer_schema_is_refused(tmp_path, zoo_cli):
    zoo.add(write_adapter(tmp_path / "a", 1), name="a")
    db = sqlite3.connect(Path(os.environ["ZOO_HOME"]) / "registry.db")
    db.execute("UPDATE zoo_schema SET version = 99")
    db.commit()
    from zoo import registry_db

    registry_db._ready.clear()
    one_line_error(*zoo_cli("list")[::2], "has schema version 99")


def test_list_shows_the_first_rows_and_says_how_many_more(tmp_path, zoo_cli, monkeypatch):
    for i in range(4):
        zoo.add(write_adapter(tmp_path / f"a{i}", i + 1), name=f"a{i}", task="even" if i % 2 == 0 else "odd")
    monkeypatch.setattr("cli.main.LIST_ROWS", 3)
    code, out, err = zoo_cli("list")  # not a terminal: the rows on stdout, the count and what is left out on stderr
    assert code == 0 and "4 adapter version(s)" in err and "a2" in out and "a3" not in out and "… 1 more:" in err
    code, out, err = zoo_cli("list", "--limit", "1", "--task", "even")
    assert "2 adapter version(s)" in err and "a0" in out and "a2" not in out
    assert [e["name"] for e in json.loads(zoo_cli("list", "--json")[1])] == ["a0", "a1", "a2", "a3"]
    assert [e["name"] for e in json.loads(zoo_cli("list", "--json", "--limit", "2")[1])] == ["a0", "a1"]
    assert json.loads(zoo_cli("list", "--json", "--task", "none")[1]) == []
    one_line_error(*zoo_cli("list", "--limit", "-1")[::2], "negative")


# --- the team: two machines × 8 processes on PostgreSQL, one shared store ------------------------------------------------


def _team_worker(url: str, home: str, store: str, src: Path, worker: int, count: int) -> None:
    try:
        os.environ.update(ZOO_REGISTRY=url, ZOO_HOME=home, ZOO_STORE=store)
        mine = []
        for i in range(count):
            name = f"m{worker}-{i}"
            mine.append(zoo.add(write_adapter(src / name, worker * 1000 + i + 1), name=name))
            # every process publishes new versions of one shared thing: versions are assigned in the transaction
            zoo.api.register_folder(write_adapter(src / f"shared-{worker}-{i}", 10**6 + worker * 1000 + i), name="shared",
                                    source=Source(kind="local", path="/team/shared"), new_version_of_same_source=True)
            if i % 3 == 2:
                stack(f"s{worker}-{i}", mine[-1].name, mine[-2].name)
            if i % 4 == 3:
                zoo.remove(mine[-4].name)  # never a member: stacks use the last two
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def test_two_machines_times_8_processes_share_a_postgresql_registry_and_a_store(postgres_url, tmp_path, monkeypatch):
    store, count = tmp_path / "nas", 4
    workers = [
        FORK.Process(target=_team_worker, args=(postgres_url, str(tmp_path / f"machine{w % 2}"), str(store), tmp_path / "src", w, count))
        for w in range(16)
    ]
    start = time.perf_counter()
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=300)
    seconds = time.perf_counter() - start
    assert [p.exitcode for p in workers] == [0] * 16

    monkeypatch.setenv("ZOO_REGISTRY", postgres_url)
    monkeypatch.setenv("ZOO_STORE", str(store))
    refs = sorted(m.ref for m in zoo.list_adapters())
    added = {f"m{w}-{i}@1" for w in range(16) for i in range(count)}
    removed = {f"m{w}-{i - 3}@1" for w in range(16) for i in range(count) if i % 4 == 3}
    stacks = {f"s{w}-{i}@1" for w in range(16) for i in range(count) if i % 3 == 2}
    expected = sorted(added - removed | stacks | {f"shared@{v}" for v in range(1, 16 * count + 1)})
    assert refs == expected
    assert [r for r in zoo.verify() if r.problem] == []  # every blob in the shared store, intact; no member dangling
    named = {f.sha256 for m in zoo.list_adapters() for f in m.files}
    garbage = {g.sha256 for g in zoo.api.gc()}  # the team registry may collect the shared store: just the removed weights
    assert len(garbage) == len(removed) and not garbage & named
    print(f"\n16 processes on 2 ZOO_HOMEs: {len(refs)} entries, {16 * count * 2} adds + stacks + removes in {seconds:.1f} s")


def test_writers_killed_at_random_moments_lose_nothing_committed_on_postgresql(postgres_server, tmp_path, monkeypatch):
    """The SIGKILL test of test_reliability.py against the team registry (a fresh database per trial): what a
    killed writer's transaction did is all there or not at all, and the next writer just works."""
    import random
    import signal

    from tests import pg
    from tests.test_reliability import _read_reports, _wait_for_operations, _writer, check_after_kill, in_child

    rng, after_a_commit = random.Random(7), 0
    for trial in range(10):
        home = tmp_path / f"t{trial}" / "home"
        monkeypatch.setenv("ZOO_HOME", str(home))
        monkeypatch.setenv("ZOO_REGISTRY", pg.fresh_database(postgres_server, f"kill_{trial}"))
        read_end, write_end = os.pipe()
        child = FORK.Process(target=in_child, args=(_writer, home, write_end, trial))
        child.start()
        os.close(write_end)
        seen = _wait_for_operations(read_end, rng.randrange(1, 4) if trial % 2 else 0)  # as in test_reliability
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL, f"trial {trial}: the writer failed before the kill"
        reports = _read_reports(read_end, seen)
        os.close(read_end)
        check_after_kill(reports, home, os.environ["ZOO_REGISTRY"])
        after_a_commit += any(line.startswith("+ ") for line in reports)
        assert [r.problem for r in zoo.verify()] == [None] * (2 * len(zoo.list_adapters()))
        assert zoo.add(write_adapter(home.parent / "after", 0), name="after").ref == "after@1"
    assert after_a_commit >= 5  # the kills landed after real work


def test_a_postgresql_server_that_never_answers_fails_in_one_line_within_seconds_and_hides_passwords(monkeypatch, zoo_cli):
    import socket

    import zoo.registry_db

    monkeypatch.setattr(zoo.registry_db, "CONNECT_TIMEOUT_S", 1)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts connections; nobody ever answers
    port = silent.getsockname()[1]
    start = time.monotonic()
    code, _, err = zoo_cli("list", "--registry", f"postgresql://u:secret1@127.0.0.1:{port}/db?password=secret2")
    silent.close()
    assert time.monotonic() - start < 20
    one_line_error(code, err, f"127.0.0.1:{port}")
    assert "secret" not in err, err
