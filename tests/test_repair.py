"""`zoo verify --repair`: missing or corrupt blobs come back from the recorded source, hash-checked; what cannot
come back (a changed or vanished source, a composition's computed weights) is a one-line error, exit code 2.

Hub repairs go through the real `huggingface_hub` client against tests/hubserver.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import zoo
from tests.handmade import write_adapter
from tests.hubserver import PLANTED_TOKEN, HubServer
from zoo.api import open_store, register
from zoo.errors import ZooError
from zoo.manifest import CompositionManifest, FileEntry, MemberRef, SizeInfo, Source
from zoo.repair import repair
from zoo.store import sha256_file

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def blob(entry: FileEntry) -> Path:
    return open_store().blob_path(entry.sha256)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def stored_bytes(ref: str) -> dict[str, bytes]:
    folder = zoo.api.adapter_folder(zoo.show(ref))
    return {f.path: (folder / f.path).read_bytes() for f in zoo.show(ref).files}


def one_line_error(code: int, err: str, expected: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


# --- local sources ------------------------------------------------------------------------------------------


def test_missing_and_corrupt_blobs_come_back_from_the_folder(tmp_path, zoo_cli, isolated_zoo):
    folder = write_adapter(tmp_path / "sql", 1)
    m = zoo.add(folder, name="sql")
    original = stored_bytes("sql")
    blob(m.file(WEIGHTS)).unlink()
    flip_last_byte(blob(m.file(CONFIG)))  # same size: only the hash tells
    shutil.rmtree(isolated_zoo / "zoo-home" / "adapters" / "sql")  # and the folder of links is gone too
    assert {r.path: r.problem.split()[0] for r in zoo.verify("sql")} == {CONFIG: "sha256", WEIGHTS: "missing"}

    code, out, err = zoo_cli("verify", "--repair")
    assert code == 0, err
    assert f"repaired sql@1 {WEIGHTS} (missing) from {folder}" in out and f"repaired sql@1 {CONFIG} (sha256" in out
    assert out.strip().endswith("2/2 damaged files repaired")
    assert [r.problem for r in zoo.verify()] == [None, None]
    assert stored_bytes("sql") == original
    assert zoo_cli("verify", "--repair")[1].strip() == "every stored file is intact"


def test_a_blob_replaced_by_a_folder_is_reported_in_one_line_and_repaired(tmp_path, zoo_cli):
    m = zoo.add(write_adapter(tmp_path / "sql", 1), name="sql")
    path = blob(m.file(WEIGHTS))
    path.unlink()
    path.mkdir()
    (path / "junk").write_text("x")
    code, out, err = zoo_cli("verify")
    assert code == 1 and f"BAD sql@1 {WEIGHTS}: a directory, not a file" in out.splitlines(), (out, err)
    with pytest.raises(ZooError, match=rf"sql@1: files \['{WEIGHTS}'\] are not in the store"):
        zoo.api.open_store().adapter_dir(m)
    code, out, err = zoo_cli("verify", "--repair")
    assert code == 0 and f"repaired sql@1 {WEIGHTS} (a directory, not a file) from {tmp_path / 'sql'}" in out, (out, err)
    assert path.is_file() and [r.problem for r in zoo.verify()] == [None, None]


def test_a_source_that_changed_is_refused_and_nothing_is_stored(tmp_path, zoo_cli):
    folder = write_adapter(tmp_path / "sql", 1)
    m = zoo.add(folder, name="sql")
    blob(m.file(WEIGHTS)).unlink()
    write_adapter(folder, 2)  # retrained in place

    code, out, err = zoo_cli("verify", "--repair", "sql")
    one_line_error(code, err, f"sql@1: {WEIGHTS} cannot be repaired: {folder} now has sha256")
    assert "add it again under a new name" in err
    assert not blob(m.file(WEIGHTS)).exists()  # the changed file was not stored under the old hash
    [result] = repair("sql")
    assert result.repaired_from is None and "now has sha256" in result.error


def test_a_vanished_source_and_several_failures_make_one_line(tmp_path, zoo_cli):
    for i, name in enumerate(("a", "b", "c")):
        m = zoo.add(write_adapter(tmp_path / name, i + 1), name=name)
        blob(m.file(WEIGHTS)).unlink()
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    code, out, err = zoo_cli("verify", "--repair")
    one_line_error(code, err, f"a@1: {WEIGHTS} cannot be repaired: {tmp_path / 'a' / WEIGHTS} is gone")
    assert f"(+1 more: b@1 {WEIGHTS})" in err
    assert f"repaired c@1 {WEIGHTS}" in out and "1/3 damaged files repaired" in out
    code, out, _ = zoo_cli("verify", "--repair", "--json")
    assert code == 2 and [(r["ref"], r["error"] is None) for r in json.loads(out)] == [("a@1", False), ("b@1", False)]


def test_a_source_beside_the_registry_is_found_relative_to_it(tmp_path, monkeypatch):
    """A shipped index records its adapters relative to itself: repairs work wherever it is cloned."""
    shipped = tmp_path / "repo"
    write_adapter(shipped / "adapters" / "sql", 1)
    registry = shipped / "registry.json"
    m = zoo.add(shipped / "adapters" / "sql", name="sql", registry=registry)
    assert m.source.path == "adapters/sql"
    clone = tmp_path / "clone"
    shutil.copytree(shipped, clone)
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "fresh-home"))  # another machine: an empty store
    [r1, r2] = repair(registry=clone / "registry.json")
    assert (r1.problem, r1.repaired_from) == ("missing", str(clone / "adapters" / "sql"))
    assert [r.problem for r in zoo.verify(registry=clone / "registry.json")] == [None, None] and r2.error is None


def test_a_converted_pickle_is_converted_again(tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "old"
    folder.mkdir()
    source = write_adapter(tmp_path / "src", 3)
    shutil.copy(source / CONFIG, folder)
    torch.save(load_file(source / WEIGHTS), folder / "adapter_model.bin")
    m = zoo.add(folder, name="old", allow_pickle=True)
    stored = m.file(WEIGHTS)
    flip_last_byte(blob(stored))

    [result] = repair("old")
    assert result.error is None and sha256_file(blob(stored)) == (stored.sha256, stored.size)
    torch.save({"other": torch.zeros(2)}, folder / "adapter_model.bin")  # the original changed: refused
    blob(stored).unlink()
    [result] = repair("old")
    assert "adapter_model.bin cannot be repaired" in result.error and not blob(stored).exists()


def test_computed_fusion_weights_cannot_be_repaired(tmp_path, zoo_cli):
    members = [zoo.add(write_adapter(tmp_path / n, i + 1), name=n) for i, n in enumerate(("a", "b"))]
    trained = write_adapter(tmp_path / "trained", 99) / WEIGHTS  # stands in for trained fusion weights
    entry = open_store().put(trained, "adapter_fusion.safetensors")
    refs = [MemberRef(name=m.name, version=m.version, sha256=m.weights.sha256) for m in members]
    register(CompositionManifest(
        name="fused", fusion="attention", members=refs, files=[entry], size=SizeInfo(trainable_params=8, bytes=32),
        source=Source(kind="composition", members=refs, recipe={"fusion": "attention"}),
    ))
    blob(entry).unlink()
    blob(members[0].weights).unlink()
    code, out, err = zoo_cli("verify", "--repair")
    one_line_error(code, err, "fused@1: adapter_fusion.safetensors cannot be repaired: it was computed by `zoo compose`")
    assert "compose (and train) it again" in err
    assert f"repaired a@1 {WEIGHTS}" in out  # the member came back from its folder
    assert [(r.ref, r.path) for r in zoo.verify() if r.problem] == [("fused@1", "adapter_fusion.safetensors")]


# --- Hub sources --------------------------------------------------------------------------------------------


def files_of(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in (CONFIG, WEIGHTS)}


def resolve_gets(server: HubServer, sha: str, path: str) -> int:
    return sum(r.method == "GET" and r.path.endswith(f"/resolve/{sha}/{path}") for r in server.requests)


def test_a_hub_file_is_downloaded_again_at_the_pinned_commit(server, tmp_path, zoo_cli):
    old = files_of(write_adapter(tmp_path / "v1", 1))
    sha1 = server.commit("org/sql", old)
    m = zoo.pull("org/sql")
    server.commit("org/sql", files_of(write_adapter(tmp_path / "v2", 2)))  # main moved on since
    blob(m.file(WEIGHTS)).unlink()
    flip_last_byte(blob(m.file(CONFIG)))
    before = resolve_gets(server, sha1, WEIGHTS)

    code, out, err = zoo_cli("verify", "--repair", "sql")
    assert code == 0, err
    assert f"repaired sql@1 {WEIGHTS} (missing) from org/sql@{sha1[:12]}" in out
    assert resolve_gets(server, sha1, WEIGHTS) == before + 1  # really downloaded, at the pinned commit
    assert stored_bytes("sql") == old


def test_a_hub_file_that_does_not_match_is_refused(server, tmp_path, zoo_cli):
    sha = server.commit("org/sql", files_of(write_adapter(tmp_path / "v1", 1)))
    m = zoo.pull("org/sql")
    blob(m.file(WEIGHTS)).unlink()
    server.corrupt("org/sql", WEIGHTS, rev=sha)
    code, _, err = zoo_cli("verify", "--repair")
    one_line_error(code, err, f"sql@1: {WEIGHTS} cannot be repaired: org/sql@{sha[:12]} now has sha256")
    assert not blob(m.file(WEIGHTS)).exists() and PLANTED_TOKEN not in err


def test_a_hub_repo_that_is_gone_is_one_line(server, tmp_path):
    server.commit("org/sql", files_of(write_adapter(tmp_path / "v1", 1)))
    m = zoo.pull("org/sql")
    blob(m.file(WEIGHTS)).unlink()
    del server.repos[("model", "org/sql")]
    [result] = repair()
    assert result.error.startswith(f"sql@1: {WEIGHTS} cannot be repaired: repo org/sql not found") and "\n" not in result.error
    with pytest.raises(ZooError, match="no adapter named 'nope'"):
        repair("nope")
