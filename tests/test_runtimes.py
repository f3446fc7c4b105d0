"""`zoo check` and `zoo export`: the rules of vLLM / llama.cpp / PEFT, and files those runtimes read.

GGUF files are read back independently with gguf's own `GGUFReader` and compared with the PEFT adapter's
tensors as llama.cpp's converter lays them out (names from the architecture, lora_a = A, lora_b = B with
Llama's q/k rows interleaved per RoPE head, written out here index by index). The PEFT export is loaded
by PEFT itself and compared with the original adapter's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import peft
import pytest
import torch
from tiny import make_peft_adapter, peft_model, tiny_gpt2, tiny_llama, token_ids

import zoo

pytestmark = pytest.mark.filterwarnings("ignore")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama (4 heads, 2 KV heads, head dim 8) saved with its config, and a PEFT LoRA on every projection."""
    folder = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    model.save_pretrained(folder / "base")
    adapter = make_peft_adapter(model, folder / "lora", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    return model, folder / "base", adapter


def peft_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k.removeprefix("base_model.model."): v for k, v in load_file(adapter / "adapter_model.safetensors").items()}


def rope_interleaved(B: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: in each head of d rows, row 2i+j is HF's row j·d/2 + i."""
    d = B.shape[0] // heads
    order = [h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in range(2)]
    return B[order]


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, str, list[int]]]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (gguf.quants.dequantize(t.data, t.tensor_type), t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}
    return fields, tensors


def test_gguf_export_has_the_converters_names_layout_values_and_metadata(llama, tmp_path, zoo_cli):
    model, base, adapter = llama
    zoo.add(adapter, name="lora")
    code, out, err = zoo_cli("export", "lora", "--to", "gguf", "--base", base, "--out", tmp_path / "lora.gguf")
    assert code == 0, err
    fields, tensors = read_gguf(tmp_path / "lora.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    expected = {f"blk.{i}.{GGUF_NAMES[t]}.weight.lora_{ab}" for i in range(2) for t in LLAMA_TARGETS for ab in "ab"}
    assert set(tensors) == expected
    state = peft_tensors(adapter)
    for i in range(2):
        for t in LLAMA_TARGETS:
            module = f"model.layers.{i}.{'self_attn' if t in GGUF_NAMES and t.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{t}"
            A, B = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
            B = rope_interleaved(B, 4) if t == "q_proj" else rope_interleaved(B, 2) if t == "k_proj" else B
            a, type_a, shape_a = tensors[f"blk.{i}.{GGUF_NAMES[t]}.weight.lora_a"]
            b, type_b, shape_b = tensors[f"blk.{i}.{GGUF_NAMES[t]}.weight.lora_b"]
            assert (type_a, type_b) == ("F32", "F32")
            assert shape_a == [A.shape[1], A.shape[0]] and shape_b == [B.shape[1], B.shape[0]]  # GGUF lists dims reversed
            assert np.array_equal(a, A.numpy()) and np.array_equal(b, B.numpy())
    assert not torch.equal(rope_interleaved(state["model.layers.0.self_attn.q_proj.lora_B.weight"], 4), state["model.layers.0.self_attn.q_proj.lora_B.weight"])


def test_exports_never_replace_a_path_and_take_the_umasks_mode(llama, tmp_path, zoo_cli):
    """--out that exists (file, FIFO, link) is refused, not replaced; files and folders get 0644 / 0755 under
    umask 022 (not mkstemp's 0600); options of the other format are refused."""
    import os
    import stat

    _, base, adapter = llama
    zoo.add(adapter, name="lora")
    (tmp_path / "kept.gguf").write_text("mine")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.gguf").symlink_to(tmp_path / "nowhere")
    for taken in ("kept.gguf", "fifo", "link.gguf"):
        code, _, err = zoo_cli("export", "lora", "--to", "gguf", "--base", base, "--out", tmp_path / taken)
        assert code == 2 and "already exists" in err and err.count("\n") == 1, err
    assert (tmp_path / "kept.gguf").read_text() == "mine" and (tmp_path / "link.gguf").is_symlink()
    old = os.umask(0o022)
    try:
        assert zoo_cli("export", "lora", "--to", "gguf", "--base", base, "--out", tmp_path / "new.gguf")[0] == 0
        assert zoo_cli("export", "lora", "--to", "peft", "--out", tmp_path / "peft")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.gguf").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "peft").stat().st_mode) == 0o755
    for option, value in (("--outtype", "f16"), ("--base", base)):
        code, _, err = zoo_cli("export", "lora", "--to", "peft", option, value, "--out", tmp_path / "other")
        assert code == 2 and f"{option} applies to --to gguf" in err and not (tmp_path / "other").exists()


def test_non_finite_or_f16_overflowing_adapters_are_refused_in_one_line(tmp_path, zoo_cli):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    for case, value in (("nan", float("nan")), ("huge", 1e6)):
        folder = make_peft_adapter(model, tmp_path / case, r=4, target_modules=["v_proj"])
        state = load_file(folder / "adapter_model.safetensors")
        key = next(k for k in state if k.endswith("lora_B.weight"))
        state[key][0, 0] = value
        save_file(state, folder / "adapter_model.safetensors")
    zoo.add(tmp_path / "huge", name="huge")  # `zoo add` refuses the NaN one: a folder is checked and exported as it is
    nan = str(tmp_path / "nan")
    for runtime in ("vllm", "llama.cpp"):
        assert {f.rule: f.status for f in zoo.check(nan, runtime=runtime, base=tmp_path / "base").findings}["finite"] == "refused"
    for args in (["--to", "gguf", "--base", tmp_path / "base", "--out", tmp_path / "n.gguf"], ["--to", "peft", "--out", tmp_path / "n"],
                 ["--to", "peft", "--rank", "2", "--out", tmp_path / "n"]):
        code, _, err = zoo_cli("export", nan, *args)
        assert code == 2 and "NaN" in err and err.count("\n") == 1, err
    code, _, err = zoo_cli("resize", nan, "--rank", "2", "--name", "r")
    assert code == 2 and "NaN" in err and err.count("\n") == 1, err
    code, _, err = zoo_cli("export", "huge", "--to", "gguf", "--base", tmp_path / "base", "--outtype", "f16", "--out", tmp_path / "h.gguf")
    assert code == 2 and "F16" in err and "--outtype f32" in err and err.count("\n") == 1 and not (tmp_path / "h.gguf").exists()
    assert zoo_cli("export", "huge", "--to", "gguf", "--base", tmp_path / "base", "--out", tmp_path / "h.gguf")[0] == 0


def test_gguf_q8_0_keeps_short_rows_in_f16_and_f16_rounds(llama, tmp_path):
    _, base, adapter = llama
    zoo.add(adapter, name="lora")
    zoo.export_gguf("lora", base=base, out=tmp_path / "q8.gguf", outtype="q8_0")
    _, tensors = read_gguf(tmp_path / "q8.gguf")
    A = peft_tensors(adapter)["model.layers.0.self_attn.v_proj.lora_A.weight"]
    a, kind, _ = tensors["blk.0.attn_v.weight.lora_a"]  # rows of 32 (hidden): quantized
    assert kind == "Q8_0" and np.abs(a - A.numpy()).max() < np.abs(A.numpy()).max() / 100
    assert tensors["blk.0.attn_v.weight.lora_b"][1] == "F16"  # rows of r = 4: gguf's q8_0 refuses them
    zoo.export_gguf("lora", base=base, out=tmp_path / "f16.gguf", outtype="f16")
    a16 = read_gguf(tmp_path / "f16.gguf")[1]["blk.0.attn_v.weight.lora_a"]
    assert a16[1] == "F16" and np.array_equal(a16[0], A.half().numpy())


def test_gguf_folds_rslora_scaling_the_converter_drops(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    adapter = make_peft_adapter(model, tmp_path / "rs", r=4, lora_alpha=8, use_rslora=True, target_modules=["v_proj"])
    zoo.add(adapter, name="rs")
    report = zoo.export_gguf("rs", base=tmp_path / "base", out=tmp_path / "rs.gguf")
    assert report.notes
    b = read_gguf(tmp_path / "rs.gguf")[1]["blk.1.attn_v.weight.lora_b"][0]
    B = peft_tensors(adapter)["model.layers.1.self_attn.v_proj.lora_B.weight"]
    # llama.cpp computes (alpha/r)·b·a; PEFT (alpha/√r)·B·A: b = B·√r
    torch.testing.assert_close(torch.from_numpy(b) * 8 / 4, B * 8 / 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_llama_cpp_refusals_are_one_line(tmp_path, zoo_cli, kwargs, message):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    adapter = make_peft_adapter(model, tmp_path / "a", r=4, target_modules=["q_proj"], **kwargs)
    zoo.add(adapter, name="a")
    code, _, err = zoo_cli("export", "a", "--to", "gguf", "--base", tmp_path / "base", "--out", tmp_path / "a.gguf")
    assert code == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "a.gguf").exists()
    code, out, _ = zoo_cli("check", "a", "--for", "llama.cpp", "--base", tmp_path / "base", "--json")
    assert code == 1 and not json.loads(out)["ready"]


def test_unmapped_architecture_and_other_methods_are_refused(tmp_path, zoo_cli):
    gpt2 = tiny_gpt2()
    gpt2.save_pretrained(tmp_path / "gpt2")
    zoo.add(make_peft_adapter(gpt2, tmp_path / "g", r=4, target_modules=["c_attn"]), name="g")
    code, _, err = zoo_cli("export", "g", "--to", "gguf", "--base", tmp_path / "gpt2", "--out", tmp_path / "g.gguf")
    assert code == 2 and "GPT2LMHeadModel" in err
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "llama")
    ia3 = peft.get_peft_model(llama, peft.IA3Config(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    zoo.add(tmp_path / "ia3", name="ia3")
    code, _, err = zoo_cli("export", "ia3", "--to", "peft", "--out", tmp_path / "out")
    assert code == 2 and "LoRA adapters only" in err


def test_vllm_check_rule_by_rule(tmp_path, zoo_cli):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    zoo.add(make_peft_adapter(model, tmp_path / "r24", r=24, target_modules=["q_proj", "v_proj"]), name="r24")
    code, out, _ = zoo_cli("check", "r24", "--for", "vllm", "--base", tmp_path / "base", "--json")
    report = json.loads(out)
    rank = next(f for f in report["findings"] if f["rule"] == "rank")
    assert code == 0 and report["ready"] and rank["status"] == "setting"
    assert "max_lora_rank ≥ 32" in rank["message"] and "zoo resize r24 --rank 16" in rank["fix"]

    zoo.add(make_peft_adapter(model, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True, modules_to_save=["lm_head"]), name="dora")
    code, out, _ = zoo_cli("check", "dora", "--for", "vllm", "--json")
    refused = {f["rule"] for f in json.loads(out)["findings"] if f["status"] == "refused"}
    assert code == 1 and refused == {"dora", "modules_to_save"}
    code, out, _ = zoo_cli("check", "dora", "--for", "vllm")
    assert code == 1 and "NOT ready for vllm" in out

    # targets: a base with one layer drops layer 1's modules; a GPT-2 has no q_proj at all
    small = tiny_llama()
    small.config.num_hidden_layers = 1
    small.config.save_pretrained(tmp_path / "one-layer")
    found = zoo.check("r24", runtime="vllm", base=tmp_path / "one-layer")
    assert not found.ready and any(f.status == "ignored" and "dropped" in f.message for f in found.findings)
    tiny_gpt2().config.save_pretrained(tmp_path / "gpt2")
    found = zoo.check("r24", runtime="vllm", base=tmp_path / "gpt2")
    assert any(f.status == "refused" and f.rule == "targets" for f in found.findings)


def test_peft_export_is_uniform_and_computes_the_same(tmp_path, zoo_cli):
    """rank_pattern + alpha_pattern + rsLoRA (which vLLM would ignore) → one rank, scaling folded in; PEFT logits equal."""
    model = tiny_llama()
    patterns = {"model.layers.0.self_attn.q_proj": 2}
    adapter = make_peft_adapter(model, tmp_path / "p", r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                                rank_pattern=patterns, alpha_pattern={"model.layers.1.self_attn.v_proj": 3.0})
    zoo.add(adapter, name="p")
    assert {f.rule: f.status for f in zoo.check("p", runtime="vllm").findings}["scaling"] == "export"
    code, out, err = zoo_cli("export", "p", "--to", "peft", "--out", tmp_path / "vllm")
    assert code == 0, err
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]
    assert not config.get("modules_to_save") and config["bias"] == "none"
    with torch.no_grad():
        ref = peft_model(model, adapter)(token_ids()).logits
        ours = peft_model(model, tmp_path / "vllm")(token_ids()).logits
        plain = model(token_ids()).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ref - plain).abs().max() > 1e-3
    code, _, err = zoo_cli("export", "p", "--to", "peft", "--out", tmp_path / "vllm")
    assert code == 2 and "not empty" in err
    code, _, err = zoo_cli("export", "--to", "peft", "--out", tmp_path / "x")
    assert code == 2 and "applies to exporting one adapter" in err


def test_peft_export_at_a_fixed_rank(tmp_path):
    model = tiny_llama()
    zoo.add(make_peft_adapter(model, tmp_path / "a", r=8, target_modules=["v_proj"]), name="a")
    report = zoo.export_peft("a", out=tmp_path / "r2", rank=2)
    assert report.rank == 2 and json.loads((tmp_path / "r2" / "adapter_config.json").read_text())["r"] == 2
    assert any("relative error" in n for n in report.notes)


def test_adalora_exports_as_the_lora_it_computes(tmp_path):
    """llama.cpp's delta from the file, (alpha / rank)·b·a, equals PEFT's merged AdaLoRA delta."""
    import copy

    from tiny import random_peft_adapter

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    config = peft.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=12, target_modules=["v_proj", "o_proj"], total_step=10)
    adapter = random_peft_adapter(base, tmp_path / "ada", config, seed=3, prune=True)
    zoo.add(adapter, name="ada")
    zoo.export_gguf("ada", base=tmp_path / "base", out=tmp_path / "ada.gguf")
    fields, tensors = read_gguf(tmp_path / "ada.gguf")
    merged = peft_model(base, adapter).merge_and_unload()
    for i in range(2):
        for module, gguf_name in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output")):
            a, b = (torch.from_numpy(tensors[f"blk.{i}.{gguf_name}.weight.lora_{x}"][0]) for x in "ab")
            llama_cpp = fields["adapter.lora.alpha"] / b.shape[1] * b @ a
            peft_delta = merged.get_submodule(f"model.layers.{i}.{module}").weight - copy.deepcopy(base).get_submodule(f"model.layers.{i}.{module}").weight
            torch.testing.assert_close(llama_cpp, peft_delta.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora_kwargs, rule, status", [
    ({"target_modules": ["embed_tokens", "q_proj"]}, "embeddings", "refused"),
    ({"target_modules": ["q_proj"], "init_lora_weights": "olora"}, "residual", "ignored"),
])
def test_embedding_and_residual_adapters_are_not_exported_silently(tmp_path, zoo_cli, lora_kwargs, rule, status):
    """LoRA on embeddings and OLoRA/PiSSA factors (trained on W − s·B₀·A₀) would be dropped or misread: named, refused."""
    from tiny import random_peft_adapter

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    adapter = random_peft_adapter(base, tmp_path / "a", peft.LoraConfig(r=4, lora_alpha=8, **lora_kwargs), seed=2)
    zoo.add(adapter, name="a")
    for runtime in ("vllm", "llama.cpp"):
        found = {f.rule: f.status for f in zoo.check("a", runtime=runtime, base=tmp_path / "base").findings}
        assert found[rule] == status
    code, _, err = zoo_cli("export", "a", "--to", "gguf", "--base", tmp_path / "base", "--out", tmp_path / "a.gguf")
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "a.gguf").exists()
    code, _, err = zoo_cli("export", "a", "--to", "peft", "--out", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists()
    code, _, err = zoo_cli("resize", "a", "--rank", "2", "--name", "r")
    assert code == 2 and "resize does not handle" in err
