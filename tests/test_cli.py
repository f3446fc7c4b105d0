"""The CLI: one-line errors with exit code 2, --json on read commands, and a start-up without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0))
    folder = tmp_path_factory.mktemp("cli") / "gpt2-lora"
    get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)).save_pretrained(folder)
    return folder


def test_add_list_show_remove_roundtrip(zoo_cli, adapter_dir):
    code, out, err = zoo_cli("add", adapter_dir, "--name", "g", "--task", "poems", "--tag", "demo")
    assert code == 0, err
    assert out.startswith("added g@1: lora r=4 α=8, 1,024 params")
    code, out, _ = zoo_cli("list", "--json")
    entries = json.loads(out)
    assert [(e["name"], e["version"], e["task"], e["size"]["trainable_params"]) for e in entries] == [("g", 1, "poems", 1024)]
    code, out, _ = zoo_cli("list", "--task", "other", "--json")
    assert json.loads(out) == []
    code, out, _ = zoo_cli("list")
    assert code == 0 and "g" in out and "1,024" in out
    code, out, _ = zoo_cli("show", "g@1", "--json")
    assert json.loads(out)["method"]["fan_in_fan_out"] is True
    code, out, _ = zoo_cli("verify", "--json")
    assert code == 0 and all(r["problem"] is None for r in json.loads(out))
    code, out, _ = zoo_cli("inspect", "g", "--json")
    assert code == 0 and json.loads(out)["trainable_params"] == 1024
    assert zoo_cli("remove", "g")[1].strip() == "removed g@1"
    assert json.loads(zoo_cli("list", "--json")[1]) == []


def test_schema_is_json_schema(zoo_cli):
    code, out, _ = zoo_cli("schema")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "Manifest"
    assert set(schema["discriminator"]["mapping"]) == {"adapter", "composition"}
    assert "method" in schema["$defs"]["AdapterManifest"]["properties"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["add", "/no/such/folder"], "does not exist"),
        (["show", "nobody"], "no adapter named 'nobody'"),
        (["show", "x@latest"], "invalid reference"),
        (["add", "{adapter}", "--name", "../evil"], "invalid adapter name"),
        (["inspect", "missing-name"], "no adapter named"),
        (["estimate", "--base", "/no/config.json"], "no such config"),
        (["add"], "Missing argument"),
        (["list", "--bogus"], "No such option"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(zoo_cli, adapter_dir, args, message):
    code, out, err = zoo_cli(*[a.format(adapter=adapter_dir) for a in args])
    assert code == 2
    assert message in err
    assert "Traceback" not in err + out
    if not message[0].isupper():  # our own errors: exactly one line
        assert err.count("\n") == 1 and err.startswith("error: ")


def test_the_same_files_again_change_nothing(zoo_cli, adapter_dir):
    assert zoo_cli("add", adapter_dir, "--name", "g")[0] == 0
    code, out, err = zoo_cli("add", adapter_dir, "--name", "g")
    assert code == 0 and out == "unchanged: g@1 already holds these files (nothing was added)\n", err
    assert len(json.loads(zoo_cli("list", "--json")[1])) == 1


def test_verify_exit_code_on_corruption(zoo_cli, adapter_dir, isolated_zoo):
    assert zoo_cli("add", adapter_dir, "--name", "g")[0] == 0
    blobs = list((isolated_zoo / "zoo-home" / "blobs" / "sha256").iterdir())
    for blob in blobs:
        blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    code, out, _ = zoo_cli("verify")
    assert code == 1 and "BAD" in out


@pytest.mark.parametrize("command", [["list"], ["show", "x"], ["list", "--help"], ["add", "--help"], ["inspect", "--help"], ["estimate", "--help"], ["schema"]])
def test_start_up_does_not_import_torch(command, tmp_path):
    """Commands that need no tensors answer without importing torch or transformers."""
    probe = (
        "import sys\nfrom cli.main import main\n"
        f"try:\n    main({command!r})\nexcept SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors.torch') if m in sys.modules)\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    env = {"ZOO_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stderr, result.stderr
