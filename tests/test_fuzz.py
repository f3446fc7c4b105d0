"""Fuzzing (hypothesis): manifests, PEFT `adapter_config.json`, safetensors headers, composition specs and CLI
arguments. Whatever the input, the answer is a result or the project's own error — `ZooError` or
`CompositionError`, one line — and at the CLI exit code 2 with one `error:` line; never a traceback.

The last section runs hostile files through the CLI — adapter configs (`zoo add`), headers and weights (`zoo add`,
`zoo inspect`), base index and config files (`zoo merge`), registry files, references (every command) — and also
checks that nothing was written outside `--out` and `$ZOO_HOME`, and that the registry still reads back.

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


# --- hostile files through the CLI: no traceback, no write outside --out / $ZOO_HOME, the registry always readable ---


def tree_state(root: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """Every file under `root` but those under `skip`: path → (size, mtime in ns); folders as (-1, 0)."""
    state = {}
    for path in root.rglob("*"):
        if any(path == s or s in path.parents for s in skip):
            continue
        st = path.lstat()
        state[str(path)] = (-1, 0) if path.is_dir() and not path.is_symlink() else (st.st_size, st.st_mtime_ns)
    return state


@contextlib.contextmanager
def confined(*allowed: Path, registry_readable: bool = True):
    """Fails if anything under the sandbox or the test's folder changed outside `allowed` (and $ZOO_HOME), or if the
    registry can no longer be read."""
    home = Path(os.environ["ZOO_HOME"])
    roots = (Path.cwd(), home.parent)
    skip = (home, *(p.absolute() for p in allowed))
    before = [tree_state(r, skip) for r in roots]
    yield
    after = [tree_state(r, skip) for r in roots]
    for b, a in zip(before, after):
        changed = sorted(p for p in b.keys() | a.keys() if b.get(p) != a.get(p))
        assert not changed, f"written outside --out / $ZOO_HOME: {changed[:5]}"
    if registry_readable:  # readable, and every entry reads back as written (a process caches what it parsed: check the JSON)
        for m in Registry(home / "registry.json").read():
            parse_manifest(json.loads(m.model_dump_json()))


def write_input(folder: Path, files: dict[str, bytes]) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def json_bytes(data: object) -> bytes:
    return json.dumps(data, allow_nan=True).encode()  # NaN and Infinity as Python writes them: input to refuse


@fuzz(100)
@given(data=st.data(), peft_type=st.sampled_from(["LORA", "LORA", "ADALORA", "IA3"]))
def test_fuzz_adapter_configs_through_zoo_add(registered, zoo_cli, data, peft_type):
    config = data.draw(mutated({**peft_seed(peft_type), "r": 1, "lora_alpha": 2, "base_model_name_or_path": "org/base",
                                "rank_pattern": {"q_proj": 1}, "alpha_pattern": {}}, PEFT_KEYS + ["revision", "auto_mapping", "task_type"]))
    weights = (Path("src/a") / "adapter_model.safetensors").read_bytes()
    folder = write_input(Path("in/adapter"), {"adapter_config.json": json_bytes(config), "adapter_model.safetensors": weights})
    with confined(Path("in")), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_cli(*zoo_cli("add", folder, "--name", "x"))
    registered()


@st.composite
def lora_weights(draw) -> bytes:
    """write_adapter's two tensors (1×4, 4×1) with any values, in any dtype, and sometimes a shape of hundreds of dims."""
    dtype = draw(st.sampled_from(["F32", "F32", "F16", "BF16", "I32", "BOOL", "U8"]))
    size = DTYPE_BITS[dtype] // 8
    shape_a = draw(st.one_of(st.just([1, 4]), st.lists(st.sampled_from([1, 1, 2, 1 << 62]), min_size=40, max_size=400)))
    values = draw(st.lists(st.one_of(st.floats(width=32), st.sampled_from([math.nan, math.inf, -math.inf, 3e38])), min_size=8, max_size=8))
    fmt = {"F32": "<8f", "F16": "<8e", "BF16": None, "I32": "<8i", "BOOL": None, "U8": None}[dtype]
    if fmt == "<8e":
        values = [v if not math.isfinite(v) or abs(v) < 65504 else math.inf for v in values]
    data = (struct.pack(fmt, *values) if fmt and fmt != "<8i" else struct.pack("<8i", *range(8)) if fmt else
            struct.pack("<8f", *values)[2::2][: 8 * size].ljust(8 * size, b"\0") if dtype == "BF16" else bytes([1, 0] * 4))
    header = {PREFIX + "lora_A.weight": {"dtype": dtype, "shape": shape_a, "data_offsets": [0, 4 * size]},
              PREFIX + "lora_B.weight": {"dtype": dtype, "shape": [4, 1], "data_offsets": [4 * size, 8 * size]}}
    return safetensors_bytes(header, data)


@fuzz(120)
@given(raw=st.one_of(headers(), lora_weights()), command=st.sampled_from(["add", "add", "inspect"]))
def test_fuzz_safetensors_headers_through_the_cli(registered, zoo_cli, raw, command):
    """Hostile headers and weights: what `zoo add` accepts has a valid header and only finite floating-point values."""
    config = (Path("src/a") / "adapter_config.json").read_bytes()
    folder = write_input(Path("in/adapter"), {"adapter_config.json": config, "adapter_model.safetensors": raw})
    with confined(Path("in")):
        code, out, err = zoo_cli(*(["add", folder, "--name", "x"] if command == "add" else ["inspect", folder / "adapter_model.safetensors"]))
    check_cli(code, out, err)
    if command == "add" and code == 0:
        from safetensors.torch import load_file

        import zoo

        stored = load_file(zoo.api.adapter_folder(zoo.show("x")) / "adapter_model.safetensors")
        assert all(t.is_floating_point() and bool(t.isfinite().all()) for t in stored.values()), stored
    registered()


SHARD_KEY = "model.layers.0.self_attn.q_proj.weight"
SHARD = safetensors_bytes({SHARD_KEY: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, struct.pack("<16f", *range(16)))
SHARD_NAMES = ["model-00001.safetensors", "../victim.safetensors", "/etc/hostname", "", ".", "..", "sub/x.safetensors",
               "model-00001.safetensors/", "a\\b.safetensors", "missing.safetensors", "\udcff", "config.json"]


@fuzz(50)
@given(index=mutated({"metadata": {"total_size": 64}, "weight_map": {SHARD_KEY: "model-00001.safetensors"}}),
       name=st.sampled_from(SHARD_NAMES), config=mostly(st.just({"model_type": "llama"}), json_values, odds=3),
       dtype=st.sampled_from([[], ["--dtype", "fp16"]]))
def test_fuzz_base_index_and_config_through_zoo_merge(registered, zoo_cli, index, name, config, dtype):
    """Index files (shard names leaving the folder among them) and config.json: a merge writes its --out or nothing,
    and reads no file outside the base folder as a shard (the victim beside it stays as it was)."""
    if isinstance(index, dict) and isinstance(index.get("weight_map"), dict) and index["weight_map"]:
        index["weight_map"][next(iter(index["weight_map"]))] = name
    Path("victim.safetensors").write_bytes(SHARD)
    base = write_input(Path("in/base"), {"model.safetensors.index.json": json_bytes(index), "model-00001.safetensors": SHARD,
                                         "config.json": json_bytes(config)})
    with confined(Path("in"), Path("out")):
        check_cli(*zoo_cli("merge", "a", "--base", base, "--out", "out", *dtype))
    assert Path("victim.safetensors").read_bytes() == SHARD
    registered()


@fuzz(120)
@given(entries=st.lists(mostly(st.just(VALID_MANIFEST), mutated(VALID_MANIFEST, ["kind", "method"]), odds=2), min_size=1, max_size=2),
       command=st.sampled_from([["list"], ["show", "sql"], ["verify"], ["remove", "sql"], ["add", "src/a", "--name", "n"]]),
       nan=st.booleans())
def test_fuzz_registry_files_through_the_cli(registered, zoo_cli, entries, command, nan):
    """A registry edited by hand (NaN included): each command answers or says the file is invalid, and never
    overwrites a registry it could not read."""
    home = Path(os.environ["ZOO_HOME"])
    raw = json.dumps({"format": "adapter-zoo/registry", "schema_version": 1, "adapters": entries}, allow_nan=True).encode()
    if nan:
        raw = raw.replace(b'"lora_alpha": 16', b'"lora_alpha": NaN')
    (home / "registry.json").write_bytes(raw)
    try:
        Registry(home / "registry.json").read()
        readable = True
    except Exception as e:  # noqa: BLE001
        user_error(e)
        readable = False
    with confined(registry_readable=readable):
        code, out, err = zoo_cli(*command)
    check_cli(code, out, err)
    if not readable:  # never overwritten
        assert (home / "registry.json").read_bytes() == raw and code == 2, (command, err)
    registered()


VERSIONS = ["1", "2", "01", "²", "١", "1.0", "+1", " 1", "0", "-1", "1e3", "99999999999999999999", "", "x", "1@1", "٣", "𝟙"]


@fuzz(120)
@given(name=st.sampled_from(["a", "b", "c", "nobody", "src", "./src/a", "src/a", "a.b", ""]), version=st.one_of(st.none(), st.sampled_from(VERSIONS)),
       command=st.sampled_from(["show", "remove", "verify", "inspect", "push", "merge", "compose"]))
def test_fuzz_references_through_the_cli(registered, zoo_cli, name, version, command):
    """Every command reads a reference the same way: what `show` shows is what `remove` removes, and a reference that
    only looks like a version (`a@01`, `a@²`) is refused by all of them."""
    ref = name if version is None else f"{name}@{version}"
    shown = zoo_cli("show", ref, "--json")
    args = {"push": ["push", ref, "org/x"], "merge": ["merge", ref, "--base", "in/nowhere", "--out", "out"],
            "compose": ["compose", f"{ref}+b", "--name", "mix"]}.get(command, [command, ref])
    before = {m.ref for m in Registry(Path(os.environ["ZOO_HOME"]) / "registry.json").read()}
    with confined(Path("out")):
        code, out, err = zoo_cli(*args)
    check_cli(code, out, err)
    if version is not None and not (version.isascii() and version.isdigit() and version[0] != "0"):
        assert code == 2 and shown[0] == 2, (ref, out, err)  # refused, by show too
    if command == "remove":
        after = {m.ref for m in Registry(Path(os.environ["ZOO_HOME"]) / "registry.json").read()}
        expected = {json.loads(shown[1])["name"] + "@" + str(json.loads(shown[1])["version"])} if shown[0] == 0 and version else set()
        if shown[0] == 0 and not version:
            expected = {r for r in before if r.split("@")[0] == name}
        assert before - after == expected, (ref, before, after)
    registered()
