"""Store integrity: blobs are trusted only once hashed (dedupe, every read path), `zoo add` stores exactly the
bytes it parsed and never a file swapped for a link, and a full disk (blocks or inodes) or SIGTERM leaves the
whole entry or nothing.

Adapters are tiny PEFT LoRA folders written byte by byte (`tests/handmade.py`, no torch).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import zoo
from tests.handmade import write_adapter
from zoo.api import open_store
from zoo.errors import ZooError
from zoo.registry import Registry
from zoo.store import sha256_file

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
ROOT = Path(__file__).resolve().parent.parent
FORK = multiprocessing.get_context("fork")


def blob(entry) -> Path:
    return open_store().blob_path(entry.sha256)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def one_line(code: int, err: str, *expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(e in lines[0] for e in expected), err


def leftovers(home: Path) -> list[Path]:
    """Temp files and folders of any writer, wherever the store keeps them."""
    return [p for p in home.rglob("*") if p.name.startswith((".incoming", ".registry.json.")) or p.name.endswith(".tmp")] if home.exists() else []


# --- dedupe and reads trust a blob only once hashed ------------------------------------------------------------


def test_dedupe_replaces_a_corrupt_blob_of_the_same_size(tmp_path):
    folder = write_adapter(tmp_path / "a", 1)
    m = zoo.add(folder, name="a")
    flip_last_byte(blob(m.file(WEIGHTS)))  # same size: only the hash tells
    zoo.add(folder, name="b")  # the same bytes again: the store must not keep the corrupt copy
    assert [r.problem for r in zoo.verify()] == [None] * 4
    assert sha256_file(blob(m.file(WEIGHTS))) == (m.file(WEIGHTS).sha256, m.file(WEIGHTS).size)


def test_a_corrupt_member_is_refused_by_every_read_and_never_laundered(tmp_path, zoo_cli):
    a = zoo.add(write_adapter(tmp_path / "a", 1), name="a")
    zoo.add(write_adapter(tmp_path / "b", 2), name="b")
    zoo.compose("a+b", fusion="stack", name="ab")
    flip_last_byte(blob(a.file(WEIGHTS)))
    refusal = r"a@1: the stored adapter_model.safetensors is corrupt \(sha256 .*zoo verify --repair a@1"

    from zoo.loading import resolve
    from zoo.merge import merge_adapters

    for read in (
        lambda: resolve("a"),  # zoo.load / zoo run
        lambda: resolve("ab"),  # a stack naming it
        lambda: zoo.compose("a+b", fusion="weighted", name="w"),
        lambda: zoo.compose("a+b", fusion="stack", name="s"),
        lambda: merge_adapters("a", base=tmp_path, out=tmp_path / "merged"),
        lambda: zoo.api.adapter_folder(a),  # inspect, push
    ):
        with pytest.raises(ZooError, match=refusal):
            read()
    assert sorted(m.name for m in zoo.list_adapters()) == ["a", "ab", "b"]  # nothing composed from it
    assert not (tmp_path / "merged").exists()
    code, out, err = zoo_cli("compose", "a+b", "--fusion", "weighted", "--name", "w")
    one_line(code, err, "a@1: the stored adapter_model.safetensors is corrupt", "run `zoo verify --repair a@1`")

    assert zoo_cli("verify", "--repair")[0] == 0  # the source folder is still there
    assert [m.name for m in resolve("a+b").adapters] == ["a", "b"]


def test_each_blob_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    import zoo.store

    m = zoo.add(write_adapter(tmp_path / "a", 1), name="a")
    real = zoo.store.hashlib.sha256
    calls = []
    monkeypatch.setattr(zoo.store.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    zoo.api.adapter_folder(m)
    zoo.api.adapter_folder(m)
    assert calls == []  # hashed while stored: trusted since, in this process
    path = blob(m.file(WEIGHTS))
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # rewritten in place: new mtime/ctime, so hashed again
    with pytest.raises(ZooError, match="corrupt"):
        zoo.api.adapter_folder(m)
    assert len(calls) == 1


# --- zoo add: one open per file, no link followed out, the parsed bytes are the stored bytes ---------------------


def _flip_forever(folder: Path, variants: list[Path]) -> None:
    """Swap `folder/adapter_config.json` among `variants` (files and a link to a secret), atomically, forever."""
    i = 0
    while True:
        os.replace(_fresh(variants[i % len(variants)], folder), folder / CONFIG)
        i += 1


def _fresh(variant: Path, folder: Path) -> Path:
    """A new name in `folder` holding `variant` (a copy of the file, or the link itself), ready to rename."""
    tmp = folder / ".next"
    if variant.is_symlink():
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.readlink(variant))
    else:
        tmp.write_bytes(variant.read_bytes())
    return tmp


def test_add_stores_exactly_what_it_parsed_and_never_a_file_swapped_for_a_link(tmp_path):
    folder = write_adapter(tmp_path / "a", 1)
    config = json.loads((folder / CONFIG).read_text())
    secret = tmp_path / "secret.json"  # a valid config, so that only the link rule can keep it out
    secret.write_text(json.dumps(config | {"lora_alpha": 32, "secret": "id_rsa"}))
    variants = tmp_path / "variants"
    variants.mkdir()
    for alpha in (8, 16):
        (variants / f"alpha{alpha}.json").write_text(json.dumps(config | {"lora_alpha": alpha}))
    (variants / "link").symlink_to(secret)
    flipper = FORK.Process(target=_flip_forever, args=(folder, sorted(variants.iterdir())))
    flipper.start()
    added = refused = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and added + refused < 200:
            try:
                zoo.add(folder, name=f"a{added}")
                added += 1
            except ZooError as e:
                assert "outside the adapter folder" in str(e) or "not found" in str(e), e
                refused += 1
    finally:
        flipper.kill()
        flipper.join()
    assert added > 5 and refused > 5, (added, refused)  # both sides of the race were hit
    for m in zoo.list_adapters():
        stored = json.loads((zoo.api.adapter_folder(m) / CONFIG).read_text())
        assert "secret" not in stored
        assert stored["lora_alpha"] == m.method.lora_alpha  # what was registered is what was stored
    blobs = open_store().blobs
    assert secret.read_bytes() not in {p.read_bytes() for p in blobs.iterdir()}


def test_a_fifo_or_a_folder_in_place_of_a_file_is_refused_in_one_line(tmp_path, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    (folder / WEIGHTS).unlink()
    os.mkfifo(folder / WEIGHTS)  # opening it for reading would block forever
    one_line(*zoo_cli("add", folder, "--name", "a")[::2], f"{folder / WEIGHTS} is not a regular file")
    (folder / WEIGHTS).unlink()
    (folder / WEIGHTS).mkdir()
    code, _, err = zoo_cli("add", folder, "--name", "a")
    assert code == 2 and err.count("\n") == 1, err
    assert zoo.list_adapters() == []


# --- a full disk: blocks or inodes, at every step -----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """`mount(size, inodes)`: a fresh tmpfs of that size holding ZOO_HOME and the registry (tests run as root)."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = []

    def mount(size: str, inodes: int) -> Path:
        if mounted:
            subprocess.run(["umount", mountpoint], check=True)
            mounted.clear()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},nr_inodes={inodes}", "tmpfs", mountpoint], check=True)
        mounted.append(mountpoint)
        home = mountpoint / "home"
        monkeypatch.setenv("ZOO_HOME", str(home))
        monkeypatch.setenv("ZOO_REGISTRY", str(home / "registry.json"))
        return home

    yield mount
    if mounted:
        subprocess.run(["umount", mountpoint], check=True)


def _whole_or_nothing(home: Path, code: int, err: str) -> str:
    """After `zoo add … --name a`: exit 0 and the whole entry, or exit 2, one line, and nothing of it."""
    names = [m.name for m in Registry(home / "registry.json").read()]
    assert leftovers(home) == [], leftovers(home)
    for p in (home / "blobs" / "sha256").glob("*") if (home / "blobs" / "sha256").is_dir() else []:
        assert sha256_file(p)[0] == p.name  # no blob half-written under its name
    if code == 0:
        assert names == ["a"] and [r.problem for r in zoo.verify()] == [None, None]
        assert sorted(p.name for p in (home / "adapters" / "a" / "1").iterdir()) == [CONFIG, WEIGHTS]
        return "added"
    assert names == [] and not (home / "adapters" / "a").exists(), (names, err)
    one_line(code, err, "no space left in the store", "nothing was registered")
    return "refused"


def test_a_disk_out_of_inodes_at_any_step_leaves_the_whole_entry_or_nothing(tmp_path, small_disk, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    outcomes = []
    for inodes in range(2, 24):
        home = small_disk("1m", inodes)
        code, out, err = zoo_cli("add", folder, "--name", "a")
        outcomes.append(_whole_or_nothing(home, code, err))
    assert "refused" in outcomes and outcomes[-1] == "added"
    print(f"\ninodes 2..23: {outcomes.count('refused')} refused, {outcomes.count('added')} added")


def test_a_disk_out_of_blocks_at_any_step_leaves_the_whole_entry_or_nothing(tmp_path, small_disk, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    outcomes = []
    for pages in range(1, 8):  # every file here fits in a 4 KiB page
        home = small_disk(f"{pages * 4}k", 1000)
        code, out, err = zoo_cli("add", folder, "--name", "a")
        outcomes.append(_whole_or_nothing(home, code, err))
    assert "refused" in outcomes and outcomes[-1] == "added"


# --- SIGTERM ---------------------------------------------------------------------------------------------------


def test_a_terminated_add_leaves_nothing_half_written(tmp_path, isolated_zoo):
    from tests.test_reliability import _big_adapter

    home = isolated_zoo / "zoo-home"
    folder = _big_adapter(tmp_path / "big", 64)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-m", "cli.main", "add", str(folder), "--name", "big"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not leftovers(home) and child.poll() is None:
        time.sleep(0.001)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 143, (child.returncode, err)
    assert err.strip() == "error: terminated (SIGTERM); nothing half-written was left"
    assert leftovers(home) == []
    registered = zoo.list_adapters()
    assert registered == [] or [r.problem for r in zoo.verify()] == [None, None]  # held until a commit ended
