"""Merges against PEFT and against the math written out.

Streaming (`compose.merge.checkpoint.merge_checkpoint`, through `zoo.merge.merge`): sharded tiny Llama /
GPT-2 checkpoints merged out of core must load with `from_pretrained` and give PEFT's
`merge_and_unload()` logits (fp32, 1e-5); quantized merges must be deq(Q(W)) + ΔW exactly, or load as
bitsandbytes models identical to the in-memory merge. In-memory (`LoraLayer.merge()` on bitsandbytes
layers): PEFT's probabilities within its own tolerances and PEFT's dequantized weights bit for bit.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import bitsandbytes.functional as bnbf
import peft
import pytest
import torch
from safetensors import safe_open
from tiny import keep_plain_layout, load_adapter, make_peft_adapter, pack_for_cpu, peft_model, round_absmax_to_bf16, tiny_gpt2, tiny_llama, token_ids
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from compose.errors import CompositionError
from compose.lora.layer import LoraLayer
from compose.lora.model import attach_lora
from compose.merge.checkpoint import LoraDelta, merge_checkpoint
from zoo.errors import ZooError
from zoo.merge import lora_deltas, merge

ATOL = 1e-5
PEFT_PROB_ATOL = {"nf4": 1e-2, "int8": 1e-3}  # PEFT's own tolerances for merged bnb models
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]

pytestmark = pytest.mark.filterwarnings("ignore")


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    return model(token_ids() if ids is None else ids).logits


def assert_same(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert (ref - base).abs().max() > 100 * ATOL, "the adapter does not change the output"


def sharded(model: torch.nn.Module, folder: Path) -> Path:
    """`model` saved in several small shards, with files a real base has beside its weights."""
    model.save_pretrained(folder, max_shard_size="40KB")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    torch.save({"stale": torch.zeros(1)}, folder / "pytorch_model.bin")  # weights in another format: must not be copied
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    return folder


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out.update((k, f.get_tensor(k)) for k in f.keys())
    return out


def bnb_config(quant: str) -> BitsAndBytesConfig:
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_compute_dtype=torch.float32)


def load(folder: Path, quant: str | None = None) -> torch.nn.Module:
    kwargs = {} if quant is None else dict(quantization_config=bnb_config(quant), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kwargs).eval()


def layer_weight(layer: torch.nn.Module) -> torch.Tensor:
    """deq(W) of a bitsandbytes Linear4bit / Linear8bitLt, (out, in)."""
    weight = layer.weight
    if type(layer).__name__ == "Linear4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    return bnbf.int8_vectorwise_dequant(weight.data, layer.state.SCB if weight.SCB is None else weight.SCB)  # a forward moves SCB to .state


def q_dq(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """deq(Q(W)) written out with bitsandbytes' functional API, as transformers quantizes at load time."""
    if quant == "int8":
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))
        return cb * scb.view(-1, 1) * 7.874015718698502e-3  # ·SCB/127, by the reciprocal as bitsandbytes does
    return bnbf.dequantize_4bit(*bnbf.quantize_4bit(weight, blocksize=64, quant_type=quant)).float()


def exact_deltas(config, state) -> dict[str, torch.Tensor]:
    """Checkpoint key → s·B·A (out, in), fp32, from the adapter state."""
    return {f"{m}.weight": sum(d.scaling * d.B @ d.A for d in ds) for m, ds in lora_deltas([(config, state)]).items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streaming_merge_matches_peft_and_keeps_the_layout(arch, tmp_path):
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    kwargs = dict(target_modules=LLAMA_TARGETS, r=4, lora_alpha=8) if arch == "llama" else dict(target_modules=GPT2_TARGETS, r=4, lora_alpha=8, fan_in_fan_out=True)
    adapter_dir = make_peft_adapter(base, tmp_path / "adapter", **kwargs)
    config, state = load_adapter(adapter_dir)
    if arch == "gpt2":  # the Conv1D layout comes from the model's structure, not the flag (c_proj is square)
        config = config.model_copy(update={"fan_in_fan_out": False})
    base_dir = sharded(base, tmp_path / "base")

    report = merge([(config, state)], base=base_dir, out=tmp_path / "out")

    ours, ref = logits(load(tmp_path / "out")), logits(peft_model(base, adapter_dir).merge_and_unload())
    assert_same(ours, ref, logits(base))
    unmerged = base.__class__(base.config).eval()
    unmerged.load_state_dict(base.state_dict())
    attach_lora(unmerged, "a", *load_adapter(adapter_dir))
    torch.testing.assert_close(ours, logits(unmerged), atol=ATOL, rtol=0)

    base_index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) >= 2 and out_index["weight_map"] == base_index["weight_map"]
    written = tensors(tmp_path / "out")
    assert out_index["metadata"]["total_size"] == sum(t.nbytes for t in written.values()) == report.bytes_written
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in base_dir.iterdir() if p.name != "pytorch_model.bin")
    with safe_open(tmp_path / "out" / sorted(set(out_index["weight_map"].values()))[0], framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert set(report.modules) == {k.removesuffix(".lora_A.weight") for k in state if k.endswith("lora_A.weight")}
    assert all(m.error.max_abs == 0 and m.adapters == 1 for m in report.modules.values())  # fp32: exact


def test_two_adapters_stack_like_peft(tmp_path):
    base = tiny_llama()
    dir_a = make_peft_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8)
    dir_b = make_peft_adapter(base, tmp_path / "b", seed=2, target_modules=["q_proj", "o_proj"], r=2, lora_alpha=4, use_rslora=True,
                              rank_pattern={"o_proj": 6})
    report = merge([load_adapter(dir_a), load_adapter(dir_b)], base=sharded(base, tmp_path / "base"), out=tmp_path / "out", progress=True)

    ref = peft_model(base, dir_a, name="a")
    ref.load_adapter(str(dir_b), adapter_name="b")
    ref.base_model.set_adapter(["a", "b"])
    assert_same(logits(load(tmp_path / "out")), logits(ref.merge_and_unload()), logits(base))
    assert report.modules["model.layers.0.self_attn.q_proj"].adapters == 2
    assert report.modules["model.layers.1.self_attn.o_proj"].adapters == 1


def test_bf16_output_is_the_exact_merge_rounded_once(tmp_path):
    base = tiny_llama()
    config, state = load_adapter(make_peft_adapter(base, tmp_path / "a", target_modules=LLAMA_TARGETS, r=4, lora_alpha=8))
    base_dir = sharded(base, tmp_path / "base")
    report = merge([(config, state)], base=base_dir, out=tmp_path / "out", dtype="bfloat16")

    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    before, after, deltas = tensors(base_dir), tensors(tmp_path / "out"), exact_deltas(config, state)
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    for key, t in after.items():
        exact = before[key] + deltas.get(key, 0)
        assert torch.equal(t, exact.to(torch.bfloat16)), key
    q = report.modules["model.layers.1.self_attn.q_proj"]
    exact = before[q.key] + deltas[q.key]
    diff = (after[q.key].float() - exact).abs()
    assert (q.error.max_abs, q.error.mean_abs) == pytest.approx((diff.max().item(), diff.mean().item()), rel=1e-6) and q.error.max_abs > 0
    assert load(tmp_path / "out").dtype == torch.bfloat16


def test_errors_leave_nothing_behind(tmp_path):
    base = tiny_llama()
    config, state = load_adapter(make_peft_adapter(base, tmp_path / "a", target_modules=["q_proj"], r=4, lora_alpha=8))
    base_dir = sharded(base, tmp_path / "base")
    deltas = lora_deltas([(config, state)])
    out = tmp_path / "out"

    missing = dict(deltas, **{"model.layers.0.self_attn.w_proj": deltas["model.layers.0.self_attn.q_proj"]})
    with pytest.raises(CompositionError, match=r"'model\.layers\.0\.self_attn\.w_proj'"):
        merge_checkpoint(base_dir, out, missing)
    wide = {"model.layers.0.self_attn.q_proj": [LoraDelta(torch.zeros(4, 64), torch.zeros(32, 4), 1.0)]}
    with pytest.raises(CompositionError, match=r"'model\.layers\.0\.self_attn\.q_proj': lora_A \(4, 64\) / lora_B \(32, 4\) give a \(32, 64\) delta but .* has shape \(32, 32\)"):
        merge_checkpoint(base_dir, out, wide)

    def fail_midway(name, done, total):
        if done == total // 2:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        merge_checkpoint(base_dir, out, deltas, on_tensor=fail_midway)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())

    with pytest.raises(ZooError, match="DoRA"):
        merge([(config.model_copy(update={"use_dora": True}), state)], base=base_dir, out=out)
    with pytest.raises(ZooError, match="lora_bias or modules_to_save"):
        merge([(config, dict(state, **{"lm_head.weight": torch.zeros(64, 32)}))], base=base_dir, out=out)
    with pytest.raises(ZooError, match="not a folder"):
        merge([(config, state)], base=tmp_path / "nowhere", out=out)
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CompositionError, match="not empty"):
        merge_checkpoint(base_dir, out, deltas)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    merge_checkpoint(base_dir, out, deltas)  # an empty folder is fine
    assert (out / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("arch, quant", [("llama", "nf4"), ("llama", "fp4"), ("gpt2", "int8")])
def test_dequantize_writes_the_exact_qlora_merge(arch, quant, tmp_path):
    base = tiny_llama(hidden=64) if arch == "llama" else tiny_gpt2()
    kwargs = dict(target_modules=LLAMA_TARGETS, r=4, lora_alpha=8) if arch == "llama" else dict(target_modules=GPT2_TARGETS, r=4, lora_alpha=8, fan_in_fan_out=True)
    config, state = load_adapter(make_peft_adapter(base, tmp_path / "a", **kwargs))
    base_dir = sharded(base, tmp_path / "base")
    report = merge([(config, state)], base=base_dir, out=tmp_path / "out", quantize=quant, dequantize=True)

    before, after, deltas = tensors(base_dir), tensors(tmp_path / "out"), exact_deltas(config, state)
    assert after.keys() == before.keys()
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    linears = {f"{n}.weight" for n, m in base.named_modules() if type(m).__name__ in ("Linear", "Conv1D")} - {"lm_head.weight"}
    for key, t in after.items():
        if key in linears:  # every Linear but the head was quantized; Conv1D stores (in, out), Q sees (out, in)
            conv1d = arch == "gpt2"
            expected = q_dq(before[key].T if conv1d else before[key], quant) + deltas.get(key, 0)
            assert torch.equal(t, expected.T if conv1d else expected), key
        else:
            assert torch.equal(t, before[key]), key
    assert all(m.error.max_abs == 0 for m in report.modules.values())
    # what users do by hand (PEFT #2105): dequantize the quantized base, then merge in full precision
    dequantized = load(base_dir, quant).dequantize(dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(dequantized, str(tmp_path / "a")).merge_and_unload()
    assert_same(logits(load(tmp_path / "out")), logits(ref), logits(load(base_dir, quant)))


@pytest.mark.parametrize("arch, quant", [("llama", "nf4"), ("gpt2", "int8")])
def test_requantized_checkpoint_loads_and_equals_in_memory_merge_and_peft(arch, quant, tmp_path):
    base = tiny_llama(hidden=64) if arch == "llama" else tiny_gpt2()  # 4-bit blocks are 64 values
    targets = dict(target_modules=LLAMA_TARGETS) if arch == "llama" else dict(target_modules=GPT2_TARGETS, fan_in_fan_out=True)
    adapter_dir = make_peft_adapter(base, tmp_path / "a", r=4, lora_alpha=8, **targets)
    config, state = load_adapter(adapter_dir)
    base_dir = sharded(base, tmp_path / "base")
    report = merge([(config, state)], base=base_dir, out=tmp_path / "out", quantize=quant)

    streamed = load(tmp_path / "out")  # quantization_config comes from the written config.json
    quantized = {n for n, m in streamed.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    assert quantized == {n for n, m in load(base_dir, quant).named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    assert len(quantized) >= 8 and type(streamed.lm_head).__name__ == "Linear"
    in_memory = load(base_dir, quant)
    attach_lora(in_memory, "a", config, state)
    errors = {n: m.merge() for n, m in in_memory.named_modules() if isinstance(m, LoraLayer)}
    ref = peft.PeftModel.from_pretrained(load(base_dir, quant), str(adapter_dir)).eval().merge_and_unload()

    streamed_modules, ref_modules = dict(streamed.named_modules()), dict(ref.named_modules())
    deltas, before = exact_deltas(config, state), tensors(base_dir)
    for path, layer in in_memory.named_modules():
        if isinstance(layer, LoraLayer):  # the same requantized weights, three ways
            ours = layer_weight(layer.base_layer)
            assert torch.equal(ours, layer_weight(streamed_modules[path])) and torch.equal(ours, layer_weight(ref_modules[path])), path
            stored, delta = before[f"{path}.weight"], deltas[f"{path}.weight"]
            exact = q_dq(stored.T if arch == "gpt2" else stored, quant) + delta  # (out, in); Conv1D stores (in, out)
            diff = (ours.float() - exact).abs()
            recomputed = (diff.max().item(), diff.mean().item())
            assert (report.modules[path].error.max_abs, report.modules[path].error.mean_abs) == pytest.approx(recomputed, rel=1e-6)
            assert (errors[path].max_abs, errors[path].mean_abs) == pytest.approx(recomputed, rel=1e-6) and recomputed[0] > 0
    out, base_out = logits(streamed), logits(load(base_dir, quant))
    torch.testing.assert_close(out, logits(in_memory), atol=ATOL, rtol=0)
    torch.testing.assert_close(out.softmax(-1), logits(ref).softmax(-1), atol=PEFT_PROB_ATOL[quant], rtol=0)
    assert (out - base_out).abs().max() > 100 * ATOL


def test_requantized_bf16_double_quant_equals_in_memory_merge(tmp_path):
    base = tiny_llama(hidden=64)
    config, state = load_adapter(make_peft_adapter(base, tmp_path / "a", target_modules=LLAMA_TARGETS, r=4, lora_alpha=8))
    base_dir = sharded(base, tmp_path / "base")
    merge([(config, state)], base=base_dir, out=tmp_path / "out", quantize="nf4", double_quant=True, dtype="bfloat16")

    streamed = load(tmp_path / "out")
    qlora = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    assert streamed.config.quantization_config.to_dict() == qlora.to_dict() and streamed.dtype == torch.bfloat16
    in_memory = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=qlora, dtype=torch.bfloat16, device_map="cpu").eval()
    attach_lora(in_memory, "a", config, state)
    streamed_modules = dict(streamed.named_modules())
    for path, layer in in_memory.named_modules():
        if isinstance(layer, LoraLayer):
            layer.merge()
            assert layer.base_layer.weight.quant_state.nested and layer_weight(layer.base_layer).dtype == torch.bfloat16
            assert torch.equal(layer_weight(layer.base_layer), layer_weight(streamed_modules[path])), path
    torch.testing.assert_close(logits(streamed), logits(in_memory), atol=ATOL, rtol=0)


@pytest.mark.parametrize("quant, layout", [("nf4", "plain"), ("nf4", "packed"), ("int8", "plain")])
def test_in_memory_bnb_merge_and_unmerge_like_peft(quant, layout, tmp_path):
    base = tiny_llama(hidden=64)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    # plain LoRA and DoRA (merged as W ← f·(W + s·B·A)) on disjoint modules
    dir_a = make_peft_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj", "gate_proj"], r=4, lora_alpha=8)
    dir_b = make_peft_adapter(base, tmp_path / "b", seed=2, target_modules=["k_proj", "o_proj", "down_proj"], r=4, lora_alpha=8, use_dora=True)
    ref = peft.PeftModel.from_pretrained(load(base_dir, quant), str(dir_a), adapter_name="a").eval()
    ref.load_adapter(str(dir_b), adapter_name="b")
    ref.base_model.set_adapter(["a", "b"])
    ours = load(base_dir, quant)
    attach_lora(ours, "a", *load_adapter(dir_a))
    attach_lora(ours, "b", *load_adapter(dir_b))
    keep_plain_layout(ours, ref)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    unmerged = logits(ours)

    def packed() -> None:
        """Before each merge/unmerge: our weights in bitsandbytes' CPU layout, PEFT's in the plain one with the
        same values (PEFT would read packed data as plain), so both must still agree bit for bit."""
        if layout == "packed":
            pack_for_cpu(ours)
            round_absmax_to_bf16(ref)

    original = {n: layer_weight(m.base_layer).clone() for n, m in layers.items()}
    packed()
    errors = {n: m.merge() for n, m in layers.items()}
    ref.merge_adapter()
    ref_layers = dict(ref.base_model.model.named_modules())
    for n, m in layers.items():
        assert torch.equal(layer_weight(m.base_layer), layer_weight(ref_layers[n].base_layer)), n
        moved = (layer_weight(m.base_layer).float() - original[n].float()).abs().max()
        assert 0 < errors[n].max_abs < moved, n
    merged, atol = logits(ours), PEFT_PROB_ATOL[quant]
    torch.testing.assert_close(merged.softmax(-1), logits(ref).softmax(-1), atol=atol, rtol=0)
    torch.testing.assert_close(merged.softmax(-1), unmerged.softmax(-1), atol=atol, rtol=0)
    assert (merged - logits(load(base_dir, quant))).abs().max() > 100 * ATOL

    # unmerge is a second round trip, as PEFT's: the weights do not come back, and drift further each cycle
    def drift() -> float:
        return sum((layer_weight(m.base_layer) - original[n]).abs().mean().item() for n, m in layers.items())

    packed()
    assert all(m.unmerge() is not None for m in layers.values())
    ref.unmerge_adapter()
    assert all(torch.equal(layer_weight(m.base_layer), layer_weight(ref_layers[n].base_layer)) for n, m in layers.items())
    torch.testing.assert_close(logits(ours).softmax(-1), unmerged.softmax(-1), atol=atol, rtol=0)
    first = drift()
    assert first > 0
    for _ in range(3):  # no forward in between: the layers' state must follow the new weights by itself
        packed()
        assert all(m.merge() is not None for m in layers.values())
        ref.merge_adapter()
        packed()
        assert all(m.unmerge() is not None for m in layers.values())
        ref.unmerge_adapter()
    assert all(torch.equal(layer_weight(m.base_layer), layer_weight(ref_layers[n].base_layer)) for n, m in layers.items())
    assert drift() > first if quant == "nf4" else drift() >= first  # int8 plateaus after a cycle or two


def test_load_merge_forward_unmerge_acts_on_the_packed_weights(tmp_path):
    """zoo.load(quantize='nf4', merge=True) → a forward (which packs 4-bit weights on AVX512-BF16 CPUs; forced
    here on every CPU) → zoo.unmerge: each weight is Q(deq(W_packed) − ΔW), and the model is the unmerged one
    up to that quantization round trip."""
    import zoo

    base = tiny_llama(hidden=64)
    base.save_pretrained(tmp_path / "base")
    adapter = make_peft_adapter(base, tmp_path / "a", r=8, lora_alpha=8, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")
    deltas = exact_deltas(*load_adapter(adapter))
    unmerged = logits(zoo.load(tmp_path / "base", [str(adapter)], quantize="nf4"))
    model = zoo.load(tmp_path / "base", [str(adapter)], quantize="nf4", merge=True)
    keep_plain_layout(model)  # the forward, then bitsandbytes' packing by hand: the same on every CPU
    merged = logits(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    twins = {}  # each merged weight as packing leaves it: same codes, absmax rounded to bf16, in the plain layout
    for n, m in layers.items():
        state = copy.copy(m.base_layer.weight.quant_state)
        state.absmax = state.absmax.to(torch.bfloat16).float()
        twins[n] = bnbf.dequantize_4bit(m.base_layer.weight.data, state)
    pack_for_cpu(model)

    zoo.unmerge(model)
    for n, m in layers.items():
        assert torch.equal(layer_weight(m.base_layer), q_dq(twins[n] - deltas[f"{n}.weight"], "nf4")), n
    after = logits(model)
    torch.testing.assert_close(after.softmax(-1), unmerged.softmax(-1), atol=PEFT_PROB_ATOL["nf4"], rtol=0)
    assert (after - unmerged).abs().max() < 2 * (merged - unmerged).abs().max()  # two round trips' rounding, not wrong weights


PEAK_CHILD = textwrap.dedent("""
    import json, re, sys
    import torch
    from compose.merge.checkpoint import LoraDelta, merge_checkpoint
    base, out = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    deltas = {f"model.layers.{i}.self_attn.{p}": [LoraDelta(torch.randn(8, 256, generator=g), torch.randn(256, 8, generator=g), 2.0)]
              for i in range(12) for p in ("q_proj", "o_proj")}
    status = lambda field: int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    # VmHWM, this process's own peak, reset to the current RSS here (ru_maxrss would include the parent's memory at fork)
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    report = merge_checkpoint(base, out, deltas)
    print(json.dumps({"growth": status("VmHWM") - before, "written": report.bytes_written}))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc to measure a peak")
def test_peak_memory_stays_far_below_the_model_size(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base", max_shard_size="4MB")
    (tmp_path / "base" / "config.json").unlink()  # weights only: the child need not import transformers (~200 MB, seconds)
    shards = list((tmp_path / "base").glob("*.safetensors"))
    model_bytes = sum(p.stat().st_size for p in shards)
    assert len(shards) >= 8 and model_bytes > 40e6

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(tmp_path / "base"), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["written"] > 0.99 * model_bytes - 1e5
    assert result["growth"] < 0.6 * model_bytes, f"peak memory grew by {result['growth'] / 1e6:.1f} MB for a {model_bytes / 1e6:.1f} MB model"
