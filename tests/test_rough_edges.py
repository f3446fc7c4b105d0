"""What a new user hits first (issue 12): compositions keep their base's class, every kind of entry prints
its summary, bases that cannot be found fail fast in one line, defaults work, options that do not apply
are refused, and a changed folder added again becomes the next version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import zoo
from tests.tiny import make_peft_adapter, tiny_llama, token_ids
from zoo.errors import ZooError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"


def tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer (tokenizer.json) whose ids fit the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "select name from users where id order by good bad movie".split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>").save_pretrained(folder)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A saved LlamaForCausalLM with a tokenizer, and two LoRAs of it saved without a task type (peft then
    records the class in auto_mapping)."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    tiny_tokenizer(root / "base")
    a = make_peft_adapter(base, root / "a", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter(base, root / "b", seed=2, r=2, target_modules=["q_proj", "o_proj"])
    return root / "base", a, b


# ---- item 2: compositions keep their base's identity ----------------------------------------------


@pytest.mark.parametrize("fusion, members", [("weighted", ["a", "b"]), ("stack", ["c", "a"])])
def test_composition_keeps_the_members_architecture(llama, tmp_path, fusion, members):
    base, a, b = llama
    zoo.add(a, name="a")
    zoo.add(b, name="b")
    zoo.add(make_peft_adapter(tiny_llama(), tmp_path / "c", r=2, target_modules=["k_proj"], task_type="CAUSAL_LM"), name="c")
    assert zoo.show("a").base_model.architecture == "LlamaForCausalLM" and zoo.show("c").base_model.architecture is None
    extra = dict(method="svd", rank=16) if fusion == "weighted" else {}
    ab = zoo.compose(members, fusion=fusion, name="ab", **extra)  # each field from the first member that has it
    assert ab.base_model.architecture == "LlamaForCausalLM"
    from cli.main import app
    from typer.testing import CliRunner

    assert "architecture: LlamaForCausalLM" in CliRunner().invoke(app, ["show", "ab"]).output.splitlines()
    model = zoo.load(base, adapters=["ab"])
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model(token_ids()).logits.shape[-1] == 64


def test_base_alone_loads_as_its_config_class(llama, tmp_path):
    base, _, _ = llama
    assert type(zoo.load(base)).__name__ == "LlamaForCausalLM"  # not the headless LlamaModel
    for architectures in (["pipeline"], ["os"], "LlamaForCausalLM", [{"x": 1}]):  # only transformers' own model classes
        folder = tmp_path / "odd"
        folder.mkdir(exist_ok=True)
        for f in base.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        config = json.loads((base / "config.json").read_text()) | {"architectures": architectures}
        (folder / "config.json").write_text(json.dumps(config))
        assert type(zoo.load(folder)).__name__ == "LlamaModel"


# ---- item 6: bases that cannot be found --------------------------------------------------------------


@pytest.mark.parametrize("base", ["./minilm-base-typo", "/x/y", "~/x", "a/b/c"])
def test_missing_folder_says_so(zoo_cli, base):
    code, out, err = zoo_cli("run", base, "-p", "hi")
    assert code == 2 and err == f"error: folder {base!r} does not exist — check the path (a typo?), or pass a Hub repo id such as org/name\n"


def test_missing_adapter_folder_says_so(zoo_cli, llama):
    base, _, _ = llama
    code, out, err = zoo_cli("run", base, "-p", "hi", "--adapters", "./typo-adapter")
    assert code == 2 and err == "error: adapter folder './typo-adapter' does not exist — check the path (a typo?), or write NAME[@VERSION] for a registered adapter\n"


def test_unreachable_hub_is_one_line_within_seconds(tmp_path):
    """No network: the client's retries (1+2+4+8+8 s per file) are not waited for."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    zoo.add(REPO / "examples" / "adapters" / "minilm-sentiment", name="a")  # members whose base is a Hub id: compose without --base
    zoo.add(REPO / "examples" / "adapters" / "minilm-topic", name="b")
    for args in (["run", "org/no-such-model", "-p", "hi"], ["compose", "a+b", "--name", "f", "--fusion", "attention"]):  # search: test_hub
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True, timeout=60)
        assert time.perf_counter() - start < 20
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
        assert run.stderr.startswith("error: cannot reach the Hub (http://127.0.0.1:9)") and "HF_ENDPOINT" in run.stderr


def test_unknown_hub_repo_is_one_line(zoo_cli, server):
    code, _, err = zoo_cli("run", "org/no-such-model", "-p", "hi")
    assert code == 2 and err.startswith("error: no model 'org/no-such-model' on the Hub") and "typo" in err


# ---- item 3: every kind of entry prints its summary -------------------------------------------------


def test_every_kind_of_entry_prints_its_summary(zoo_cli, tmp_path):
    from safetensors.torch import load_file

    for member in ("seq", "seq2"):
        assert zoo_cli("add", FIXTURES / "bert" / "adapters" / member, "--name", member)[0] == 0
    fusion = tmp_path / "fusion"  # as AdapterHub saves it by default: a pickle
    fusion.mkdir()
    source = FIXTURES / "bert" / "fusions" / "seq_seq2"
    (fusion / "adapter_fusion_config.json").write_bytes((source / "adapter_fusion_config.json").read_bytes())
    torch.save(load_file(source / "model_adapter_fusion.safetensors"), fusion / "pytorch_model_adapter_fusion.bin")
    code, out, err = zoo_cli("add", fusion, "--name", "fab", "--allow-pickle")
    assert code == 0, err
    assert out.startswith("added fab@1: attention seq+seq2, ") and " params, " in out and "sha256 " in out
    assert zoo_cli("compose", "seq+seq2", "--name", "st")[0] == 0
    for ref in ("fab", "st"):
        code, out, err = zoo_cli("show", ref)
        assert code == 0 and out.startswith(f"{ref}@1  ") and "members: seq@1, seq2@1" in out, err
        assert json.loads(zoo_cli("show", ref, "--json")[1])["kind"] == "composition"
    code, out, _ = zoo_cli("list", "--json")
    assert code == 0 and {e["name"]: e["kind"] for e in json.loads(out)} == {"seq": "adapter", "seq2": "adapter", "fab": "composition", "st": "composition"}
    code, out, _ = zoo_cli("list")
    assert code == 0 and "seq+seq2" in out
    code, out, _ = zoo_cli("verify", "fab", "--json")
    assert code == 0 and [r["path"] for r in json.loads(out)] == ["adapter_fusion_config.json", "model_adapter_fusion.safetensors"]
    assert zoo_cli("verify", "st")[1] == "0/0 files intact\n"
    assert zoo_cli("remove", "fab")[1] == "removed fab@1\n"


# ---- item 6: zoo list at 80 columns and in a pipe ------------------------------------------------------


def test_list_is_one_line_per_entry_in_a_pipe(zoo_cli):
    code, out, _ = zoo_cli("list", "--registry", REPO / "registry.json")  # stdout is not a terminal here
    lines = out.splitlines()
    names = [m.name for m in zoo.list_adapters(registry=REPO / "registry.json")]
    assert code == 0 and len(lines) == 1 + len(names) == 13
    assert lines[0].split() == ["name", "ver", "method", "shape", "base", "task", "params", "size"]
    for line, name in zip(lines[1:], names):
        assert line.split()[:2] == [name, "1"] and "sentence-transformers/all-MiniLM-L6-v2" in line


def test_list_fits_80_columns_on_a_terminal(monkeypatch):
    import contextlib
    import io
    import re

    from cli.main import main

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", "80")
    with contextlib.redirect_stdout(Terminal()) as out:
        main(["list", "--registry", str(REPO / "registry.json")])
    lines = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue()).splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line for line in lines if line.startswith("minilm-")]
    assert len(rows) == 12 and all(line.split()[1] == "1" and line.endswith("KB") for line in rows)  # whole: one line per row
    assert "minilm-sentiment-pfeiffer    1  bottleneck  pfeiffer ÷16" in lines[4]
    assert "not shown at this width: base, params" in lines[-1]


# ---- item 6: documented defaults work; options that do not apply are refused ---------------------------


def test_weighted_svd_defaults_to_the_members_largest_rank(llama, zoo_cli):
    base, a, b = llama  # ranks 4 (q_proj, v_proj) and 2 (q_proj, o_proj)
    zoo.add(a, name="a")
    zoo.add(b, name="b")
    code, out, err = zoo_cli("compose", "a+b", "--fusion", "weighted", "--name", "w")
    assert code == 0, err
    assert out.startswith("composed w@1 (weighted) from a+b")
    from safetensors.torch import load_file

    stored = load_file(zoo.api.adapter_folder(zoo.show("w")) / "adapter_model.safetensors")
    ranks = {k: v.shape[0] for k, v in stored.items() if k.endswith("lora_A.weight")}
    assert len(ranks) == 6 and all(r == (2 if "o_proj" in k else 4) for k, r in ranks.items())
    explicit = zoo.compose("a+b", fusion="weighted", method="svd", rank=4, name="w4")
    torch.testing.assert_close(zoo.load(base, adapters="w")(token_ids()).logits, zoo.load(base, adapters=explicit.name)(token_ids()).logits, atol=1e-5, rtol=0)
    code, _, err = zoo_cli("compose", "a+b", "--fusion", "weighted", "--rank", "0", "--name", "w0")
    assert code == 2 and err.startswith("error: --rank (rank=) must be positive, got 0")


@pytest.mark.parametrize("args, message", [
    (["--weights", "0.7,0.3"], "error: --weights (weights=) does not apply to --fusion stack — drop it, or use --fusion weighted"),
    (["--train", "data.jsonl"], "error: --train (train=) does not apply to --fusion stack — drop it, or use --fusion attention"),
    (["--fusion", "weighted", "--epochs", "3"], "error: --epochs (epochs=) does not apply to --fusion weighted — drop it, or use --fusion attention"),
    (["--fusion", "attention", "--rank", "4"], "error: --rank (rank=) does not apply to --fusion attention — drop it, or use --fusion weighted"),
])
def test_compose_refuses_options_that_do_not_apply(llama, zoo_cli, args, message):
    _, a, b = llama
    zoo.add(a, name="a")
    zoo.add(b, name="b")
    code, _, err = zoo_cli("compose", "a+b", "--name", "x", *args)
    assert code == 2 and err.startswith(message), err
    assert [m.name for m in zoo.list_adapters()] == ["a", "b"]


@pytest.mark.parametrize("args, message", [
    (["--adapters", "a", "--fusion", "stack"], "error: --fusion stack (fusion=) combines several adapters; got one adapter (a)"),
    (["--adapters", "a", "--fusion", "weighted"], "error: --fusion weighted (fusion=) combines several adapters; got one adapter (a)"),
    (["--adapters", "a+b", "--rank", "4"], "error: --rank (rank=) applies only to --fusion weighted"),
    (["--adapters", "a+b", "--method", "cat", "--fusion", "stack"], "error: --method (method=) applies only to --fusion weighted"),
    (["--adapters", "a+b", "--weights", "1,2"], "error: --weights (weights=) applies only to --fusion weighted"),
])
def test_run_refuses_options_that_do_not_apply(llama, zoo_cli, args, message):
    base, a, b = llama
    zoo.add(a, name="a")
    zoo.add(b, name="b")
    code, _, err = zoo_cli("run", base, "-p", "hi", *args)
    assert code == 2 and err.startswith(message), err


def test_merge_warns_when_the_adapter_names_another_base(llama, zoo_cli, tmp_path):
    base, a, _ = llama
    config = json.loads((a / "adapter_config.json").read_text())
    named = tmp_path / "named"
    named.mkdir()
    (named / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "meta-llama/Llama-3.2-1B"}))
    (named / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes())
    zoo.add(named, name="a")
    with pytest.warns(UserWarning) as caught:
        assert zoo_cli("merge", "a", "--base", base, "--out", tmp_path / "out")[0] == 0
    assert [str(w.message) for w in caught] == [f"a was trained on 'meta-llama/Llama-3.2-1B', and '{base}' does not look like it: merging anyway, check it is that model"]
    (tmp_path / "llama-3.2-1b").symlink_to(base)  # a folder that names it: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert zoo_cli("merge", "a", "--base", tmp_path / "llama-3.2-1b", "--out", tmp_path / "out2")[0] == 0


# ---- item 6: a new version from the CLI ----------------------------------------------------------------


def test_add_of_changed_files_makes_the_next_version(llama, zoo_cli, tmp_path):
    base, a, b = llama
    import shutil

    folder = tmp_path / "sql"
    shutil.copytree(a, folder)
    assert zoo_cli("add", folder, "--name", "sql")[1].startswith("added sql@1: lora r=4")
    assert zoo_cli("add", folder, "--name", "sql")[1] == "unchanged: sql@1 already holds these files (nothing was added)\n"
    make_peft_adapter(tiny_llama(), folder, seed=7, r=4, target_modules=["q_proj", "v_proj"])  # retrained
    code, out, err = zoo_cli("add", folder, "--name", "sql")
    assert code == 0 and out.startswith("added sql@2: lora r=4"), err
    assert [m.ref for m in zoo.list_adapters()] == ["sql@1", "sql@2"] and zoo.show("sql").version == 2
    assert zoo.show("sql@1").weights.sha256 != zoo.show("sql@2").weights.sha256
    retrained = tmp_path / "checkpoint-1000"  # saved elsewhere, added under the same name: its next version
    make_peft_adapter(tiny_llama(), retrained, seed=8, r=4, target_modules=["q_proj", "v_proj"])
    assert zoo_cli("add", retrained, "--name", "sql")[1].startswith("added sql@3: lora r=4")
    zoo.add(b, name="b")
    zoo.compose("sql+b", fusion="stack", name="both")
    code, _, err = zoo_cli("add", folder, "--name", "both")  # a composition's name: another kind of entry
    assert code == 2 and "already exists" in err


# ---- item 6: what transformers and bitsandbytes print, a base without a tokenizer ---------------------------


def test_run_on_a_base_without_tokenizer_files_is_one_line(zoo_cli, tmp_path):
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    code, out, err = zoo_cli("run", base, "-p", "hi")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err + out
    assert err.startswith(f"error: cannot load the tokenizer of base model '{base}': the folder has no tokenizer files — put them beside its config.json")


def test_load_report_is_one_line_on_what_matters(tmp_path):
    from tests.tiny import tiny_bert

    tiny_llama(causal=False).save_pretrained(tmp_path / "headless")
    adapter = make_peft_adapter(tiny_llama(), tmp_path / "causal", r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.warns(UserWarning) as caught:
        zoo.load(tmp_path / "headless", adapters=[str(adapter)])
    assert [str(w.message) for w in caught] == [
        f"LlamaForCausalLM: 1 weight not in the checkpoint, initialised at random (lm_head.weight) (transformers' load report of '{tmp_path / 'headless'}')"
    ]
    tiny_bert(num_labels=None).save_pretrained(tmp_path / "bert")  # the classifier comes with the adapter: nothing to say
    head = make_peft_adapter(tiny_bert(num_labels=5), tmp_path / "cls", r=2, target_modules=["query"], task_type="SEQ_CLS")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert type(zoo.load(tmp_path / "bert", adapters=[str(head)])).__name__ == "BertForSequenceClassification"


def test_bitsandbytes_hub_kernel_notice_is_not_shown(zoo_cli, caplog):
    import logging

    assert zoo_cli("--version")[1].startswith("zoo ")  # the CLI set up its output
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "untrusted")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # offline, the kernels package says it skipped the Hub's trust check
        logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'")
    assert caplog.records == []
    with warnings.catch_warnings(record=True) as caught:  # LLM.int8 at every layer of every forward
        warnings.warn("MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization")
    assert caught == []


# ---- item 6: --version, merged folders, the memory merge reports ----------------------------------------------


def test_version(zoo_cli):
    assert zoo_cli("--version") == (0, f"zoo {zoo.__version__}\n", "")


def test_merged_folder_follows_the_umask_and_memory_says_what_it_measures(llama, zoo_cli, tmp_path):
    base, a, _ = llama
    zoo.add(a, name="a")
    old = os.umask(0o022)
    try:
        code, out, err = zoo_cli("merge", "a", "--base", base, "--out", tmp_path / "merged")
    finally:
        os.umask(old)
    assert code == 0, err
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "merged").iterdir())
    assert "extra peak memory " in out and "× the largest shard)" in out and "peak memory of the process" not in out
    report = json.loads(zoo_cli("merge", "a", "--base", base, "--out", tmp_path / "again", "--json")[1])
    assert report["extra_peak_bytes"] == report["peak_rss_bytes"] - report["start_rss_bytes"] >= 0


# ---- item 6: the README's Python block runs as written ----------------------------------------------------


def test_readme_python_block_runs_as_written(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    base = tiny_llama()
    folder = tmp_path / "models" / "Llama-3.2-1B"
    base.save_pretrained(folder)
    tiny_tokenizer(folder)
    for seed, name in enumerate(["llama-sql", "a", "b", "sql", "poems", "chat"]):
        zoo.add(make_peft_adapter(base, tmp_path / "adapters" / name, seed=seed, r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"), name=name)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["select name from users", "good movie", "bad movie"] * 2))
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    assert {"ab-weighted", "ab"} <= {m.name for m in zoo.list_adapters()} and (tmp_path / "merged" / "config.json").is_file()


def test_inspect_of_a_stack_or_fusion_names_its_members(llama, zoo_cli):
    _, a, b = llama
    zoo.add(a, name="a")
    zoo.add(b, name="b")
    zoo.compose("a+b", fusion="stack", name="ab")
    code, out, err = zoo_cli("inspect", "ab")
    assert code == 2 and out == "" and "adapter_model.safetensors" not in err
    assert err == "error: ab@1 is a stack of 2 adapters (a@1, b@1), not one adapter — inspect a member, e.g. `zoo inspect a@1`; `zoo show ab@1` describes the composition\n"
