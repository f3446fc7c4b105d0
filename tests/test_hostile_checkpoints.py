"""Hostile base checkpoints for `zoo merge`: a shard index naming files outside the base folder, headers that lie
about their tensors, config.json and index files that are not what they claim, weights that overflow. Each is one
line (exit code 2); nothing outside `--out` is read as a shard or written, and `--out` is not created.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.handmade import PREFIX, safetensors_bytes, write_adapter
from tests.test_hostile import one_line

KEY = "model.layers.0.self_attn.q_proj.weight"  # the module write_adapter's LoRA targets (4×4)
INDEX = "model.safetensors.index.json"


def shard(values: list[float] | None = None, key: str = KEY) -> bytes:
    values = values if values is not None else [0.25] * 16
    return safetensors_bytes({key: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, struct.pack("<16f", *values))


def sharded_base(folder: Path, shard_name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 64}, "weight_map": {KEY: shard_name}}))
    return folder


@pytest.fixture
def adapter(tmp_path, zoo_cli) -> str:
    assert zoo_cli("add", write_adapter(tmp_path / "a", 1), "--name", "a")[0] == 0
    return "a"


def refused(zoo_cli, base: Path, out: Path, expected: str, *extra: str) -> None:
    one_line(*zoo_cli("merge", "a", "--base", base, "--out", out, *extra), expected)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_a_shard_outside_the_base_folder_is_refused(where, adapter, tmp_path, zoo_cli):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(shard())
    before = victim.read_bytes()
    base = tmp_path / "base"
    name = {"absolute": str(victim), "dotdot": "../victim.safetensors", "symlink": "model-00001.safetensors"}[where]
    sharded_base(base, name)
    if where == "symlink":
        (base / name).symlink_to(victim)
    refused(zoo_cli, base, tmp_path / "out", "which is not a safetensors file of")
    # with --out beside the victim, a merge used to read it as a shard and write `out/<absolute path>` = the victim itself
    refused(zoo_cli, base, tmp_path / "out2", "which is not a safetensors file of")
    assert victim.read_bytes() == before


BAD_HEADERS = {
    "short tensor": (safetensors_bytes({KEY: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, bytes(16)), "needs 64 bytes"),
    "unknown dtype": (safetensors_bytes({KEY: {"dtype": "F128", "shape": [4, 4], "data_offsets": [0, 64]}}, bytes(64)), "unknown dtype"),
    "shape of strings": (safetensors_bytes({KEY: {"dtype": "F32", "shape": ["4", 4], "data_offsets": [0, 64]}}, bytes(64)), "list of non-negative integers"),
    "header past the file": (struct.pack("<Q", 99_000_000) + b"{}", "larger than the file"),
    "header length 2**40": (struct.pack("<Q", 1 << 40) + b"{}", "exceeds the 100,000,000-byte limit"),
    "header not JSON": (struct.pack("<Q", 8) + b"{not js}", "not valid JSON"),
    "overlapping tensors": (safetensors_bytes({KEY: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
                                               "x": {"dtype": "F32", "shape": [4], "data_offsets": [48, 64]}}, bytes(64)), "overlaps"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_base_headers_are_validated_like_adapter_headers(case, adapter, tmp_path, zoo_cli):
    data, expected = BAD_HEADERS[case]
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(data)
    refused(zoo_cli, tmp_path / "base", tmp_path / "out", expected)  # before: a short tensor wrote uninitialised memory


def test_the_shard_reader_refuses_a_short_tensor_itself(tmp_path):
    """compose's reader (used without zoo's header check by Python callers) never returns bytes it did not read."""
    from compose.errors import CompositionError
    from compose.merge.shards import ShardReader

    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({KEY: {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}, bytes(16)))
    with ShardReader(path) as f, pytest.raises(CompositionError, match="spans 16 bytes, its shape and dtype need 4000000"):
        f.get_tensor(KEY)


@pytest.mark.parametrize("name, content, expected", [
    ("config.json", b"{not json", "config.json is not valid JSON"),
    ("config.json", b"[1, 2]", "must hold a JSON object, found list"),
    ("config.json", b'{"model_type": ["llama"]}', None),  # unknown to transformers: merged as plain weights
    ("config.json", b'{"model_type": "llama", "hidden_size": "wide"}', "transformers cannot build the llama model"),
    ("config.json", b'{"quantization_config": "yes"}', "is already quantized"),
    (INDEX, b"{not json", "is not valid JSON"),
    (INDEX, b'{"weight_map": [1, 2]}', "'weight_map' must map tensor names to shard file names"),
    (INDEX, b'{"weight_map": {"a": 1}}', "'weight_map' must map tensor names to shard file names"),
    (INDEX, b'{"weight_map": {}, "metadata": []}', "'metadata' must be an object"),
    (INDEX, b"[" * 100_000, "is not valid JSON"),
])
def test_malformed_config_and_index_files_are_one_line(name, content, expected, adapter, tmp_path, zoo_cli):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(shard())
    (base / name).write_bytes(content)
    if expected is None:
        code, out, err = zoo_cli("merge", "a", "--base", base, "--out", tmp_path / "out")
        assert code == 0, err
    else:
        refused(zoo_cli, base, tmp_path / "out", expected)


@pytest.mark.parametrize("values, dtype, expected", [
    ([1e30] * 16, "fp16", "its values do not fit float16"),
    ([float("nan")] + [0.0] * 15, None, "the base checkpoint holds them"),
])
def test_a_merge_never_writes_non_finite_weights(values, dtype, expected, adapter, tmp_path, zoo_cli):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(shard(values))
    refused(zoo_cli, tmp_path / "base", tmp_path / "out", expected, *(["--dtype", dtype] if dtype else []))


def test_a_delta_that_overflows_is_refused(tmp_path, zoo_cli):
    """lora_alpha at its limit on huge factors: W + s·B·A overflows fp32, and the merge says so instead of writing inf."""
    folder = write_adapter(tmp_path / "big", 1)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1e6, "target_modules": ["q_proj"]}))
    header = {PREFIX + "lora_A.weight": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]},
              PREFIX + "lora_B.weight": {"dtype": "F32", "shape": [4, 1], "data_offsets": [16, 32]}}
    (folder / "adapter_model.safetensors").write_bytes(safetensors_bytes(header, struct.pack("<8f", *[3e38] * 8)))
    assert zoo_cli("add", folder, "--name", "a")[0] == 0
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.safetensors").write_bytes(shard())
    refused(zoo_cli, tmp_path / "base", tmp_path / "out", "the adapters' deltas overflow")


def test_an_index_naming_a_shard_without_the_weight_extension_is_refused(adapter, tmp_path, zoo_cli):
    base = sharded_base(tmp_path / "base", "tokenizer.json")
    (base / "tokenizer.json").write_bytes(shard())
    refused(zoo_cli, base, tmp_path / "out", "'tokenizer.json', which is not a safetensors file of")


OTHER = "model.layers.0.self_attn.k_proj.weight"


@pytest.mark.parametrize("second, expected", [
    ([KEY, OTHER], "tensor 'model.layers.0.self_attn.q_proj.weight' is in both s1.safetensors and s2.safetensors"),
    ([KEY], "maps tensor 'model.layers.0.self_attn.k_proj.weight' to 's2.safetensors', but it is in s1.safetensors"),
])
def test_a_tensor_in_two_shards_or_not_where_the_index_says_is_refused(second, expected, adapter, tmp_path, zoo_cli):
    base = tmp_path / "base"
    base.mkdir()
    first = [KEY] if len(second) == 2 else [OTHER]
    weight_map = {KEY: "s1.safetensors", OTHER: "s2.safetensors"}
    (base / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name, keys in (("s1.safetensors", first), ("s2.safetensors", second)):
        header = {k: {"dtype": "F32", "shape": [4, 4], "data_offsets": [64 * i, 64 * (i + 1)]} for i, k in enumerate(keys)}
        (base / name).write_bytes(safetensors_bytes(header, struct.pack(f"<{16 * len(keys)}f", *[0.25] * 16 * len(keys))))
    refused(zoo_cli, base, tmp_path / "out", expected)


def test_a_file_linking_out_of_the_base_is_not_copied(adapter, tmp_path, zoo_cli):
    secret = tmp_path / "secret"
    secret.write_text("private")
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(shard())
    (base / "tokenizer.json").symlink_to(secret)
    refused(zoo_cli, base, tmp_path / "out", "tokenizer.json links out of")


def test_a_sharded_base_in_the_hf_cache_layout_merges(adapter, tmp_path, zoo_cli):
    repo = tmp_path / "hub" / "models--org--base"
    (repo / "blobs").mkdir(parents=True)
    snapshot = sharded_base(repo / "snapshots" / "abc123", "model-00001-of-00001.safetensors")
    (repo / "blobs" / "1111").write_bytes(shard())
    (repo / "blobs" / "2222").write_text("{}")
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/1111")
    (snapshot / "tokenizer.json").symlink_to("../../blobs/2222")
    code, out, err = zoo_cli("merge", "a", "--base", snapshot, "--out", tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "out" / "model-00001-of-00001.safetensors").is_file()
