"""Hostile values: non-finite and huge numbers, config values of the wrong JSON type, references that only look
like versions, a folder named like a registry entry, inputs whose cost grows faster than their size. Each is refused
(or capped, with a note) in one line, and no bad entry ever reaches the registry.
"""

from __future__ import annotations

import json
import struct
import time
import zipfile
from pathlib import Path

import pytest

import zoo
from tests.handmade import PREFIX, safetensors_bytes, write_adapter
from tests.test_hostile import one_line

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LORA = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"]}


def with_config(folder: Path, text: str) -> Path:
    (folder / CONFIG).write_text(text)
    return folder


def registry_still_reads(zoo_cli, *names: str) -> None:
    code, out, err = zoo_cli("list", "--json")
    assert code == 0, err
    assert sorted(e["name"] for e in json.loads(out)) == sorted(names)


# --- 1. numbers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_text, expected", [
    ('{"peft_type": "LORA", "r": 1, "lora_alpha": NaN, "target_modules": ["q_proj"]}', "NaN is not a number JSON allows"),
    ('{"peft_type": "LORA", "r": 1, "lora_alpha": Infinity, "target_modules": ["q_proj"]}', "Infinity is not a number JSON allows"),
    ('{"peft_type": "LORA", "r": 1, "lora_alpha": -Infinity, "target_modules": ["q_proj"]}', "-Infinity is not a number JSON allows"),
    ('{"peft_type": "LORA", "r": 1, "lora_alpha": 1e999, "target_modules": ["q_proj"]}', "1e999 overflows a 64-bit float"),
    ('{"peft_type": "LORA", "r": 1, "lora_alpha": 2, "alpha_pattern": {"q_proj": NaN}, "target_modules": ["q_proj"]}', "NaN is not a number"),
    ('{"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"], "future_key": [1, NaN]}', "NaN is not a number"),
    ('{"peft_type": "LORA", "r": 1, "lora_alpha": 1e308, "target_modules": ["q_proj"]}', "field 'lora_alpha': Input should be less than or equal to 1000000"),
    ('{"peft_type": "LORA", "r": 1, "lora_alpha": 2, "alpha_pattern": {"q_proj": -1e300}, "target_modules": ["q_proj"]}', "is out of range"),
])
def test_non_finite_and_huge_numbers_in_a_config_are_refused_and_the_registry_stays_readable(config_text, expected, tmp_path, zoo_cli):
    assert zoo_cli("add", write_adapter(tmp_path / "good", 1), "--name", "good")[0] == 0
    folder = with_config(write_adapter(tmp_path / "bad", 2), config_text)
    one_line(*zoo_cli("add", folder, "--name", "bad"), expected)
    registry_still_reads(zoo_cli, "good")  # before: lora_alpha NaN was stored as null, and every later command failed


def test_a_manifest_refuses_non_finite_numbers_when_built():
    from compose.lora.config import LoraConfig
    from zoo.errors import ZooError
    from zoo.manifest import parse_manifest
    from tests.test_fuzz import VALID_MANIFEST

    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="finite number"):
            LoraConfig(r=1, lora_alpha=bad)
        for path in (("method", "lora_alpha"), ("size", "bytes"), ("extra_config", "x"), ("source", "recipe")):
            data = json.loads(json.dumps(VALID_MANIFEST))
            node = data
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = {"w": [bad]} if path[-1] == "recipe" else bad
            with pytest.raises(ZooError, match="finite number"):
                parse_manifest(data)


def test_non_finite_weights_and_options_are_refused(tmp_path, zoo_cli):
    for name, seed in (("a", 1), ("b", 2)):
        assert zoo_cli("add", write_adapter(tmp_path / name, seed), "--name", name)[0] == 0
    for weights in ("nan,1", "1,inf", "-inf,0.5", "1e999,1"):
        one_line(*zoo_cli("compose", "a+b", "--name", "ab", "--fusion", "weighted", "--method", "linear", f"--weights={weights}"), "not finite")
    one_line(*zoo_cli("compose", "a+b", "--name", "ab", "--fusion", "weighted", "--method", "ties", "--density", "nan"), "density nan")
    one_line(*zoo_cli("compose", "a+b", "--name", "ab", "--fusion", "attention", "--lr", "nan"), "lr nan")
    registry_still_reads(zoo_cli, "a", "b")


@pytest.mark.parametrize("args, expected", [
    (["--method", "bottleneck", "--reduction-factor", "nan"], "reduction_factor must be a positive finite number, got nan"),
    (["--method", "bottleneck", "--reduction-factor", "inf"], "reduction_factor must be a positive finite number, got inf"),
    (["--method", "bottleneck", "--reduction-factor", "1e-300"], "makes the bottleneck 4.1e+303 wide"),
    (["--rank", "99999999999999999999"], "rank 99999999999999999999 is out of range"),
    (["--method", "prompt", "--num-virtual-tokens", "10000000000000"], "num_virtual_tokens 10000000000000 is out of range"),
])
def test_estimate_refuses_non_finite_and_huge_options(args, expected, zoo_cli):
    one_line(*zoo_cli("estimate", "--base", Path(__file__).parents[1] / "examples" / "llama-2-7b", *args), expected)


def adapter_with(folder: Path, dtype: str, data: bytes) -> Path:
    write_adapter(folder, 1)
    size = len(data) // 2
    shapes = {"F32": ([1, 4], [4, 1]), "F16": ([1, 4], [4, 1]), "I32": ([1, 4], [4, 1]), "BOOL": ([1, 4], [4, 1])}[dtype]
    header = {PREFIX + "lora_A.weight": {"dtype": dtype, "shape": shapes[0], "data_offsets": [0, size]},
              PREFIX + "lora_B.weight": {"dtype": dtype, "shape": shapes[1], "data_offsets": [size, 2 * size]}}
    (folder / WEIGHTS).write_bytes(safetensors_bytes(header, data))
    return folder


@pytest.mark.parametrize("dtype, values, expected", [
    ("F32", struct.pack("<8f", 1, 2, 3, float("nan"), 5, 6, 7, 8), "holds NaN"),
    ("F32", struct.pack("<8f", 1, 2, 3, 4, 5, 6, 7, float("-inf")), "holds ±Inf"),
    ("F16", struct.pack("<8e", 1, 2, 3, 4, 5, float("inf"), 7, 8), "holds ±Inf"),
    ("I32", struct.pack("<8i", *range(8)), "is I32; adapter weights are floating point"),
    ("BOOL", bytes([1, 0] * 4), "is BOOL; adapter weights are floating point"),
])
def test_non_finite_or_integer_adapter_tensors_are_refused_at_add(dtype, values, expected, tmp_path, zoo_cli):
    folder = adapter_with(tmp_path / "a", dtype, values)
    one_line(*zoo_cli("add", folder, "--name", "a"), expected)
    registry_still_reads(zoo_cli)


def test_the_tensor_scan_streams_in_bounded_chunks(tmp_path, monkeypatch):
    """A NaN in the last chunk of a tensor larger than a chunk is found; no chunk is larger than CHUNK_BYTES."""
    import zoo.formats.tensor_values as scan

    monkeypatch.setattr(scan, "CHUNK_BYTES", 64)
    n = 100
    header = {"a": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}
    values = [0.5] * n
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(header, struct.pack(f"<{n}f", *values)))
    scan.check_tensor_values(path)
    values[-1] = float("nan")
    path.write_bytes(safetensors_bytes(header, struct.pack(f"<{n}f", *values)))
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, *a):
            return self.f.seek(*a)

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

    monkeypatch.setattr(scan, "open", lambda p, mode="r", *a, **k: Spy(real_open(p, mode, *a, **k)), raising=False)
    with pytest.raises(zoo.errors.ZooError, match="holds NaN"):
        scan.check_tensor_values(path)
    assert max(reads) <= 64 and len(reads) == 7


def test_a_rank_above_the_module_width_is_capped_with_a_note(tmp_path, zoo_cli):
    for name, seed in (("a", 1), ("b", 2)):
        assert zoo_cli("add", write_adapter(tmp_path / name, seed), "--name", name)[0] == 0
    with pytest.warns(UserWarning, match=r"rank 1000000 is above the width of 1 module\(s\); capped to their width \(4\)"):
        code, out, err = zoo_cli("compose", "a+b", "--name", "ab", "--fusion", "weighted", "--method", "svd", "--rank", "1000000", "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["method"]["r"] == 4 and m["size"]["bytes"] == 2 * 4 * 4 * 4  # before: 32 MB of zero rows


# --- 3. config values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, expected", [
    ({"rank_pattern": {"q_proj(": 2}}, "rank_pattern key 'q_proj(' is not a valid regular expression"),
    ({"alpha_pattern": {"[q": 2.0}}, "alpha_pattern key '[q' is not a valid regular expression"),
    ({"target_modules": "(q_proj"}, "target_modules '(q_proj' is not a valid regular expression"),
    ({"base_model_name_or_path": 123}, "base_model_name_or_path is 123, not a string"),
    ({"task_type": []}, "task_type is [], not a string"),
    ({"revision": {}}, "revision is {}, not a string"),
    ({"auto_mapping": [1]}, "auto_mapping is [1], not an object"),
    ({"auto_mapping": {"base_model_class": 7}}, "base_model_class is 7, not a string"),
])
def test_config_values_of_the_wrong_type_or_bad_regexes_are_refused_at_add(extra, expected, tmp_path, zoo_cli):
    folder = with_config(write_adapter(tmp_path / "a", 1), json.dumps({**LORA, **extra}))
    one_line(*zoo_cli("add", folder, "--name", "a"), expected)
    registry_still_reads(zoo_cli)


def test_ia3_patterns_are_compiled_at_add(tmp_path, zoo_cli):
    folder = with_config(write_adapter(tmp_path / "a", 1), json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"], "feedforward_modules": "*x"}))
    one_line(*zoo_cli("add", folder, "--name", "a"), "feedforward_modules '*x' is not a valid regular expression")


@pytest.mark.parametrize("ref", ["s@²", "s@01", "s@١", "s@0", "s@99999999999999999999999"])
def test_references_that_only_look_like_versions_are_refused_by_every_command(ref, tmp_path, zoo_cli):
    assert zoo_cli("add", write_adapter(tmp_path / "s", 1), "--name", "s")[0] == 0
    for command in (["show", ref], ["remove", ref], ["verify", ref], ["inspect", ref], ["push", ref, "org/x"]):
        one_line(*zoo_cli(*command), "invalid reference")
    registry_still_reads(zoo_cli, "s")  # before: `remove s@01` said nothing and removed nothing; `show s@01` showed s@1


# --- 5. names -----------------------------------------------------------------------------------------------------


def test_a_bare_name_means_the_registry_entry_never_a_folder_of_that_name(tmp_path, monkeypatch, zoo_cli):
    registered = write_adapter(tmp_path / "src", 1)
    assert zoo_cli("add", registered, "--name", "s")[0] == 0
    monkeypatch.chdir(tmp_path)
    imposter = with_config(write_adapter(tmp_path / "s", 9), json.dumps({**LORA, "lora_alpha": 64}))
    (imposter / "README").write_text("a folder that happens to share the entry's name")
    resolved = zoo.loading.resolve("s")
    assert resolved.adapters[0].manifest is not None and resolved.adapters[0].config.lora_alpha == 2
    assert zoo.loading.resolve("./s").adapters[0].config.lora_alpha == 64  # a path, explicitly
    code, out, err = zoo_cli("inspect", "s", "--json")
    assert code == 0 and json.loads(out)["alpha"] == 2, err
    assert json.loads(zoo_cli("inspect", "./s", "--json")[1])["alpha"] == 64


def test_a_bare_name_that_is_only_a_folder_here_says_to_write_a_path(tmp_path, monkeypatch, zoo_cli):
    monkeypatch.chdir(tmp_path)
    write_adapter(tmp_path / "s", 1)
    one_line(*zoo_cli("inspect", "s"), "no adapter named 's'")
    one_line(*zoo_cli("inspect", "s"), "write ./s to use the folder")
    one_line(*zoo_cli("compose", "s+t", "--name", "st"), "write ./s to use the folder")
    with pytest.raises(zoo.errors.ZooError, match=r"'s' is a folder here, and a bare name means a registry entry"):
        zoo.loading.resolve("s")


# --- 4. cost linear in the input's size ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape, expected", [
    ([2] * 40_000, "overflows 64 bits"),
    ([1 << 62] * 250, "overflows 64 bits"),  # before: ValueError (int too large to print) traceback
    ([1 << 62, 1 << 62, 0], "overflows 64 bits"),  # as safetensors: the product overflows before the 0
])
def test_header_cost_is_linear_in_the_shape(shape, expected, tmp_path, zoo_cli):
    from zoo.errors import ZooError
    from zoo.formats.safetensors_header import read_safetensors_header

    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}}, bytes(16)))
    start = time.perf_counter()
    if expected is None:
        assert read_safetensors_header(path).tensors["t"].numel == 4
    else:
        with pytest.raises(ZooError, match=expected):
            read_safetensors_header(path)
    assert time.perf_counter() - start < 0.5  # before: 4 s for 40,000 dims of 2
    if expected:
        one_line(*zoo_cli("inspect", path), expected)


def test_an_integer_too_long_to_convert_is_one_line(tmp_path, zoo_cli):
    raw = b'{"t": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 16]}}'
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    one_line(*zoo_cli("inspect", path), "header is not valid JSON")


def test_showing_a_long_task_is_fast(tmp_path, zoo_cli):
    code, _, err = zoo_cli("add", write_adapter(tmp_path / "b", 1), "--name", "b", "--task", "x" * 40_000)
    assert code == 2 and err.count("\n") == 1 and "task" in err  # 40,000 characters: refused (at most 1,000)
    assert zoo_cli("add", write_adapter(tmp_path / "a", 1), "--name", "a", "--task", "x" * 1_000)[0] == 0
    for command in (["show", "a"], ["list"]):
        start = time.perf_counter()
        code, out, err = zoo_cli(*command)
        assert code == 0 and "xxxx" in out, err
        assert time.perf_counter() - start < 2  # before: 10 s in rich's highlighter


def pickled_adapter(folder: Path, state: dict, compress: bool = False) -> Path:
    import torch

    folder.mkdir(parents=True)
    (folder / CONFIG).write_text(json.dumps(LORA))
    torch.save(state, folder / "adapter_model.bin")
    if compress:  # the same members, deflated: a zip bomb's shape (torch's reader inflates them)
        src = folder / "adapter_model.bin"
        with zipfile.ZipFile(src) as z:
            members = [(i, z.read(i)) for i in z.infolist()]
        with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for info, data in members:
                z.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED)
    return folder


def test_a_pickle_that_inflates_is_refused_before_it_allocates(tmp_path, zoo_cli):
    import torch

    # 400 MB claimed by 4 bytes of storage: a zero-stride view; its first copy would allocate all of it
    expanded = {PREFIX + "lora_A.weight": torch.zeros(1).expand(100_000_000).reshape(1, -1), PREFIX + "lora_B.weight": torch.zeros(4, 1)}
    folder = pickled_adapter(tmp_path / "view", expanded)
    assert (folder / "adapter_model.bin").stat().st_size < 4096
    start = time.perf_counter()
    one_line(*zoo_cli("add", folder, "--name", "a", "--allow-pickle"), "needs 400,000,000 bytes but is a view of 4")
    assert time.perf_counter() - start < 5
    plain = {PREFIX + "lora_A.weight": torch.zeros(1, 4), PREFIX + "lora_B.weight": torch.zeros(4, 1)}
    one_line(*zoo_cli("add", pickled_adapter(tmp_path / "zip", plain, compress=True), "--name", "a", "--allow-pickle"), "torch.save stores members uncompressed")
    (tmp_path / "legacy").mkdir()
    (tmp_path / "legacy" / CONFIG).write_text(json.dumps(LORA))
    torch.save(plain, tmp_path / "legacy" / "adapter_model.bin", _use_new_zipfile_serialization=False)
    one_line(*zoo_cli("add", tmp_path / "legacy", "--name", "a", "--allow-pickle"), "is not a torch zip archive")
    registry_still_reads(zoo_cli)
    assert zoo_cli("add", pickled_adapter(tmp_path / "fine", plain), "--name", "fine", "--allow-pickle")[0] == 0


def test_non_finite_fusion_weights_are_refused_at_add(tmp_path):
    import shutil
    import warnings

    from safetensors.torch import load_file, save_file

    from tests.test_adapterhub import ROOT
    from zoo.errors import ZooError

    with warnings.catch_warnings():  # "seq" carries a prediction head, skipped with a warning
        warnings.simplefilter("ignore")
        for name in ("seq", "seq2"):
            zoo.add(ROOT / "bert" / "adapters" / name, name=name, allow_pickle=True)
    fusion = tmp_path / "fusion"
    shutil.copytree(ROOT / "bert" / "fusions" / "seq_seq2", fusion)
    weights = next(fusion.glob("*.safetensors"))
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone().fill_(float("inf"))
    save_file(tensors, weights)
    with pytest.raises(ZooError, match="holds ±Inf"):
        zoo.add(fusion, name="fuse")


@pytest.mark.parametrize("ref", ["a@1 ", " a", "a\n", "a@1\n"])
def test_references_with_whitespace_are_refused_by_every_command(ref, tmp_path, zoo_cli):
    assert zoo_cli("add", write_adapter(tmp_path / "a", 1), "--name", "a")[0] == 0
    for command in (["show", ref], ["export", ref, "--out", tmp_path / "x"], ["check", ref, "--for", "peft"], ["resize", ref, "--name", "r", "--rank", "1"]):
        code, out, err = zoo_cli(*command)
        assert code == 2 and "invalid reference" in err, (command, code, err)


def test_a_name_ending_in_a_newline_is_refused():
    from zoo.errors import ZooError
    from zoo.manifest import check_name

    with pytest.raises(ZooError):
        check_name("good\n")


def test_strings_that_are_not_utf8_are_refused_in_one_line(tmp_path, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    one_line(*zoo_cli("add", folder, "--name", "a", "--task", "\udcff"), "holds bytes that are not UTF-8")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["revision"] = "\udcff"
    (folder / "adapter_config.json").write_text(json.dumps(config))  # ASCII JSON: the escape \udcff
    one_line(*zoo_cli("add", folder, "--name", "b"), "holds bytes that are not UTF-8")
    registry_still_reads(zoo_cli)


@pytest.mark.parametrize("args, expected", [
    (["list", "--limit", "99999999999999999999999"], "--limit 99999999999999999999999 is too large"),
    (["compose", "a+b", "--name", "c", "--fusion", "weighted", "--seed", "99999999999999999999999"], "is out of range"),
    (["resize", "a", "--name", "r", "--sv-ratio", "inf"], "sv_ratio must be a finite number"),
])
def test_numbers_too_large_are_one_line(args, expected, tmp_path, zoo_cli):
    for name in ("a", "b"):
        assert zoo_cli("add", write_adapter(tmp_path / name, 1), "--name", name)[0] == 0
    one_line(*zoo_cli(*args), expected)
