"""(IA)³ in the engine vs PEFT's IA3: forward, stacking, merge, weighted sums, and what it refuses."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compose.errors import CompositionError
from compose.ia3.config import IA3Config, combine_ia3_configs
from compose.ia3.layer import IA3Layer, SavedCopy
from compose.ia3.model import (
    attach_ia3,
    attached_ia3,
    combine_ia3,
    detach_ia3,
    merge_ia3,
    unmerge_ia3,
)
from compose.lora.config import LoraConfig
from compose.lora.model import attach_lora
from compose.lora.state import new_lora_state
from tests.tiny import (
    peft_model,
    read_peft_adapter,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

pytestmark = pytest.mark.filterwarnings("ignore:Unmerge result can be inaccurate")

LLAMA = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}
GPT2 = {"target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"], "fan_in_fan_out": True}
# "output.dense" also ends "attention.output.dense": PEFT's feed-forward match has no '.' boundary
BERT = {"task_type": "SEQ_CLS", "target_modules": ["key", "value", "output.dense"], "feedforward_modules": ["output.dense"]}
CASES = {"llama": (tiny_llama, LLAMA), "gpt2": (tiny_gpt2, GPT2), "bert": (tiny_bert, BERT)}


def make_peft_ia3(base, out_dir, seed: int = 0, **kwargs) -> Path:
    """Save a PEFT IA3 adapter for `base` with vectors drawn from [0.5, 1.5) (PEFT starts them at 1) and
    perturbed `modules_to_save` copies (else they equal the original)."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(0.5 + torch.rand_like(p))
            elif "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return Path(out_dir)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def with_ia3(base, *adapters: tuple[str, Path]):
    model = copy.deepcopy(base)
    for name, adapter_dir in adapters:
        attach_ia3(model, name, *read_peft_adapter(adapter_dir, IA3Config))
    return model


def peft_with(base, *adapters: tuple[str, Path]):
    """PEFT with every adapter in `adapters` loaded and active together."""
    (first, first_dir), *rest = adapters
    model = peft_model(base, first_dir, name=first)
    for name, adapter_dir in rest:
        model.load_adapter(str(adapter_dir), adapter_name=name)
    model.base_model.set_adapter([name for name, _ in adapters])
    return model.eval()


def params(model) -> dict[str, torch.Tensor]:
    """The parameters the model runs with, by their names in the bare model (IA3 vectors left out; a
    `modules_to_save` module's are its trained copy's, as after PEFT's merge_and_unload)."""
    named = dict(model.named_parameters())
    running = {n.replace(".base_layer", ""): p for n, p in named.items() if "vectors" not in n and ".copy." not in n}
    return running | {n.replace(".copy", ""): p for n, p in named.items() if ".copy." in n}


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_peft(tmp_path, case):
    make_base, kwargs = CASES[case]
    base, ids = make_base(), token_ids()
    adapter = make_peft_ia3(base, tmp_path / "a", **kwargs)
    expected = logits(peft_model(base, adapter), ids)
    assert not torch.allclose(expected, logits(base, ids), atol=1e-3)  # the adapter matters
    model = with_ia3(base, ("a", adapter))
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)
    layers = {p: m for p, m in model.named_modules() if isinstance(m, IA3Layer)}
    feedforward = {p for p, m in layers.items() if m.feedforward}
    assert layers and feedforward and feedforward != layers.keys()  # both kinds are exercised
    if case == "bert":
        assert "bert.encoder.layer.0.attention.output.dense" in feedforward
        assert isinstance(model.classifier, SavedCopy)


def test_stacked_adapters_multiply_as_in_peft(tmp_path):
    base, ids = tiny_llama(), token_ids()
    a = make_peft_ia3(base, tmp_path / "a", seed=0, **LLAMA)
    b = make_peft_ia3(base, tmp_path / "b", seed=1, target_modules=["v_proj", "up_proj", "down_proj"], feedforward_modules=["up_proj", "down_proj"])
    model = with_ia3(base, ("a", a), ("b", b))
    torch.testing.assert_close(logits(model, ids), logits(peft_with(base, ("a", a), ("b", b)), ids), atol=1e-5, rtol=0)
    # written out: where both adapt a module, the vectors' product scales it
    v_proj = model.model.layers[0].self_attn.v_proj
    la, lb = (read_peft_adapter(d, IA3Config)[1]["model.layers.0.self_attn.v_proj.ia3_l"] for d in (a, b))
    torch.testing.assert_close(v_proj.scale(), (la * lb).flatten(), atol=0, rtol=0)
    x = torch.randn(3, 32)
    torch.testing.assert_close(v_proj(x), la.flatten() * lb.flatten() * v_proj.base_layer(x), atol=1e-6, rtol=0)

    detach_ia3(model, "a")
    assert attached_ia3(model) == ["b"]
    torch.testing.assert_close(logits(model, ids), logits(peft_model(base, b), ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_merge_matches_peft_merge_and_unload(tmp_path, case):
    make_base, kwargs = CASES[case]
    base, ids = make_base(), token_ids()
    adapter = make_peft_ia3(base, tmp_path / "a", **kwargs)
    merged_by_peft = peft_model(base, adapter).merge_and_unload()
    model = with_ia3(base, ("a", adapter))
    unmerged = logits(model, ids)

    merge_ia3(model)
    torch.testing.assert_close(logits(model, ids), logits(merged_by_peft, ids), atol=1e-5, rtol=0)
    ours = params(model)
    for name, p in merged_by_peft.named_parameters():  # weights and biases, scaled as PEFT scales them
        torch.testing.assert_close(ours[name], p, atol=1e-6, rtol=0, msg=name)

    unmerge_ia3(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    for path, m in model.named_modules():
        if isinstance(m, IA3Layer):
            original = base.get_submodule(path)
            torch.testing.assert_close(m.base_layer.weight, original.weight, atol=1e-6, rtol=0, msg=path)
            torch.testing.assert_close(m.base_layer.bias, original.bias, atol=1e-6, rtol=0, msg=path)


def test_merge_of_stacked_adapters_matches_peft(tmp_path):
    base, ids = tiny_gpt2(), token_ids()
    a = make_peft_ia3(base, tmp_path / "a", seed=0, **GPT2)
    b = make_peft_ia3(base, tmp_path / "b", seed=1, target_modules=["c_attn"], feedforward_modules=[], fan_in_fan_out=True)
    merged_by_peft = peft_with(base, ("a", a), ("b", b)).merge_and_unload()
    model = with_ia3(base, ("a", a), ("b", b))
    merge_ia3(model)
    ours = params(model)
    for name, p in merged_by_peft.named_parameters():
        torch.testing.assert_close(ours[name], p, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(logits(model, ids), logits(merged_by_peft, ids), atol=1e-5, rtol=0)


def test_detach_restores_the_model(tmp_path):
    base, ids = tiny_bert(), token_ids()
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    attach_ia3(model, "a", *read_peft_adapter(make_peft_ia3(base, tmp_path / "a", **BERT), IA3Config))
    merge_ia3(model)  # detach unmerges first
    assert detach_ia3(model) is model and attached_ia3(model) == []
    assert all(modules[p] is m for p, m in model.named_modules())  # the original objects, back in place
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-5, rtol=0)


def test_weighted_sum_matches_peft_add_weighted_adapter(tmp_path):
    base, ids = tiny_llama(), token_ids()
    a = make_peft_ia3(base, tmp_path / "a", seed=0, **LLAMA)
    b = make_peft_ia3(base, tmp_path / "b", seed=1, target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"])
    weights = [0.7, -0.4]
    reference = peft_with(base, ("a", a), ("b", b))
    reference.base_model.add_weighted_adapter(["a", "b"], weights, "ab")
    reference.set_adapter("ab")

    (config_a, state_a), (config_b, state_b) = read_peft_adapter(a, IA3Config), read_peft_adapter(b, IA3Config)
    state = combine_ia3([state_a, state_b], weights)
    assert state.keys() == state_a.keys() | state_b.keys()
    v, k = "model.layers.0.self_attn.v_proj.ia3_l", "model.layers.0.self_attn.k_proj.ia3_l"
    torch.testing.assert_close(state[v], 0.7 * state_a[v] - 0.4 * state_b[v], atol=0, rtol=0)
    torch.testing.assert_close(state[k], 0.7 * state_a[k], atol=0, rtol=0)  # b has none here: it adds nothing
    for path, m in reference.base_model.model.named_modules():
        if hasattr(m, "ia3_l") and "ab" in m.ia3_l:
            torch.testing.assert_close(state[f"{path}.ia3_l"], m.ia3_l["ab"].detach(), atol=1e-7, rtol=0)

    config = combine_ia3_configs([config_a, config_b])
    assert config.feedforward_modules == ["down_proj", "up_proj"]
    model = copy.deepcopy(base)
    attach_ia3(model, "ab", config, state)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)


def test_weighted_sum_refusals(tmp_path):
    base = tiny_bert()
    _, state = read_peft_adapter(make_peft_ia3(base, tmp_path / "a", **BERT), IA3Config)
    vectors = {k: v for k, v in state.items() if k.endswith(".ia3_l")}
    with pytest.raises(CompositionError, match="tensor 'classifier.(weight|bias)' is not an IA3 vector"):
        combine_ia3([state, vectors], [0.5, 0.5])
    key = "bert.encoder.layer.0.attention.self.key.ia3_l"
    with pytest.raises(CompositionError, match=rf"'{key}': shapes \(32, 1\) and \(1, 32\) differ"):
        combine_ia3([vectors, {key: vectors[key].T}], [0.5, 0.5])
    with pytest.raises(CompositionError, match="got 1 IA3 adapters and 2 weights"):
        combine_ia3([vectors], [0.5, 0.5])
    with pytest.raises(CompositionError, match="mix regexes and lists"):
        combine_ia3_configs([IA3Config(target_modules="k_proj"), IA3Config(target_modules=["k_proj"])])


def _llama_adapter(tmp_path) -> tuple[IA3Config, dict[str, torch.Tensor]]:
    return read_peft_adapter(make_peft_ia3(tiny_llama(), tmp_path / "a", **LLAMA), IA3Config)


def _refused(model, name, config, state, match: str) -> None:
    """Attaching fails with `match` and leaves the model as it was."""
    before = dict(model.named_modules())
    registry = attached_ia3(model)
    with pytest.raises(CompositionError, match=match):
        attach_ia3(model, name, config, state)
    assert dict(model.named_modules()) == before and attached_ia3(model) == registry


def test_wrong_shapes_are_refused(tmp_path):
    config, state = _llama_adapter(tmp_path)
    model = tiny_llama()
    key = "model.layers.1.mlp.down_proj.ia3_l"
    _refused(model, "a", config, {**state, key: state[key].T},
             r"module 'model.layers.1.mlp.down_proj': ia3_l has shape \(64, 1\), expected \(1, 64\) to scale the input")
    not_ff = config.model_copy(update={"feedforward_modules": []})
    _refused(model, "a", not_ff, state, r"expected \(32, 1\) to scale the output .it is not in feedforward_modules")
    _refused(tiny_llama(hidden=64), "a", config, state, r"ia3_l has shape \(1, 64\), expected \(1, 128\)")


def test_missing_and_unsupported_modules_are_refused(tmp_path):
    config, state = _llama_adapter(tmp_path)
    model = tiny_llama()
    _refused(model, "a", config, {**state, "model.layers.7.self_attn.k_proj.ia3_l": torch.ones(16, 1)},
             "module 'model.layers.7.self_attn.k_proj' not found in LlamaForCausalLM")
    _refused(model, "a", config, {**state, "model.embed_tokens.ia3_l": torch.ones(32, 1)},
             "module 'model.embed_tokens' is a Embedding; IA3 supports Linear and GPT-2 Conv1D")
    _refused(model, "a", config, {}, "has no tensors")


def test_module_with_lora_is_refused(tmp_path):
    config, state = _llama_adapter(tmp_path)
    model = tiny_llama()
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj"])
    attach_lora(model, "lora", lora, new_lora_state(model, lora))
    _refused(model, "a", config, state, "module 'model.layers.0.self_attn.k_proj' already has a LoRA layer")


def test_conflicts_between_ia3_adapters_are_refused(tmp_path):
    config, state = _llama_adapter(tmp_path)
    model = tiny_llama()
    attach_ia3(model, "a", config, state)
    _refused(model, "a", config, state, "IA3 adapter 'a' is already attached")
    key = "model.layers.0.mlp.down_proj.ia3_l"  # 'b' scales down_proj's output where 'a' scales its input
    _refused(model, "b", IA3Config(target_modules=["down_proj"]), {key: torch.ones(32, 1)},
             "IA3 adapters \\['a'\\] scale its input but this one its output")
    merge_ia3(model)
    _refused(model, "b", config, state, "while IA3 layers are merged")
    unmerge_ia3(model)

    bert = tiny_bert()
    bert_config, bert_state = read_peft_adapter(make_peft_ia3(bert, tmp_path / "bert", **BERT), IA3Config)
    attach_ia3(bert, "a", bert_config, bert_state)
    _refused(bert, "b", bert_config, bert_state, r"module 'classifier' \(modules_to_save\) is already replaced by IA3 adapter 'a'")
    with pytest.raises(CompositionError, match="'c' is not attached"):
        detach_ia3(bert, "c")


def test_merge_refuses_zero_entries(tmp_path):
    config, state = _llama_adapter(tmp_path)
    key = "model.layers.0.self_attn.k_proj.ia3_l"
    zeroed = state[key].clone()
    zeroed[3] = 0
    model = tiny_llama()
    attach_ia3(model, "a", config, {**state, key: zeroed})
    with pytest.raises(CompositionError, match="zero entries here, so merging could not be undone"):
        merge_ia3(model)
