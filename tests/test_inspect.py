"""Header-only reading of safetensors files and `inspect_adapter` (oracles: safetensors, peft)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from zoo.errors import ZooError
from zoo.estimate import estimate_adapter
from zoo.formats.safetensors_header import DTYPE_BITS, read_safetensors_header
from zoo.inspect import inspect_adapter, render_inspect

EXAMPLES = Path(__file__).parent.parent / "examples"


def write_raw(path: Path, header: dict | bytes, data_bytes: int = 0, length: int | None = None) -> Path:
    """A safetensors file byte by byte: length prefix, header, `data_bytes` zero bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + bytes(data_bytes))
    return path


# ---- read_safetensors_header ------------------------------------------------------------------


def test_header_matches_what_safetensors_loads(tmp_path):
    tensors = {
        "a": torch.zeros(3, 5, dtype=torch.float16),
        "b": torch.zeros(7, dtype=torch.bfloat16),
        "c": torch.zeros(2, 2, 2, dtype=torch.int64),
        "d": torch.zeros(0, 4, dtype=torch.float32),
        "e": torch.zeros(4, dtype=torch.uint8),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    header = read_safetensors_header(path)
    assert header.metadata == {"format": "pt", "note": "x"}
    assert header.file_bytes == path.stat().st_size
    assert set(header.tensors) == set(tensors)
    for name, t in tensors.items():
        info = header.tensors[name]
        assert info.shape == tuple(t.shape)
        assert info.numel == t.numel()
        assert info.nbytes == t.numel() * t.element_size()
    assert header.nbytes + 8 + header.header_bytes == header.file_bytes


def test_dtype_sizes_agree_with_torch():
    from safetensors.torch import _TYPES  # safetensors' own dtype-name → torch dtype table

    for name, dtype in _TYPES.items():
        assert DTYPE_BITS[name] == 8 * torch.empty(0, dtype=dtype).element_size(), name


GOOD = {"x": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}}


@pytest.mark.parametrize(
    ("header", "data_bytes", "length", "problem"),
    [
        (GOOD, 12, 10_000, "larger than the file"),
        (GOOD, 12, 200_000_000, "limit"),
        (b"{not json", 0, None, "not valid JSON"),
        (b"[1, 2]", 0, None, "not an object"),
        (b"\xff\xfe{}", 0, None, "not UTF-8"),
        (b'{"x": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}, "x": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}', 2, None, "repeats key 'x'"),
        ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, 1, None, "unknown dtype 'Q4'"),
        ({"x": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 10]}}, 10, None, "needs 12 bytes"),
        ({"x": {"dtype": "F16", "shape": [2, -3], "data_offsets": [0, 12]}}, 12, None, "non-negative integers"),
        ({"x": {"dtype": "F16", "shape": [2, True], "data_offsets": [0, 4]}}, 4, None, "non-negative integers"),
        ({"x": {"dtype": "F16", "shape": [2], "data_offsets": [0]}}, 4, None, "expected [begin, end]"),
        ({"x": {"dtype": "F16", "shape": [2]}}, 4, None, "needs 'dtype'"),
        ({"x": {"dtype": "F4", "shape": [3], "data_offsets": [0, 1]}}, 1, None, "whole number of bytes"),
        (GOOD, 6, None, "truncated"),
        (GOOD, 20, None, "8 bytes after the last tensor"),
        ({"x": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}, "y": {"dtype": "F16", "shape": [4], "data_offsets": [4, 12]}}, 12, None, "overlaps 'x'"),
        ({"x": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}, "y": {"dtype": "F16", "shape": [2], "data_offsets": [6, 10]}}, 10, None, "2 unused bytes before tensor 'y'"),
        ({**GOOD, "__metadata__": {"a": 1}}, 12, None, "strings to strings"),
    ],
)
def test_bad_headers_fail_fast_with_one_line(tmp_path, header, data_bytes, length, problem):
    path = write_raw(tmp_path / "bad.safetensors", header, data_bytes, length)
    with pytest.raises(ZooError) as e:
        read_safetensors_header(path)
    message = str(e.value)
    assert problem in message and str(path) in message and "\n" not in message


def test_too_short_and_missing_files(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ZooError, match="too short"):
        read_safetensors_header(tmp_path / "short.safetensors")
    with pytest.raises(ZooError, match="cannot read"):
        read_safetensors_header(tmp_path / "missing.safetensors")


def test_good_raw_header_is_accepted(tmp_path):
    # the raw writer itself makes files safetensors loads, so the failures above are the checks' doing
    path = write_raw(tmp_path / "ok.safetensors", GOOD, 12)
    assert read_safetensors_header(path).tensors["x"].nbytes == 12
    assert load_file(path)["x"].shape == (2, 3)


# ---- inspect_adapter: header only, whatever the file size ------------------------------------


def _read_chars() -> int:
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_inspecting_a_1gb_adapter_reads_under_1mb(tmp_path):
    # lm_head saved in full in fp16 (131072 × 4096 = 1 GiB) next to a small LoRA: the classic "why is my
    # adapter 1 GB" file. The data region is a hole (sparse file), so this uses no disk.
    header, offset = {}, 0
    for name, dtype, shape in [
        ("base_model.model.lm_head.weight", "F16", [131072, 4096]),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "F16", [16, 4096]),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "F16", [4096, 16]),
    ]:
        nbytes = 2 * shape[0] * shape[1]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    folder = tmp_path / "big"
    folder.mkdir()
    path = write_raw(folder / "adapter_model.safetensors", header)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + offset)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "modules_to_save": ["lm_head"]}))
    assert path.stat().st_size > 2**30

    before = _read_chars()
    report = inspect_adapter(folder)
    assert _read_chars() - before < 1_000_000

    assert report.saved_params == 131072 * 4096 and report.saved_bytes == 2**30
    assert report.adapter_params == 2 * 16 * 4096 and report.ranks == [16] and report.alpha == 32
    assert report.total_bytes == 2**30 + 4 * 16 * 4096
    assert report.file_bytes == path.stat().st_size
    assert len(report.warnings) == 1 and "lm_head is saved in full" in report.warnings[0]


# ---- inspect_adapter: numbers equal the tensors' -------------------------------------------


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, **overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("adapter")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
                        modules_to_save=["lm_head"], init_lora_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(folder)
    return folder


def test_peft_adapter_numbers_equal_the_loaded_tensors(peft_adapter):
    tensors = load_file(peft_adapter / "adapter_model.safetensors")
    report = inspect_adapter(peft_adapter)

    assert report.method == "lora" and report.alpha == 8
    assert report.ranks == [2, 4]
    assert report.target_modules == ["down_proj", "q_proj", "v_proj"]
    assert report.trainable_params == sum(t.numel() for t in tensors.values())
    assert report.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert [(d.dtype, d.params) for d in report.by_dtype] == [("F32", report.trainable_params)]

    assert len(report.modules) == 6
    for row in report.modules:
        a = tensors[f"base_model.model.{row.module}.lora_A.weight"]
        b = tensors[f"base_model.model.{row.module}.lora_B.weight"]
        assert (row.rank, row.in_features, row.out_features) == (a.shape[0], a.shape[1], b.shape[0])
        assert row.params == a.numel() + b.numel() and row.bytes == 4 * row.params and row.dtype == "F32"
        assert row.rank == (2 if row.module.endswith("down_proj") else 4)

    lm_head = tensors["base_model.model.lm_head.weight"]
    assert [(s.module, s.params) for s in report.saved_modules] == [("lm_head", lm_head.numel())]
    assert report.adapter_params + report.saved_params == report.trainable_params
    assert report.base_params is None and report.base_share is None
    json.dumps(report.model_dump(mode="json"))


def test_same_file_without_config_guesses_lora(peft_adapter):
    report = inspect_adapter(peft_adapter / "adapter_model.safetensors")
    assert report.method == "lora" and report.alpha is None
    assert report.trainable_params == inspect_adapter(peft_adapter).trainable_params


def test_base_share_from_weights_headers_and_from_config(peft_adapter, tmp_path):
    model = tiny_llama()
    base_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "base")  # model.safetensors + config.json
    report = inspect_adapter(peft_adapter, base=tmp_path / "base")
    assert report.base_params == base_params
    assert report.base_share == pytest.approx(report.trainable_params / base_params)

    # the adapter config's base_model_name_or_path is used when it is a local folder
    config = json.loads((peft_adapter / "adapter_config.json").read_text())
    assert inspect_adapter(peft_adapter, config={**config, "base_model_name_or_path": str(tmp_path / "base")}).base_params == base_params

    # without weights, the count comes from config.json (meta-device model)
    (tmp_path / "base" / "model.safetensors").unlink()
    assert inspect_adapter(peft_adapter, base=tmp_path / "base").base_params == base_params


def test_chatglm_shaped_adapter_matches_the_estimate(tmp_path):
    tensors = {}
    for i in range(28):
        prefix = f"base_model.model.transformer.layers.{i}.attention.query_key_value"
        tensors[f"{prefix}.lora_A.weight"] = torch.zeros(8, 4096, dtype=torch.float16)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(12288, 8, dtype=torch.float16)
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 32, "target_modules": ["query_key_value"]}))

    report = inspect_adapter(tmp_path, base=EXAMPLES / "chatglm-6b")
    estimate = estimate_adapter(EXAMPLES / "chatglm-6b", rank=8)
    assert report.trainable_params == estimate.params == 3_670_016
    assert report.total_bytes == estimate.bytes == 7_340_032
    assert report.base_params == estimate.base_params and report.base_share == pytest.approx(estimate.base_share)
    assert report.ranks == [8] and report.target_modules == ["query_key_value"]
    assert {(m.in_features, m.out_features) for m in report.modules} == {(4096, 12288)}
    assert [m.module for m in report.modules] == [f"transformer.layers.{i}.attention.query_key_value" for i in range(28)]
    assert report.file_bytes > report.total_bytes  # the header is the overhead

    console = Console(record=True, width=140)
    render_inspect(report, console)
    text = console.export_text()
    assert "transformer.layers.27.attention.query_key_value" in text and "7.34 MB of tensors" in text


# ---- inspect_adapter: errors ------------------------------------------------------------------


def test_missing_partner_factor_names_the_module(tmp_path):
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": torch.zeros(4, 8)}, tmp_path / "a.safetensors")
    with pytest.raises(ZooError, match=r"layers\.0\.q_proj has lora_A but no lora_B"):
        inspect_adapter(tmp_path / "a.safetensors")


def test_rank_disagreement_names_the_module(tmp_path):
    save_file({"m.q.lora_A.weight": torch.zeros(4, 8), "m.q.lora_B.weight": torch.zeros(8, 2)}, tmp_path / "a.safetensors")
    with pytest.raises(ZooError, match=r"m\.q: lora_A \[4, 8\] and lora_B \[8, 2\] disagree"):
        inspect_adapter(tmp_path / "a.safetensors")


def test_unknown_method_and_unrecognised_tensors(peft_adapter, tmp_path):
    with pytest.raises(ZooError, match="does not know method .vera."):
        inspect_adapter(peft_adapter, config={"peft_type": "VERA"})
    save_file({"model.weight": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ZooError, match="no adapter tensors recognised"):
        inspect_adapter(tmp_path / "plain.safetensors")


def test_pickle_only_folder_is_explained(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(ZooError, match="has adapter_model.bin, a pickle"):
        inspect_adapter(tmp_path)


def test_unusable_implicit_base_is_a_warning_not_an_error(peft_adapter, tmp_path):
    shutil.copy(EXAMPLES / "chatglm-6b" / "config.json", tmp_path / "config.json")  # remote code, no description
    config = {**json.loads((peft_adapter / "adapter_config.json").read_text()), "base_model_name_or_path": str(tmp_path)}
    report = inspect_adapter(peft_adapter, config=config)
    assert report.base_params is None and any("share of the base unknown" in w for w in report.warnings)
    with pytest.raises(ZooError, match="needs remote code"):
        inspect_adapter(peft_adapter, base=tmp_path)


def test_modules_import_without_torch():
    import subprocess
    import sys

    code = "import sys, zoo.inspect, zoo.estimate, compose.targets; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
