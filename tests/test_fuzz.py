"""Fuzzing (hypothesis): manifests, PEFT `adapter_config.json`, safetensors headers, composition specs and CLI
arguments. Whatever the input, the answer is a result or the project's own error — `ZooError` or
`CompositionError`, one line — and at the CLI exit code 2 with one `error:` line; never a traceback.

Examples are derived from a fixed seed (`derandomize`), so a run is reproducible; the counts add up to
several thousand cases.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import struct
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from compose.methods import METHODS
from tests.handmade import PREFIX, safetensors_bytes, write_adapter
from zoo.errors import USER_ERRORS
from zoo.formats.peft import PEFT_TYPES, config_from_peft
from zoo.formats.safetensors_header import DTYPE_BITS, read_safetensors_header
from zoo.manifest import parse_manifest
from zoo.registry import Registry

def fuzz(examples: int) -> settings:
    """`examples` cases from a fixed seed, no deadline (the machine is shared), no example database."""
    return settings(max_examples=examples, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None)

# --- strategies -----------------------------------------------------------------------------------------------

ODD_TEXT = ["", "..", "../x", "/etc/passwd", "a\nb", "\x1b[31m", "[/x]", "a@1", "a@", "@", "+", "a+", "a+b+", "nan", "-1",
            "1e309", "0", "ｅ", "\u202e", "\udcff", "a" * 300, "--help", "-", "null", "{}", "[]", "a,b", ",", "0.5,", " "]
text = st.one_of(st.sampled_from(ODD_TEXT), st.text(st.characters(exclude_characters="\x00"), max_size=12))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=6)


@st.composite
def mutated(draw, base: dict, extra_keys: list[str] = ()) -> object:
    """`base` with one to three changes: a value anywhere replaced, a key deleted, a key added; sometimes no dict at all."""
    if draw(st.integers(0, 30)) == 0:
        return draw(json_values)
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        node = data
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            if not isinstance(node[key], (dict, list)) or not node[key]:
                break
            node = node[key]
        if isinstance(node, dict):
            action = draw(st.sampled_from(["set", "delete", "add"]))
            if action == "add" or not node:
                node[draw(st.sampled_from(list(extra_keys)) if extra_keys and draw(st.booleans()) else text)] = draw(json_values)
            else:
                key = draw(st.sampled_from(sorted(node)))
                if action == "delete":
                    del node[key]
                else:
                    node[key] = draw(json_values)
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(json_values)
    return data


def user_error(e: BaseException) -> None:
    """The failure must be the project's own error, on one line."""
    assert isinstance(e, USER_ERRORS), f"{type(e).__name__}: {e}"
    assert "\n" not in str(e), str(e)


@contextlib.contextmanager
def only_user_errors():
    try:
        yield
    except Exception as e:  # noqa: BLE001 — the point: anything else fails the test
        user_error(e)


# --- manifests and the registry file ---------------------------------------------------------------------------

SHA = "0" * 64
VALID_MANIFEST = {
    "kind": "adapter", "name": "sql", "version": 1,
    "method": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 4}},
    "base_model": {"name_or_path": "org/base", "revision": None, "model_type": "llama", "architecture": None},
    "size": {"trainable_params": 10, "bytes": 40, "by_dtype": {"F32": {"params": 10, "bytes": 40}}},
    "files": [{"path": "adapter_config.json", "sha256": SHA, "size": 1}, {"path": "adapter_model.safetensors", "sha256": SHA, "size": 2}],
    "source": {"kind": "hub", "repo_id": "org/sql", "revision": "a" * 40},
    "task": "sql", "tags": ["x"], "created_at": "2024-01-01T00:00:00Z",
}
VALID_COMPOSITION = {
    "kind": "composition", "name": "duo", "fusion": "attention",
    "members": [{"name": "a", "version": 1, "sha256": SHA}, {"name": "b", "version": 2, "sha256": SHA}],
    "fusion_config": {"members": ["a", "b"], "temperature": 1.0},
    "size": {"trainable_params": 0, "bytes": 0}, "files": [],
    "source": {"kind": "composition", "members": [{"name": "a", "version": 1, "sha256": SHA}], "recipe": {"seed": 0}},
}


def test_the_seeds_are_valid():
    assert parse_manifest(VALID_MANIFEST).ref == "sql@1" and parse_manifest(VALID_COMPOSITION).fusion == "attention"


@fuzz(1000)
@given(data=st.one_of(mutated(VALID_MANIFEST, ["dora", "method", "kind"]), mutated(VALID_COMPOSITION, ["kind", "fusion"])))
def test_fuzz_manifests(data):
    with only_user_errors():
        parse_manifest(data)


@fuzz(300)
@given(entries=st.lists(mutated(VALID_MANIFEST), max_size=3), cut=st.integers(0, 4000), junk=st.binary(max_size=8))
def test_fuzz_registry_files(entries, cut, junk, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz-registry.json"
    body = json.dumps({"format": "adapter-zoo/registry", "schema_version": 1, "adapters": entries}).encode()
    for raw in (body, body[:cut] + junk):
        path.write_bytes(raw)
        with only_user_errors():
            Registry(path).read()


# --- PEFT adapter_config.json ----------------------------------------------------------------------------------


def peft_seed(peft_type: str) -> dict:
    config_class = METHODS[PEFT_TYPES[peft_type]][0]
    required = {
        "LORA": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]},
        "ADALORA": {"init_r": 12, "target_r": 8, "lora_alpha": 32, "target_modules": ["q_proj"]},
        "IA3": {"target_modules": ["k_proj"], "feedforward_modules": []},
        "PREFIX_TUNING": {"num_virtual_tokens": 4, "token_dim": 32, "num_layers": 2, "num_attention_heads": 4},
        "PROMPT_TUNING": {"num_virtual_tokens": 4, "token_dim": 32},
        "P_TUNING": {"num_virtual_tokens": 4, "token_dim": 32},
    }[peft_type]
    return {"peft_type": peft_type, "task_type": "CAUSAL_LM", **{k: v for k, v in required.items() if k in config_class.model_fields}}


PEFT_KEYS = sorted({k for method in PEFT_TYPES.values() for k in METHODS[method][0].model_fields}
                   | {"bias", "layer_replication", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "peft_type"})


@fuzz(800)
@given(data=st.data(), peft_type=st.sampled_from(sorted(PEFT_TYPES)))
def test_fuzz_peft_configs(data, peft_type):
    config = data.draw(mutated(peft_seed(peft_type), PEFT_KEYS))
    with warnings.catch_warnings(), only_user_errors():
        warnings.simplefilter("ignore")
        if isinstance(config, dict):
            config_from_peft(config)
        else:  # not an object: the reader refuses it before config_from_peft sees it
            from zoo.formats.peft import read_json_config

            path = Path(os.environ["ZOO_HOME"]).parent / "adapter_config.json"
            path.write_text(json.dumps(config))
            read_json_config(path)


def test_the_peft_seeds_are_valid():
    for peft_type in PEFT_TYPES:
        assert config_from_peft(peft_seed(peft_type))[0].method == PEFT_TYPES[peft_type]


# --- AdapterHub adapter_config.json ----------------------------------------------------------------------------

ADAPTERHUB = Path(__file__).parent / "fixtures" / "adapterhub" / "bert"
ADAPTERHUB_KINDS = ["seq", "par", "dbl", "noln", "prefix", "mam"]  # bottleneck variants, prefix tuning, MAM


@pytest.fixture(scope="module")
def adapterhub_copies(tmp_path_factory) -> dict[str, Path]:
    """Each fixture adapter in a folder of its own, whose adapter_config.json the fuzzer rewrites."""
    root = tmp_path_factory.mktemp("adapterhub")
    return {kind: Path(shutil.copytree(ADAPTERHUB / "adapters" / kind, root / kind)) for kind in ADAPTERHUB_KINDS}


def adapterhub_seed(kind: str) -> dict:
    return json.loads((ADAPTERHUB / "adapters" / kind / "adapter_config.json").read_text())


@fuzz(250)
@given(data=st.data(), kind=st.sampled_from(ADAPTERHUB_KINDS))
def test_fuzz_adapterhub_configs(adapterhub_copies, data, kind):
    from zoo.formats.adapterhub import is_adapterhub_folder, read_adapterhub_adapter

    folder = adapterhub_copies[kind]
    config = data.draw(mutated(adapterhub_seed(kind), ["config", "architecture", "phm_layer", "inv_adapter", "reduction_factor", "prefix_length"]))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    base_config = json.loads((ADAPTERHUB / "base" / "config.json").read_text())
    with warnings.catch_warnings(), only_user_errors():
        warnings.simplefilter("ignore")
        if is_adapterhub_folder(folder):
            read_adapterhub_adapter(folder, allow_pickle=True, model_config=base_config)


def test_the_adapterhub_seeds_are_valid(adapterhub_copies):
    from zoo.formats.adapterhub import read_adapterhub_adapter

    base_config = json.loads((ADAPTERHUB / "base" / "config.json").read_text())
    for kind in ADAPTERHUB_KINDS:
        (adapterhub_copies[kind] / "adapter_config.json").write_text(json.dumps(adapterhub_seed(kind)))
        assert read_adapterhub_adapter(adapterhub_copies[kind], allow_pickle=True, model_config=base_config)[0].method in ("bottleneck", "prefix", "mam")


# --- safetensors headers ---------------------------------------------------------------------------------------

dtypes = st.one_of(st.sampled_from(sorted(DTYPE_BITS)), text)
dims = st.lists(st.one_of(st.integers(0, 5), st.integers(-2, 2**64), st.floats(0, 4), st.booleans(), text), max_size=3)


@st.composite
def headers(draw) -> tuple[bytes, bool]:
    """Raw safetensors bytes: mostly well-formed tensors laid end to end, then perturbed."""
    header, offset = {}, 0
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(dtypes)
        shape = draw(st.lists(st.integers(0, 4), max_size=3)) if draw(st.booleans()) else draw(dims)
        if dtype in DTYPE_BITS and isinstance(shape, list) and all(type(d) is int for d in shape):
            size = math.prod(shape) * DTYPE_BITS[dtype] // 8
        else:  # a junk dtype or shape (math.prod of strings would repeat them): any size
            size = draw(st.integers(0, 32))
        begin = offset + draw(st.sampled_from([0, 0, 0, 1, -1, 8]))
        end = begin + size + draw(st.sampled_from([0, 0, 0, 1, -4]))
        header[draw(st.sampled_from([f"t{i}", "t0", "__metadata__", "[/x]", "a\nb"]))] = (
            {"dtype": dtype, "shape": shape, "data_offsets": draw(st.sampled_from([[begin, end], [begin], "x", [end, begin]]))}
            if draw(st.integers(0, 9)) else draw(json_values)
        )
        offset = max(offset, end if isinstance(end, int) and end > 0 else 0)
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(text, st.one_of(text, scalars), max_size=2))
    raw = safetensors_bytes(header, bytes(min(max(0, offset + draw(st.sampled_from([0, 0, 1, -1]))), 1 << 12)))  # huge shapes: short data
    if draw(st.integers(0, 4)) == 0:  # flip, cut or append bytes anywhere
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        raw = draw(st.sampled_from([raw[:at], raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1:] if raw else raw, raw + b"\0"]))
    return raw


@fuzz(700)
@given(raw=headers())
def test_fuzz_safetensors_headers_agree_with_the_safetensors_library(raw, tmp_path_factory):
    """Our reader accepts exactly what `safetensors` itself opens, and reads the same dtypes and shapes."""
    from safetensors import safe_open

    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(raw)
    ours = theirs = None
    try:
        ours = read_safetensors_header(path)
    except Exception as e:  # noqa: BLE001
        user_error(e)
    try:
        with safe_open(path, "pt") as f:
            theirs = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # noqa: BLE001 — the library's own refusal
        pass
    if ours is not None:
        assert theirs == {k: (t.dtype, list(t.shape)) for k, t in ours.tensors.items()}
    else:
        assert theirs is None, f"safetensors opens what we refuse: {raw[:200]!r}"


# --- composition specs and CLI arguments -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A registry with three adapters (a, b compatible; c of another rank) and their folders under src/, in a
    folder that is the working directory while fuzzing (relative paths land there)."""
    root = tmp_path_factory.mktemp("fuzz-cli")
    for seed, name in enumerate(("a", "b"), 1):
        write_adapter(root / "src" / name, seed)
    c = write_adapter(root / "src" / "c", 3)
    (c / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    header = {PREFIX + "lora_A.weight": {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
              PREFIX + "lora_B.weight": {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]}}
    (c / "adapter_model.safetensors").write_bytes(safetensors_bytes(header, struct.pack("<16f", *range(16))))
    return root


@pytest.fixture
def registered(sandbox, monkeypatch, zoo_cli):
    """The sandbox's adapters registered; `reset()` puts the registry back as it was (fuzzed commands add and remove)."""
    import typer.main
    from huggingface_hub import constants

    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("ZOO_REGISTRY", str(Path(os.environ["ZOO_HOME"]) / "registry.json"))  # reset() restores the file's bytes
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import, maybe before conftest set it: no Hub here
    # typer rebuilds the click command (52 ms) on every call; a process runs one, the fuzzer thousands
    monkeypatch.setattr(typer.main, "get_command", functools.cache(typer.main.get_command))
    home = Path(os.environ["ZOO_HOME"])
    for name in ("a", "b", "c"):
        assert zoo_cli("add", sandbox / "src" / name, "--name", name)[0] == 0
    saved = (home / "registry.json").read_bytes()

    def reset() -> None:
        (home / "registry.json").write_bytes(saved)
        shutil.rmtree(sandbox / "out", ignore_errors=True)

    return reset


def check_cli(code: int, out: str, err: str) -> None:
    event(f"exit code {code}" + (" (usage)" if code == 2 and "Error: " in err else ""))  # --hypothesis-show-statistics
    assert "Traceback" not in out + err, err
    assert code in (0, 1, 2), (code, out, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        if not lines:  # `zoo` alone: the help, on stdout
            assert out.startswith("Usage: ") or "Usage: " in out, out
        elif lines[-1].startswith("Error: "):  # click's usage error: one `Error:` line, maybe after the usage and a hint
            assert len(lines) == 1 or (len(lines) == 3 and lines[0].startswith("Usage: ")), err
        else:  # ours: exactly one line
            assert len(lines) == 1 and lines[0].startswith("error: "), err


def mostly(good, bad=text, odds: int = 4):
    """`good` `odds` times in `odds + 1`, `bad` otherwise: enough valid input to get past the parser and into the code."""
    return st.integers(0, odds).flatmap(lambda i: bad if i == odds else good)  # (hypothesis leans to 0: good)


REFS = ["a", "b", "c", "a@1", "b@1", "a@2", "a@x", "nobody", "", " a", "a b", "../a", "x@1@2", "a+b"]
specs = mostly(st.sampled_from(["a+b", "a@1+b@1", "b+a", "a+c", "a+b+c", "a"]), st.lists(st.sampled_from(REFS), min_size=1, max_size=4).map("+".join) | text)
numbers = st.one_of(st.floats(-3, 3), st.integers(-3, 3), st.floats())
weights = mostly(st.one_of(st.none(), st.lists(numbers, min_size=2, max_size=2).map(lambda w: ",".join(map(str, w))),
                           st.lists(numbers, min_size=1, max_size=4).map(lambda w: ",".join(map(str, w)))))
METHODS_ = ["cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_ties_svd", "magnitude_prune_svd"]


@fuzz(500)
@given(spec=specs, fusion=mostly(st.sampled_from(["stack", "weighted", "weighted", "attention"])), weights=weights,
       method=mostly(st.sampled_from(METHODS_)), rank=mostly(st.one_of(st.none(), st.integers(-1, 9)).map(lambda r: r and str(r)), odds=9),
       density=mostly(st.one_of(st.none(), st.floats(-0.5, 1.5).map(str)), odds=9), name=mostly(st.sampled_from(["mix", "mix", "a", "../x", ""])))
def test_fuzz_composition_specs(registered, zoo_cli, spec, fusion, weights, method, rank, density, name):
    args = ["compose", spec, "--name", name, "--fusion", fusion, "--method", method]
    args += [f"--weights={weights}"] if weights is not None else []
    args += [f"--rank={rank}"] if rank is not None else []
    args += [f"--density={density}"] if density is not None else []
    check_cli(*zoo_cli(*args))
    registered()


COMMANDS = ["list", "show", "remove", "verify", "inspect", "estimate", "add", "schema", "compose", "merge", "run", "pull", "push", "search",
            "check", "export", "extract", "resize"] * 3 + ["bogus", ""]
NAMES = st.sampled_from(REFS + ["src/a/adapter_model.safetensors", "./src/c", "src/a/", "src"])
OPTION_VALUES = {  # each option with plausible values for it, so most cases reach the command's own code
    "--name": NAMES, "--task": text, "--tag": text, "--registry": st.sampled_from(["registry.json", "a", "new.json", ".."]),
    "--base": st.sampled_from(["src/a", "org/base", "..", "config.json", "nowhere"]), "--method": st.sampled_from(METHODS_ + ["lora", "ia3", "prefix", "x"]),
    "--rank": st.integers(-2, 9).map(str), "--targets": st.sampled_from(["q_proj", "all-linear", ",", ""]), "--dtype": st.sampled_from(["fp16", "fp32", "int4"]),
    "--fusion": st.sampled_from(["stack", "weighted", "attention"]), "--weights": weights.map(str), "--out": st.sampled_from(["out", "src/a", "."]),
    "--quantize": st.sampled_from(["nf4", "fp4", "int8", "int3"]), "--limit": st.integers(-1, 3).map(str), "-p": text, "--prompt": text,
    "--drop": st.integers(-1, 3).map(str), "--density": st.floats(-0.5, 1.5).map(str), "--epochs": st.integers(-1, 2).map(str),
    "--for": st.sampled_from(["vllm", "llama.cpp", "peft", "tgi"]), "--to": st.sampled_from(["gguf", "peft", "onnx"]),
    "--outtype": st.sampled_from(["f32", "f16", "bf16", "q8_0", "q4_0"]), "--tuned": st.sampled_from(["src/a", "src", "nowhere"]),
    "--sv-threshold": st.floats(-0.5, 1.5).map(str), "--sv-ratio": st.floats(-1, 20).map(str), "--sv-fro": st.floats(-0.5, 1.5).map(str),
}
FLAGS = ["--json", "--repair", "--allow-pickle", "--trust-remote-code", "--help", "--bogus"]


def params_of(command: str) -> tuple[list, list[str]]:
    """The required parameters of `zoo <command>` (click's, as typer builds them) and all its option names."""
    import typer.main

    from cli.main import app

    params = getattr(typer.main.get_command(app).commands.get(command), "params", [])
    return [p for p in params if p.required], sorted(o for p in params for o in p.opts if o.startswith("-"))


@st.composite
def command_lines(draw) -> list[str]:
    """`command` with its required parameters and up to three more arguments, mostly plausible: its own options
    with values of the right kind; sometimes a foreign option, a stray word, anything."""
    command = draw(st.sampled_from(COMMANDS))
    required, own = params_of(command)
    args = [command] if command else []
    for param in required:
        option = next((o for o in param.opts if o.startswith("-")), None)
        value = draw(mostly(OPTION_VALUES.get(option, NAMES)))
        args += [option, value] if option else [value]
    for _ in range(draw(st.integers(0, 3))):
        option = draw(mostly(st.sampled_from(own), st.sampled_from(sorted(OPTION_VALUES) + FLAGS), odds=9)) if own else "--help"
        if draw(st.integers(0, 19)) == 0:
            args.append(draw(st.one_of(text, NAMES)))  # a stray positional
        else:
            args += [option, draw(mostly(OPTION_VALUES[option]))] if option in OPTION_VALUES else [option]
    return args


@fuzz(600)
@given(argv=command_lines())
def test_fuzz_cli_arguments(registered, zoo_cli, argv):
    check_cli(*zoo_cli(*argv))
    registered()
