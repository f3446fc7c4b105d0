"""Reliability: concurrent adds all land; a SIGKILL at any moment of a write loses nothing committed; a
half-written blob is never registered; leftover temp files break nothing.

Writers are forked from this (already importing) test process, so each starts in about a millisecond.
Adapters are tiny PEFT LoRA folders written byte by byte (`tests/handmade.py`, no torch), distinct per add
so every add stores a new blob.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path

import pytest

import zoo
from tests.handmade import PREFIX, safetensors_bytes, write_adapter
from zoo.store import sha256_file

FORK = multiprocessing.get_context("fork")


def in_child(body, *args) -> None:
    """Run `body(*args)` in a forked child; a failure is printed there and shows as exit code 1."""
    try:
        body(*args)
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def store_is_sound(home: Path) -> list[str]:
    """Every blob named by a hash holds bytes with that hash (temp files are dot-files, never named so)."""
    blobs = home / "blobs" / "sha256"
    names = [p for p in blobs.iterdir() if not p.name.startswith(".")] if blobs.is_dir() else []
    return [p.name for p in names if sha256_file(p)[0] != p.name]


def incoming(home: Path) -> list[Path]:
    """The store's temp folders (a writer's copies before they are renamed into blobs)."""
    folder = home / "blobs" / "incoming"
    return sorted(folder.glob(".incoming-*")) if folder.is_dir() else []


# --- 16 processes × 50 adds ---------------------------------------------------------------------------------


def _add_fifty(root: Path, worker: int) -> None:
    for i in range(50):
        zoo.add(write_adapter(root / f"w{worker}-{i}", worker * 100 + i + 1), name=f"w{worker}-{i}")


@pytest.fixture
def memory_home(monkeypatch):
    """ZOO_HOME on tmpfs where there is one. What 800 concurrent adds test is the lock and the atomic
    replace, whose semantics tmpfs shares; it spares the test 4,000 fsyncs that a SIGKILL could never
    test anyway (the page cache survives a killed process; the tests below run on disk)."""
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None, prefix="zoo-reliability-"))
    monkeypatch.setenv("ZOO_HOME", str(root / "home"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_16_processes_times_50_concurrent_adds_all_land(memory_home):
    start = time.perf_counter()
    workers = [FORK.Process(target=in_child, args=(_add_fifty, memory_home / "src", w)) for w in range(16)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=240)
    seconds = time.perf_counter() - start
    assert [p.exitcode for p in workers] == [0] * 16

    entries = zoo.list_adapters()
    assert sorted(m.name for m in entries) == sorted(f"w{w}-{i}" for w in range(16) for i in range(50))
    assert {m.version for m in entries} == {1}
    results = zoo.verify()
    assert len(results) == 1600 and [r for r in results if r.problem] == []
    home = memory_home / "home"
    assert len(list((home / "blobs" / "sha256").iterdir())) == 801  # 800 weights + the one shared config; no temp left
    assert store_is_sound(home) == []
    print(f"\n800 concurrent adds (16 processes) in {seconds:.1f} s")


# --- SIGKILL at random moments ------------------------------------------------------------------------------


def _writer(home: Path, report_fd: int, seed: int) -> None:
    """Add and remove adapters forever, reporting each operation before it starts ('?') and once it returned."""
    rng = random.Random(seed)
    live: list[str] = []

    def say(line: str) -> None:
        os.write(report_fd, (line + "\n").encode())  # < PIPE_BUF: atomic

    for i in range(10**6):
        if live and rng.random() < 0.3:
            victim = live.pop(rng.randrange(len(live)))
            say(f"? - {victim}")
            zoo.remove(victim)
            say(f"- {victim}")
        else:
            name = f"a{i}"
            folder = write_adapter(home.parent / "src" / name, seed * 10**6 + i + 1)
            say(f"? + {name}")
            zoo.add(folder, name=name)
            say(f"+ {name}")
            live.append(name)


def _wait_for_operations(fd: int, n: int) -> bytes:
    """Read the writer's reports until `n` operations have returned; the bytes read so far."""
    seen = b""
    while sum(not line.startswith(b"?") for line in seen.split(b"\n")[:-1]) < n and (chunk := os.read(fd, 1 << 16)):
        seen += chunk
    return seen


def _read_reports(fd: int, seen: bytes = b"") -> list[str]:
    chunks = [seen]
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode().splitlines()


def check_after_kill(reports: list[str], home: Path, registry: str | None = None) -> dict[str, int]:
    """The registry (default: the SQLite one in `home`) loads and holds exactly what was committed, give or
    take the one operation in flight."""
    committed: set[str] = set()
    in_flight = None
    for line in reports:
        if line.startswith("? "):
            in_flight = line[2:]
        else:
            op, name = line.split()
            committed.add(name) if op == "+" else committed.discard(name)
            in_flight = None
    names = {m.name for m in zoo.api.open_registry(registry or str(home / "registry.db")).read()}
    maybe_added = {in_flight[2:]} if in_flight and in_flight[0] == "+" else set()
    maybe_removed = {in_flight[2:]} if in_flight and in_flight[0] == "-" else set()
    assert committed - maybe_removed <= names <= committed | maybe_added, (sorted(committed), sorted(names), in_flight)
    return {"committed": len(committed), "registry_temp_left": len(list(home.glob(".registry.*"))),
            "blob_temp_left": len(incoming(home))}


def test_sigkill_at_random_moments_never_loses_a_committed_entry(tmp_path, monkeypatch):
    rng = random.Random(2024)
    totals = {"committed": 0, "registry_temp_left": 0, "blob_temp_left": 0, "trials_after_a_commit": 0}
    start = time.perf_counter()
    for trial in range(100):
        home = tmp_path / f"t{trial}" / "home"
        monkeypatch.setenv("ZOO_HOME", str(home))  # forked children inherit it
        read_end, write_end = os.pipe()
        child = FORK.Process(target=in_child, args=(_writer, home, write_end, trial))
        child.start()
        os.close(write_end)
        # Every other trial lets the writer finish a random number of operations first, so that kills land
        # after real work however loaded the machine is; the others may kill it anywhere, start-up included.
        seen = _wait_for_operations(read_end, rng.randrange(1, 4) if trial % 2 else 0)
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL, f"trial {trial}: the writer failed before the kill"
        reports = _read_reports(read_end, seen)
        os.close(read_end)
        for key, n in check_after_kill(reports, home).items():
            totals[key] += n
        totals["trials_after_a_commit"] += any(line[0] == "+" for line in reports)
        # the lock died with the process; leftover temp files are ignored: the next writer just works
        assert [r.problem for r in zoo.verify()] == [None] * (2 * len(zoo.list_adapters()))
        assert zoo.add(write_adapter(home.parent / "after", 0), name="after").ref == "after@1"
        assert store_is_sound(home) == []
    seconds = time.perf_counter() - start
    assert totals["trials_after_a_commit"] >= 50  # the kills landed after real work, not only at start-up
    print(f"\n100 SIGKILL trials in {seconds:.1f} s: {totals}")


_CRASH_POINTS = ("fsync", "replace")


def _crash_at(call: str, n: int, home: Path, report_fd: int) -> None:
    """Die (SIGKILL) at the n-th os.<call> — inside Store.put, Registry._write or the directory fsyncs."""
    original, count = getattr(os, call), [0]

    def dying(*args, **kwargs):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(os, call, dying)
    _writer(home, report_fd, n)


@pytest.mark.parametrize("call", _CRASH_POINTS)
def test_sigkill_at_every_fsync_and_rename_of_the_first_writes(call, tmp_path, monkeypatch):
    """Deterministic sweep: the writer dies at its 1st, 2nd, ... 16th fsync (or rename), i.e. at each step of
    storing blobs, writing the index and syncing directories over its first operations."""
    for n in range(1, 17):
        home = tmp_path / f"{call}{n}" / "home"
        monkeypatch.setenv("ZOO_HOME", str(home))
        read_end, write_end = os.pipe()
        child = FORK.Process(target=in_child, args=(_crash_at, call, n, home, write_end))
        child.start()
        os.close(write_end)
        child.join(timeout=60)
        assert child.exitcode == -signal.SIGKILL, f"{call} #{n}: the writer was not killed"
        reports = _read_reports(read_end)
        os.close(read_end)
        check_after_kill(reports, home)
        assert store_is_sound(home) == []
        assert zoo.add(write_adapter(home.parent / "after", 0), name="after").version == 1


# --- a half-written blob ------------------------------------------------------------------------------------


def _big_adapter(folder: Path, megabytes: int) -> Path:
    """A PEFT folder whose weights are `megabytes` of zeros (sparse: costs no disk to create)."""
    rows = megabytes * (1 << 20) // 32  # lora_A (rows × 4) and lora_B (4 × rows) in fp32
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rows, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    header = {
        PREFIX + "lora_A.weight": {"dtype": "F32", "shape": [rows, 4], "data_offsets": [0, rows * 16]},
        PREFIX + "lora_B.weight": {"dtype": "F32", "shape": [4, rows], "data_offsets": [rows * 16, rows * 32]},
    }
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.write(safetensors_bytes(header))
        f.truncate(f.tell() + rows * 32)
    return folder


def test_a_half_written_blob_is_never_registered_and_the_next_add_removes_the_leftovers(tmp_path, isolated_zoo):
    home = isolated_zoo / "zoo-home"
    folder = _big_adapter(tmp_path / "big", 32)
    weights_size = (folder / "adapter_model.safetensors").stat().st_size

    child = FORK.Process(target=in_child, args=(lambda: zoo.add(folder, name="big"),))
    child.start()
    deadline = time.monotonic() + 60
    partial = []
    while time.monotonic() < deadline and not partial:  # kill once a temp file in the store holds some bytes
        partial = [p for d in incoming(home) for p in d.glob("*") if p.name != ".lock" and p.stat().st_size > 0]
        time.sleep(0.001)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL and partial, "the kill did not land inside the copy"
    leftover = incoming(home)
    assert leftover, "the killed writer's temp folder should still be there for this test to mean anything"

    assert zoo.list_adapters() == []  # nothing registered
    assert store_is_sound(home) == []  # no blob under a hash its bytes do not have
    (home / ".registry.json.leftover").write_text('{"torn": ')  # and a torn index temp file, as a kill leaves it

    m = zoo.add(folder, name="big")  # the next add just works, and removes the dead writer's leftovers
    assert [r.problem for r in zoo.verify()] == [None, None]
    assert m.file("adapter_model.safetensors").size == weights_size
    assert incoming(home) == [] and not any(p.exists() for p in leftover)
    from zoo.repair import repair

    assert repair() == []


def _hold_a_temp_folder(home: Path, ready_fd: int) -> None:
    """A live writer: takes a store temp folder, says where, and waits (until killed)."""
    with zoo.api.open_store().staging() as stage:
        (stage / "half.safetensors").write_bytes(b"x" * 100)
        os.write(ready_fd, str(stage).encode())
        time.sleep(60)


def test_a_live_writers_temp_folder_is_never_swept(tmp_path, isolated_zoo):
    home = isolated_zoo / "zoo-home"
    read_end, write_end = os.pipe()
    child = FORK.Process(target=in_child, args=(_hold_a_temp_folder, home, write_end))
    child.start()
    os.close(write_end)
    stage = Path(os.read(read_end, 4096).decode())
    os.close(read_end)
    try:
        zoo.add(write_adapter(tmp_path / "a", 1), name="a")  # a writer in another process sweeps, once
        from compose.durable import sweep

        assert sweep(home / "blobs" / "incoming", ".incoming-") == []  # and so does an explicit sweep
        assert (stage / "half.safetensors").read_bytes() == b"x" * 100  # the live writer's copy is untouched
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert sweep(home / "blobs" / "incoming", ".incoming-") == [stage]  # its writer gone, it goes too
