"""Hostile inputs: names, repo ids and file paths that try to leave their place, symlinks out of an adapter
folder or the store, safetensors headers that lie about sizes, oversized or bottomless JSON. Each is refused
with a one-line `ZooError` (exit code 2 at the CLI), fast, and without allocating what the input declares.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest

import zoo
from tests.handmade import PREFIX, safetensors_bytes, write_adapter
from tests.hubserver import PLANTED_TOKEN
from zoo.api import open_store
from zoo.errors import ZooError
from zoo.formats.safetensors_header import read_safetensors_header
from zoo.manifest import check_name, check_relative_path

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def one_line(code: int, out: str, err: str, expected: str) -> None:
    """Exit code 2 and one line `error: ...` on stderr (besides the Hub client's progress bars)."""
    assert code == 2, (out, err)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in out + err


def nothing_registered() -> None:
    assert zoo.list_adapters() == []


# --- names, refs and paths ----------------------------------------------------------------------------------

BAD_NAMES = ["..", ".", "../evil", "a/../b", "/etc/passwd", "a/b", "a\\b", "a\x00b", "a\nb", "a\x1b[31m", "-rf", "", " x",
             "ｅvil", "x" * 129, ".hidden"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name, tmp_path, zoo_cli):
    with pytest.raises(ZooError, match="invalid adapter name"):
        check_name(name)
    folder = write_adapter(tmp_path / "a", 1)
    with pytest.raises(ZooError, match="invalid adapter name"):
        zoo.add(folder, name=name)
    if "\x00" not in name:  # a NUL cannot be passed in argv
        code, out, err = zoo_cli("add", folder, f"--name={name}")
        one_line(code, out, err, "invalid adapter name")
        assert "\n" not in err[:-1] and "\x1b" not in err  # quoted, never raw
    nothing_registered()
    assert not (tmp_path / "zoo-home" / "adapters").exists() or list((tmp_path / "zoo-home" / "adapters").iterdir()) == []


@pytest.mark.parametrize("path", ["../x", "a/../../x", "/etc/passwd", "\\windows", "a\\b", "a\x00", "a\nb", "", ".", "a//b", "./a"])
def test_bad_file_paths_in_a_manifest_are_refused(path, tmp_path):
    with pytest.raises(ZooError, match="invalid file path"):
        check_relative_path(path)
    m = zoo.add(write_adapter(tmp_path / "a", 1), name="a").model_dump(mode="json")
    m["files"][0]["path"] = path
    with pytest.raises(ZooError, match=r"field 'adapter\.files\.0\.path'"):
        zoo.manifest.parse_manifest(m)


def test_a_path_with_a_newline_or_escape_is_quoted_in_the_one_line_error(tmp_path, zoo_cli):
    odd = tmp_path / "a\nb\x1b[2J"
    code, out, err = zoo_cli("add", odd, "--name", "x")
    one_line(code, out, err, "does not exist")
    assert "a\\nb\\x1b[2J" in err
    code, out, err = zoo_cli("add", odd)  # the name defaults to the folder's
    one_line(code, out, err, "invalid adapter name 'a\\nb\\x1b[2J'")


# --- symlinks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("linked", [CONFIG, WEIGHTS])
def test_a_symlink_out_of_the_adapter_folder_is_refused(linked, tmp_path, zoo_cli):
    outside = write_adapter(tmp_path / "outside", 7)  # e.g. ~/.ssh/id_rsa in real life; here a valid file
    folder = write_adapter(tmp_path / "adapter", 1)
    (folder / linked).unlink()
    (folder / linked).symlink_to(outside / linked)
    code, out, err = zoo_cli("add", folder, "--name", "a")
    one_line(code, out, err, f"{folder / linked} is a symlink to {outside / linked}, outside the adapter folder")
    nothing_registered()
    blobs = tmp_path / "zoo-home" / "blobs" / "sha256"
    secret = (outside / linked).read_bytes()
    assert not blobs.exists() or all(p.read_bytes() != secret for p in blobs.iterdir())


def test_dangling_and_looping_symlinks_are_refused_and_links_inside_are_fine(tmp_path):
    folder = write_adapter(tmp_path / "adapter", 1)
    (folder / CONFIG).rename(folder / "real-config.json")
    (folder / CONFIG).symlink_to("real-config.json")  # inside the folder: fine
    assert zoo.add(folder, name="inside").ref == "inside@1"
    (folder / CONFIG).unlink()
    (folder / CONFIG).symlink_to(tmp_path / "nowhere.json")
    with pytest.raises(ZooError, match="outside the adapter folder"):
        zoo.add(folder, name="dangling")
    (folder / CONFIG).unlink()
    (folder / CONFIG).symlink_to(CONFIG)  # a loop
    with pytest.raises(ZooError, match="outside the adapter folder"):
        zoo.add(folder, name="loop")


def test_a_blob_replaced_by_a_symlink_leaving_the_store_is_caught_and_repaired(tmp_path, zoo_cli):
    m = zoo.add(write_adapter(tmp_path / "a", 1), name="a")
    weights = m.file(WEIGHTS)
    blob = open_store().blob_path(weights.sha256)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(blob, outside)  # the same bytes: only the link gives it away
    blob.unlink()
    blob.symlink_to(outside)
    problems = {r.path: r.problem for r in zoo.verify()}
    assert problems[WEIGHTS] == f"a symlink to {outside}, not a file in the store"
    code, out, err = zoo_cli("verify")
    assert code == 1 and "BAD" in out
    shutil.rmtree(tmp_path / "a")  # with no source to heal it from, loading refuses the link
    with pytest.raises(ZooError, match=r"files \['adapter_model.safetensors'\] are not in the store"):
        zoo.api.adapter_folder(m)
    write_adapter(tmp_path / "a", 1)  # the source is back
    code, out, err = zoo_cli("verify", "--repair")
    assert code == 0 and "repaired a@1 adapter_model.safetensors (a symlink to" in out, err
    assert not blob.is_symlink() and blob.is_file() and outside.exists()  # the link went, the outside file stayed


def test_an_adapter_folder_link_leaving_the_store_is_refused(tmp_path):
    m = zoo.add(write_adapter(tmp_path / "a", 1), name="a")
    home = tmp_path / "zoo-home"
    shutil.rmtree(home / "adapters" / "a")
    (tmp_path / "elsewhere").mkdir()
    (home / "adapters" / "a").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ZooError, match="leads out of the store"):
        zoo.api.adapter_folder(m)
    assert list((tmp_path / "elsewhere").iterdir()) == []  # no link was written there


# --- the Hub: repo ids, revisions, a zoo.json that lies ------------------------------------------------------


@pytest.mark.parametrize("ref, expected", [
    ("../evil", "invalid repo id"),
    ("org/../evil", "invalid repo id"),
    ("/etc/passwd", "invalid repo id"),
    ("org/a\nb", "invalid repo id"),
    ("org/a\x1b[2Jb", "invalid repo id"),
    ("org/sql@../../../etc", "revision '../../../etc' not found"),
    ("org/sql@", "invalid Hub reference"),
])
def test_hostile_repo_ids_and_revisions(ref, expected, server, tmp_path, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    server.commit("org/sql", {n: (folder / n).read_bytes() for n in (CONFIG, WEIGHTS)})
    code, out, err = zoo_cli("pull", ref)
    one_line(code, out, err, expected)
    nothing_registered()
    assert not any(p.is_symlink() or p.is_file() for p in (tmp_path / "zoo-home").rglob("*")) if (tmp_path / "zoo-home").exists() else True
    code, out, err = zoo_cli("push", "nothing", ref)
    assert code == 2 and err.startswith("error: ") and PLANTED_TOKEN not in err


@pytest.mark.parametrize("path", ["../../outside.safetensors", "/etc/passwd", "sub/../../x", "a\x1bb"])
def test_a_zoo_json_whose_files_leave_the_repo_is_refused(path, server, tmp_path, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    m = zoo.add(folder, name="a").model_dump(mode="json")
    m["files"][1]["path"] = path
    server.commit("org/evil", {CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: (folder / WEIGHTS).read_bytes(), "zoo.json": json.dumps(m).encode()})
    zoo.remove("a")
    code, out, err = zoo_cli("pull", "org/evil")
    one_line(code, out, err, "field 'adapter.files.1.path'")
    nothing_registered()


def test_an_oversized_zoo_json_is_refused(server, tmp_path, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    server.commit("org/big", {CONFIG: (folder / CONFIG).read_bytes(), "zoo.json": b"{" + b" " * (2 << 20) + b"}"})
    code, out, err = zoo_cli("pull", "org/big")
    one_line(code, out, err, "zoo.json must be under 1,048,576 bytes")


# --- safetensors headers ------------------------------------------------------------------------------------


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


F32_A = {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]}
HOSTILE_HEADERS = {
    "huge shape and offsets": (safetensors_bytes({"t": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 1 << 82]}}), "overflows 64 bits"),
    "huge numel, small span": (safetensors_bytes({"t": {"dtype": "F32", "shape": [1 << 62, 4], "data_offsets": [0, 16]}}, bytes(16)), "overflows 64 bits"),
    "header length 2**63": (struct.pack("<Q", 1 << 63) + b"{}", "exceeds the 100,000,000-byte limit"),
    "header length past the file": (struct.pack("<Q", 99_000_000) + b"{}", "larger than the file"),
    "overlap": (safetensors_bytes({"a": F32_A, "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)), "overlaps"),
    "gap": (safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)), "unused bytes"),
    "past the end": (safetensors_bytes({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, bytes(16)), "ends at data byte 32"),
    "reversed offsets": (safetensors_bytes({"a": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, bytes(16)), "needs 0 bytes"),
    "negative offset": (safetensors_bytes({"a": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, bytes(16)), "expected [begin, end]"),
    "bad JSON": (struct.pack("<Q", 8) + b'{"a": [}', "not valid JSON"),
    "not UTF-8": (struct.pack("<Q", 8) + b'{"\xff": 1}', "not UTF-8"),
    "a JSON list": (struct.pack("<Q", 2) + b"[]", "not an object"),
    "bottomless JSON": (struct.pack("<Q", 200_000) + b"[" * 200_000, "nests too deeply"),
    "unknown dtype": (safetensors_bytes({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)), "unknown dtype"),
    "float shape": (safetensors_bytes({"a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, bytes(16)), "list of non-negative integers"),
    "bool shape": (safetensors_bytes({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)), "list of non-negative integers"),
    "metadata not strings": (safetensors_bytes({"__metadata__": {"a": 1}}), "__metadata__"),
    "empty file": (b"", "too short"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_headers_fail_fast_without_allocating(case, tmp_path, zoo_cli):
    data, expected = HOSTILE_HEADERS[case]
    path = write(tmp_path / "x.safetensors", data)
    tracemalloc.start()
    try:
        with pytest.raises(ZooError) as caught:
            read_safetensors_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert peak < 4 * len(data) + (64 << 10), f"{case}: peak {peak:,} bytes"  # about the file's own size, never what it declares
    code, out, err = zoo_cli("inspect", path)
    one_line(code, out, err, str(path))
    folder = write_adapter(tmp_path / "adapter", 1)
    write(folder / WEIGHTS, data)
    code, out, err = zoo_cli("add", folder, "--name", "x")
    one_line(code, out, err, str(folder / WEIGHTS))
    nothing_registered()


def test_duplicate_tensor_names_are_refused(tmp_path):
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path = write(tmp_path / "dup.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(ZooError, match="header repeats key 'a'"):
        read_safetensors_header(path)


def test_markup_and_escapes_in_tensor_names_and_labels_are_shown_not_obeyed(tmp_path, zoo_cli):
    """A tensor named like rich markup (`[/x]`), a task with one: shown as text; no crash, no styling."""
    header = {PREFIX + "lora_A.weight": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]},
              PREFIX + "lora_B.weight": {"dtype": "F32", "shape": [4, 1], "data_offsets": [16, 32]},
              "base_model.model.[/x].lora_A.weight": {"dtype": "F32", "shape": [1, 4], "data_offsets": [32, 48]},
              "base_model.model.[/x].lora_B.weight": {"dtype": "F32", "shape": [4, 1], "data_offsets": [48, 64]}}
    path = write(tmp_path / "odd.safetensors", safetensors_bytes(header, bytes(64)))
    code, out, err = zoo_cli("inspect", path)
    assert code == 0 and "[/x]" in out, err
    folder = write_adapter(tmp_path / "a", 1)
    assert zoo_cli("add", folder, "--name", "a", "--task", "[/bold] [link=http://x]y", "--tag", "[red]")[0] == 0
    for command in (["list"], ["show", "a"]):
        code, out, err = zoo_cli(*command)
        assert code == 0 and "[/bold]" in out and "Traceback" not in err, err


# --- oversized and bottomless JSON configs ------------------------------------------------------------------


@pytest.mark.parametrize("content, expected", [
    (b"{" + b" " * (2 << 20) + b"}", "adapter_config.json must be under 1,048,576 bytes"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    (b'"a string"', "must hold a JSON object"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_hostile_adapter_configs(content, expected, tmp_path, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    (folder / CONFIG).write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(ZooError, match=expected):
            zoo.add(folder, name="a")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak  # the 2 MiB file is refused by its size, before it is read
    one_line(*zoo_cli("add", folder, "--name", "a"), expected.split(" must")[0])
    nothing_registered()


@pytest.mark.parametrize("content, expected", [
    (b"{" + b" " * (2 << 20) + b"}", "config.json must be under"),
    (b"[1, 2]", "must hold a JSON object, found list"),
    (b"[" * 100_000, "nests too deeply"),
    (json.dumps({"model_type": ["llama"]}).encode(), "model_type ['llama']"),
    (json.dumps({"model_type": "x", "auto_map": {"AutoModel": ["a.B", None]}}).encode(), "needs remote code (a.B)"),
])
def test_hostile_base_configs_for_estimate(content, expected, tmp_path, zoo_cli):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_bytes(content)
    one_line(*zoo_cli("estimate", "--base", tmp_path / "base"), expected)


def test_a_registry_file_that_is_not_ours_is_reported_not_crashed(tmp_path, zoo_cli):
    registry = tmp_path / "zoo-home" / "registry.json"
    registry.parent.mkdir(parents=True)
    for content in (b"[" * 100_000, b"\xff", b'{"format": "adapter-zoo/registry", "adapters": [{"name": "../x"}]}', b""):
        registry.write_bytes(content)
        code, out, err = zoo_cli("list")
        one_line(code, out, err, "registry")
        assert registry.read_bytes() == content  # never overwritten
    os.unlink(registry)
