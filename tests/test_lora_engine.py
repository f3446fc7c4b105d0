"""The LoRA engine against PEFT: same saved adapter, same base, outputs within 1e-5 (fp32 logits).

Every comparison also checks that the adapter moves the output well beyond the tolerance, so a
no-op engine cannot pass.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from tiny import keep_plain_layout, load_adapter, make_peft_adapter, peft_model, tiny_bert, tiny_gpt2, tiny_llama, token_ids

from compose.errors import CompositionError
from compose.lora.layer import LoraLayer, SavedModule
from compose.lora.model import attach_lora, attached_adapters, detach_lora, set_active_adapters

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore")


def assert_same(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None = None) -> None:
    """ours == ref within ATOL; and, given the base output, the adapter really changed it."""
    torch.testing.assert_close(ours.float(), ref.float(), atol=ATOL, rtol=0)
    if base is not None:
        assert (ref.float() - base.float()).abs().max() > 100 * ATOL, "the adapter does not change the output"


def with_adapters(base: torch.nn.Module, **adapter_dirs) -> torch.nn.Module:
    """A copy of `base` with our engine's adapters attached, in the given order."""
    model = copy.deepcopy(base)
    for name, adapter_dir in adapter_dirs.items():
        attach_lora(model, name, *load_adapter(adapter_dir))
    return model


@torch.no_grad()
def run(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


CASES = {
    "llama": (tiny_llama, dict(target_modules=LLAMA_ALL, r=4, lora_alpha=8)),
    "llama-patterns": (tiny_llama, dict(
        target_modules=LLAMA_ALL, r=4, lora_alpha=8,
        rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 3, "layers.0.self_attn.o_proj": 5},
    )),
    "llama-rslora": (tiny_llama, dict(target_modules=LLAMA_ALL, r=4, lora_alpha=8, use_rslora=True, rank_pattern={"k_proj": 8})),
    "llama-dora": (tiny_llama, dict(target_modules=LLAMA_ALL, r=4, lora_alpha=8, use_dora=True)),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8, fan_in_fan_out=True)),
    "gpt2-dora": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True)),
    "bert-seqcls-lora_bias": (tiny_bert, dict(task_type="SEQ_CLS", target_modules=["query", "value", "dense"], r=4, lora_alpha=8, lora_bias=True)),
    "bert-seqcls-dora": (tiny_bert, dict(task_type="SEQ_CLS", target_modules=["query", "key", "dense"], r=4, lora_alpha=8, use_dora=True)),
    "bertmodel": (lambda: tiny_bert(num_labels=None), dict(target_modules=["query", "value", "dense"], r=4, lora_alpha=16)),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_peft(case, tmp_path):
    build, lora_kwargs = CASES[case]
    base = build()
    adapter_dir = make_peft_adapter(base, tmp_path, **lora_kwargs)
    ids = token_ids()
    ours = with_adapters(base, a=adapter_dir)
    assert_same(run(ours, ids), run(peft_model(base, adapter_dir), ids), run(base, ids))
    if lora_kwargs.get("task_type") == "SEQ_CLS":
        assert isinstance(ours.classifier, SavedModule) and ours.classifier.active == "a"


def test_two_adapters_add_and_switch_like_peft(tmp_path):
    base = tiny_llama()
    dir_a = make_peft_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8)
    # DoRA rescales the running output, adapters before it included, so the order matters where they overlap (q_proj)
    dir_b = make_peft_adapter(base, tmp_path / "b", seed=2, target_modules=["q_proj", "o_proj", "down_proj"], r=2, lora_alpha=4, use_dora=True)
    ref = peft_model(base, dir_a, name="a")
    ref.load_adapter(str(dir_b), adapter_name="b")
    ours = with_adapters(base, a=dir_a, b=dir_b)
    ids = token_ids()
    assert attached_adapters(ours) == ["a", "b"]

    ref.base_model.set_adapter(["a", "b"])
    both = run(ours, ids)
    assert_same(both, run(ref, ids), run(base, ids))
    for names in (["b", "a"], ["b"], ["a"]):
        set_active_adapters(ours, names)
        ref.base_model.set_adapter(names)
        assert_same(run(ours, ids), run(ref, ids), both)
    set_active_adapters(ours, [])
    assert torch.equal(run(ours, ids), run(base, ids))
    with pytest.raises(CompositionError, match="'c'"):
        set_active_adapters(ours, ["a", "c"])


def test_prefix_resolution_between_head_and_bare_model(tmp_path):
    causal = tiny_llama()
    bare = copy.deepcopy(causal.model)
    ids = token_ids()
    # the full-path pattern only matches the name the adapter was trained with ("model.layers...")
    on_causal = make_peft_adapter(causal, tmp_path / "causal", target_modules=LLAMA_ALL, r=4, lora_alpha=8,
                                  alpha_pattern={"model.layers.0.self_attn.q_proj": 32})
    ref = peft_model(causal, on_causal).base_model.model.model
    assert_same(run(with_adapters(bare, a=on_causal), ids), run(ref, ids), run(bare, ids))

    on_bare = make_peft_adapter(bare, tmp_path / "bare", target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8)
    ours = with_adapters(causal, a=on_bare)
    assert isinstance(ours.model.layers[1].mlp.down_proj, LoraLayer)
    assert_same(run(ours.model, ids), run(peft_model(bare, on_bare), ids), run(bare, ids))


def test_detach_restores_original_modules_and_outputs(tmp_path):
    base = tiny_bert()
    dir_a = make_peft_adapter(base, tmp_path / "a", seed=1, task_type="SEQ_CLS", target_modules=["query", "dense"], r=4, lora_alpha=8, lora_bias=True)
    dir_b = make_peft_adapter(base, tmp_path / "b", seed=2, target_modules=["query", "value"], r=2, lora_alpha=8, use_dora=True)
    model = copy.deepcopy(base)
    modules, ids = dict(model.named_modules()), token_ids()
    before = run(model, ids)
    attach_lora(model, "a", *load_adapter(dir_a))
    attach_lora(model, "b", *load_adapter(dir_b))
    q = model.bert.encoder.layer[0].attention.self.query
    assert q.weight is q.base_layer.weight  # wrappers answer attribute look-ups from the wrapped module

    detach_lora(model, "a")
    assert attached_adapters(model) == ["b"]
    assert model.classifier is modules["classifier"]
    assert_same(run(model, ids), run(with_adapters(base, b=dir_b), ids), before)

    assert detach_lora(model) is model
    assert attached_adapters(model) == []
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert torch.equal(run(model, ids), before)
    with pytest.raises(CompositionError, match="'a' is not attached"):
        detach_lora(model, "a")


def test_modules_to_save_of_two_adapters_do_not_stack(tmp_path):
    base = tiny_bert()
    dirs = [make_peft_adapter(base, tmp_path / n, seed=s, task_type="SEQ_CLS", target_modules=["query"], r=2, lora_alpha=4)
            for n, s in (("a", 1), ("b", 2))]
    ours = with_adapters(base, a=dirs[0])
    with pytest.raises(CompositionError, match="'classifier'.*'a'"):
        attach_lora(ours, "b", *load_adapter(dirs[1]))
    assert attached_adapters(ours) == ["a"] and isinstance(ours.bert.encoder.layer[0].attention.self.query.base_layer, torch.nn.Linear)
    set_active_adapters(ours, [])
    attach_lora(ours, "b", *load_adapter(dirs[1]))
    ids = token_ids()
    assert_same(run(ours, ids), run(peft_model(base, dirs[1]), ids), run(base, ids))
    with pytest.raises(CompositionError, match="classifier"):
        set_active_adapters(ours, ["a", "b"])


def _error_case(kind: str, tmp_path):
    """(model, config, state, module name the message must contain) for one broken attach."""
    base = tiny_llama()
    config, state = load_adapter(make_peft_adapter(base, tmp_path, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    key = "model.layers.0.self_attn.v_proj"
    if kind == "missing module":
        state = {k.replace("layers.0.self_attn.v_proj", "layers.0.self_attn.w_proj"): v for k, v in state.items()}
        return base, config, state, "model.layers.0.self_attn.w_proj"
    if kind == "wrong shape":  # a hidden-64 model is not the hidden-32 one the adapter was made for
        return tiny_llama(hidden=64), config, state, "self_attn."
    if kind == "rank mismatch":
        return base, config.model_copy(update={"rank_pattern": {"v_proj": 8}}), state, key
    if kind == "unsupported module":
        state = dict(state, **{"model.embed_tokens.lora_A.weight": torch.zeros(4, 64), "model.embed_tokens.lora_B.weight": torch.zeros(32, 4)})
        return base, config, state, "model.embed_tokens"
    if kind == "dora tensors missing":
        return base, config.model_copy(update={"use_dora": True}), state, "self_attn."
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing module", "wrong shape", "rank mismatch", "unsupported module", "dora tensors missing"])
def test_errors_name_the_module_and_leave_the_model_alone(kind, tmp_path):
    model, config, state, module = _error_case(kind, tmp_path)
    with pytest.raises(CompositionError) as err:
        attach_lora(model, "a", config, state)
    message = str(err.value)
    assert module in message and "\n" not in message, message
    assert not any(isinstance(m, LoraLayer) for m in model.modules()) and attached_adapters(model) == []


def test_shape_error_gives_expected_and_found_shapes(tmp_path):
    config, state = load_adapter(make_peft_adapter(tiny_llama(), tmp_path, target_modules=["q_proj"], r=4, lora_alpha=8))
    with pytest.raises(CompositionError, match=r"'model.layers.0.self_attn.q_proj': lora_A \(4, 32\) / lora_B \(32, 4\) .*\(in 64, out 64\); expected lora_A \(r, 64\)"):
        attach_lora(tiny_llama(hidden=64), "a", config, state)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_merge_equals_unmerged_and_unmerge_restores(case, tmp_path):
    if case == "llama":
        base, targets_a, targets_b = tiny_llama(), ["q_proj", "v_proj", "down_proj"], ["q_proj", "o_proj", "down_proj"]
        extra_a = {}
    else:  # Conv1D (weights stored (in, out)); lora_bias on a base with biases
        base, targets_a, targets_b = tiny_gpt2(), ["c_attn", "c_fc"], ["c_attn", "c_proj"]
        extra_a = {"fan_in_fan_out": True, "lora_bias": True}
    dir_a = make_peft_adapter(base, tmp_path / "a", seed=1, target_modules=targets_a, r=4, lora_alpha=8, **extra_a)
    dir_b = make_peft_adapter(base, tmp_path / "b", seed=2, target_modules=targets_b, r=2, lora_alpha=4, use_dora=True,
                              fan_in_fan_out=case == "gpt2")
    model = with_adapters(base, a=dir_a, b=dir_b)
    ids = token_ids()
    unmerged = run(model, ids)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    originals = [(m.base_layer.weight.clone(), m.base_layer.bias) for m in layers]
    originals = [(w, None if b is None else b.clone()) for w, b in originals]
    for layer in layers:
        layer.merge()
    assert_same(run(model, ids), unmerged, run(base, ids))
    assert not torch.equal(layers[0].base_layer.weight, originals[0][0])
    with pytest.raises(CompositionError, match="merged"):
        set_active_adapters(model, ["a"])
    for layer, (weight, bias) in zip(layers, originals):
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=0)
        if bias is not None:
            torch.testing.assert_close(layer.base_layer.bias, bias, atol=1e-6, rtol=0)
    assert_same(run(model, ids), unmerged)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_bitsandbytes_bases_match_peft(quant, tmp_path):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    base = tiny_llama(hidden=64)  # 4-bit blocks are 64 values
    base.save_pretrained(tmp_path / "base")
    bnb = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
           if quant == "nf4" else BitsAndBytesConfig(load_in_8bit=True))

    def quantized():  # loaded afresh: 8-bit layers do not survive deepcopy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb, device_map="cpu", dtype=torch.float32).eval()

    # plain LoRA and DoRA (whose weight norm needs the dequantized base) on disjoint modules, both active
    dir_a = make_peft_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj", "gate_proj"], r=4, lora_alpha=8)
    dir_b = make_peft_adapter(base, tmp_path / "b", seed=2, target_modules=["k_proj", "o_proj", "up_proj", "down_proj"], r=4, lora_alpha=8, use_dora=True)
    ref = peft.PeftModel.from_pretrained(quantized(), str(dir_a), adapter_name="a").eval()
    ref.load_adapter(str(dir_b), adapter_name="b")
    ref.base_model.set_adapter(["a", "b"])
    ours = quantized()
    attach_lora(ours, "a", *load_adapter(dir_a))
    attach_lora(ours, "b", *load_adapter(dir_b))
    # PEFT's DoRA reads a 4-bit weight as if bitsandbytes had not packed it for its AVX512-BF16 kernel (the
    # packed path is tested in test_merge, through our merges): compare both in the plain layout
    keep_plain_layout(ours, ref)
    q_proj = ours.model.layers[0].self_attn.q_proj
    assert q_proj.kind == ("bnb4" if quant == "nf4" else "bnb8")
    ids = token_ids()
    assert_same(run(ours, ids), run(ref, ids), run(quantized(), ids))


def test_generate_with_bf16_device_map_matches_peft(tmp_path):
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")

    def loaded():
        return LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16, device_map="cpu").eval()

    base = loaded()
    adapter_dir = make_peft_adapter(base, tmp_path / "a", target_modules=LLAMA_ALL, r=4, lora_alpha=8, use_dora=True)
    ref = peft.PeftModel.from_pretrained(loaded(), str(adapter_dir)).eval()
    ours = loaded()
    attach_lora(ours, "a", *load_adapter(adapter_dir))
    ids = token_ids()
    # the adapter runs in fp32 over the bf16 base, as PEFT upcasts it; the sums are cast back to bf16
    assert run(ours, ids).dtype == torch.bfloat16
    assert_same(run(ours, ids), run(ref, ids), run(base, ids))
    kwargs = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    generated = ours.generate(ids, **kwargs)
    assert torch.equal(generated, ref.generate(input_ids=ids, **kwargs))
    assert not torch.equal(generated, base.generate(ids, **kwargs))
