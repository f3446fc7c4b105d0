"""`trust_remote_code` is never implied: a base whose config maps transformers' Auto classes to its own code
(`auto_map`) is refused with a one-line hint on every path that loads or sizes a base (`zoo.load`, `load_base`,
`zoo run`, `zoo estimate`), unless the caller passed `trust_remote_code=True` / `--trust-remote-code`.

The "remote" code is a local folder's `modeling_evil.py` that leaves a marker file when imported, so each
test sees whether it ran. No network.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import zoo
from tests.tiny import tiny_llama
from zoo.errors import ZooError
from zoo.estimate import estimate_adapter
from zoo.loading import load_base

MODULE = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig, LlamaForCausalLM

class EvilConfig(LlamaConfig):
    model_type = "evil"

class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def base_folder(root: Path, auto_map: dict, model_type: str = "evil", tokenizer_auto_map: dict | None = None) -> tuple[Path, Path]:
    """A saved tiny Llama whose config.json carries `auto_map` (and `model_type`); returns (folder, marker)."""
    folder, marker = root / "base", root / "code-ran"
    tiny_llama().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type, "auto_map": auto_map}))
    for module in ("configuration_evil", "modeling_evil", "modeling_llama"):
        (folder / f"{module}.py").write_text(MODULE.format(marker=str(marker)))
    if tokenizer_auto_map is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": tokenizer_auto_map}))
    return folder, marker


EVIL = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> tuple[Path, Path]:
    return base_folder(tmp_path_factory.mktemp("evil"), EVIL)


def test_load_refuses_a_base_that_needs_its_own_code(evil):
    folder, marker = evil
    with pytest.raises(ZooError, match=r"needs its own code to load \(configuration_evil.EvilConfig, modeling_evil.EvilForCausalLM in config.json\)"):
        zoo.load(folder)
    with pytest.raises(ZooError, match=r"pass trust_remote_code=True"):
        load_base(folder, task_type="CAUSAL_LM")  # the path `zoo compose --fusion attention` takes
    assert not marker.exists()


def test_cli_run_and_estimate_refuse_it_in_one_line(evil, zoo_cli):
    folder, marker = evil
    code, out, err = zoo_cli("run", folder, "-p", "hello")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--trust-remote-code" in err, err
    code, out, err = zoo_cli("estimate", "--base", folder)
    assert code == 2 and err.count("\n") == 1 and "needs remote code (configuration_evil.EvilConfig" in err, err
    assert "zoo-architecture.json" in err
    assert not marker.exists()


def test_trust_remote_code_true_runs_it(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM  # imported here: at collection time it would read HF_HUB_OFFLINE before conftest sets it

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # transformers copies the code here
    folder, marker = base_folder(tmp_path, EVIL)
    model = zoo.load(folder, model_class=AutoModelForCausalLM, trust_remote_code=True)
    assert type(model).__name__ == "EvilForCausalLM" and marker.read_text() == "ran"


def test_auto_map_to_built_in_classes_loads_without_running_code(tmp_path):
    """Like Phi-3's config: `auto_map` names classes transformers has itself, and with trust_remote_code=False
    transformers uses its own. Nothing is refused and the folder's code never runs."""
    from transformers import AutoModelForCausalLM

    folder, marker = base_folder(tmp_path, {"AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"}, model_type="llama")
    model = zoo.load(folder, model_class=AutoModelForCausalLM)
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()
    assert estimate_adapter(str(folder), rank=4).params == 2 * 4 * ((32 + 32) + (32 + 16))  # q (32→32), v (32→16) on 2 layers
    assert not marker.exists()


def test_a_tokenizer_that_needs_its_own_code_is_refused_by_run(tmp_path, zoo_cli):
    folder, marker = base_folder(tmp_path, {"AutoModelForCausalLM": "modeling_llama.LlamaForCausalLM"}, model_type="llama",
                                 tokenizer_auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    code, _, err = zoo_cli("run", folder, "-p", "hello")
    assert code == 2 and "tokenization_evil.EvilTokenizer in tokenizer_config.json" in err and err.count("\n") == 1, err
    assert not marker.exists()
