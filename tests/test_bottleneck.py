"""The bottleneck engine on its own: placement, stacking, detach, drop, fusion, MAM, and its errors.

Fidelity to AdapterHub is tests/test_adapterhub.py's job; here each check is against the engine itself
or an independent construction (an adapter left out of a layer, two adapters concatenated into one).
"""

from __future__ import annotations

import copy

import pytest
import torch

from compose.bottleneck.config import BottleneckConfig
from compose.bottleneck.fusion import attach_bottleneck_fusion
from compose.bottleneck.layer import BottleneckSite, expected_shapes
from compose.bottleneck.model import (
    attach_bottleneck,
    attached_bottlenecks,
    bottleneck_state,
    detach_bottleneck,
    set_active_bottlenecks,
    sites,
)
from compose.errors import CompositionError
from compose.families import detect_family
from compose.fusion.config import FusionConfig
from compose.fusion.model import attached_fusion, detach_fusion, fusion_state
from tests.tiny import VOCAB, tiny_bert, tiny_gpt2, tiny_llama, token_ids

PFEIFFER = BottleneckConfig.preset("seq_bn", reduction_factor=4)
HOULSBY = BottleneckConfig.preset("double_seq_bn", reduction_factor=4)
PARALLEL = BottleneckConfig.preset("par_bn")
MODELS = {"bert": lambda: tiny_bert(num_labels=None), "gpt2": tiny_gpt2, "llama": tiny_llama}


def random_state(model, config: BottleneckConfig, seed: int = 0, skip_layers: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """Random tensors for every site `config` adapts (up-projections non-zero, norms near 1)."""
    generator = torch.Generator().manual_seed(seed)
    _, layers = detect_family(model)
    hidden = model.config.get_text_config().hidden_size
    state = {}
    for index, path in enumerate(layers):
        if index in config.leave_out or index in skip_layers:
            continue
        for location in config.locations:
            for name, shape in expected_shapes(config, index, hidden).items():
                base = 1.0 if name.endswith(("norm_before.weight", "norm_after.weight")) or name == "scaling" else 0.0
                state[f"{path}.{location}.{name}"] = base + 0.3 * torch.randn(shape, generator=generator)
    return state


def run(model, ids=None):
    with torch.no_grad():
        out = model(input_ids=token_ids() if ids is None else ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("config", [PFEIFFER, HOULSBY, PARALLEL], ids=["seq_bn", "double_seq_bn", "par_bn"])
def test_attach_changes_the_output_and_detach_restores_the_base_exactly(family, config):
    model = MODELS[family]()
    base, keys, hooks0 = run(model), list(model.state_dict()), hooks(model)
    attach_bottleneck(model, "a", config, random_state(model, config))
    assert (run(model) - base).abs().max() > 1e-3
    assert hooks(model) > hooks0
    detach_bottleneck(model)
    assert torch.equal(run(model), base)
    assert list(model.state_dict()) == keys and hooks(model) == hooks0
    assert not hasattr(model, "_compose_bottleneck") and not sites(model)


def test_family_detection_by_module_names():
    from transformers import Qwen2Config, Qwen2Model, RobertaConfig, RobertaModel

    roberta = RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    qwen = Qwen2Model(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    assert detect_family(roberta)[0].name == "bert"
    assert detect_family(qwen) == (detect_family(tiny_llama())[0], ["layers.0", "layers.1"])
    assert detect_family(tiny_gpt2())[1] == ["transformer.h.0", "transformer.h.1"]
    with pytest.raises(CompositionError, match="Linear has no layers built like a known family"):
        detect_family(torch.nn.Linear(2, 2))


def test_a_family_with_extra_norms_is_refused():
    from transformers import Gemma2Config, Gemma2Model

    gemma2 = Gemma2Model(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(CompositionError, match="Gemma2Model has no layers built like a known family"):
        attach_bottleneck(gemma2, "a", PFEIFFER, {})


def test_stack_order_matters_and_set_active_reorders():
    model = tiny_llama()
    a, b = random_state(model, HOULSBY, 1), random_state(model, PFEIFFER, 2)
    attach_bottleneck(model, "a", HOULSBY, a)
    attach_bottleneck(model, "b", PFEIFFER, b)
    ab = run(model)
    set_active_bottlenecks(model, ["b", "a"])
    ba = run(model)
    assert (ab - ba).abs().max() > 1e-3
    other = tiny_llama()
    attach_bottleneck(other, "b", PFEIFFER, b)
    attach_bottleneck(other, "a", HOULSBY, a)
    assert torch.equal(run(other), ba)
    set_active_bottlenecks(model, ["a"])
    single = tiny_llama()
    attach_bottleneck(single, "a", HOULSBY, a)
    assert torch.equal(run(model), run(single))
    set_active_bottlenecks(model, [])
    assert torch.equal(run(model), run(tiny_llama()))
    with pytest.raises(CompositionError, match=r"must be distinct attached ones; attached: \['a', 'b'\]"):
        set_active_bottlenecks(model, ["a", "c"])


def test_state_round_trip_and_base_model_prefix():
    model = tiny_llama()  # LlamaForCausalLM: layers at model.layers.N
    state = random_state(model, HOULSBY)
    attach_bottleneck(model, "a", HOULSBY, state)
    saved = bottleneck_state(model, "a")
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    bare = tiny_llama(causal=False)  # LlamaModel: the same layers at layers.N
    attach_bottleneck(bare, "a", HOULSBY, saved)
    assert torch.allclose(run(bare), model.model(input_ids=token_ids()).last_hidden_state, atol=1e-6)
    assert attached_bottlenecks(bare) == {"a": HOULSBY}


def test_drop_skips_the_first_layers(monkeypatch):
    from compose import drop

    if BottleneckSite not in drop.DROPPABLE_LAYERS:  # until compose/drop.py lists it
        monkeypatch.setattr(drop, "DROPPABLE_LAYERS", (*drop.DROPPABLE_LAYERS, BottleneckSite))
    model, base = tiny_gpt2(), run(tiny_gpt2())
    state = random_state(model, HOULSBY)
    attach_bottleneck(model, "a", HOULSBY, state)
    drop.set_drop(model, 1)
    without_layer0 = tiny_gpt2()
    attach_bottleneck(without_layer0, "a", HOULSBY.model_copy(update={"leave_out": [0]}), {k: v for k, v in state.items() if ".h.0." not in k})
    assert torch.equal(run(model), run(without_layer0))
    drop.set_drop(model, 2)
    assert torch.equal(run(model), base)
    drop.set_drop(model, 0)
    assert (run(model) - base).abs().max() > 1e-3


@pytest.mark.parametrize("family", MODELS)
def test_untrained_fusion_is_the_average_of_its_members(family):
    """Two Pfeiffer adapters averaged = one adapter with their down-projections stacked and up-projections halved."""
    model = MODELS[family]()
    a, b = random_state(model, PFEIFFER, 1), random_state(model, PFEIFFER, 2)
    attach_bottleneck(model, "a", PFEIFFER, a)
    attach_bottleneck(model, "b", PFEIFFER, b)
    stacked = run(model)
    attach_bottleneck_fusion(model, "f", FusionConfig(members=["a", "b"]))
    fused = run(model)
    joined = {}
    for key in a:
        if "adapter_down" in key:
            joined[key] = torch.cat([a[key], b[key]])
        elif key.endswith("adapter_up.weight"):
            joined[key] = torch.cat([a[key], b[key]], dim=1) / 2
        else:
            joined[key] = (a[key] + b[key]) / 2
    mean = MODELS[family]()
    attach_bottleneck(mean, "m", PFEIFFER.model_copy(update={"reduction_factor": 2}), joined)
    assert (run(mean) - fused).abs().max() < 1e-5
    assert (fused - stacked).abs().max() > 1e-3
    detach_fusion(model)
    assert attached_fusion(model) is None and torch.equal(run(model), stacked)


def test_trained_fusion_state_round_trips_and_placement_options_matter():
    model = tiny_bert(num_labels=None)
    a, b = random_state(model, PFEIFFER, 1), random_state(model, PARALLEL, 2)
    for m in (model, other := tiny_bert(num_labels=None)):
        attach_bottleneck(m, "a", PFEIFFER, a)
        attach_bottleneck(m, "b", PARALLEL, b)
    attach_bottleneck_fusion(model, "f", FusionConfig(members=["b", "a"]), seed=3)
    state = fusion_state(model)
    with torch.no_grad():
        for t in state.values():
            t.add_(0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(4)))
    detach_fusion(model)
    attach_bottleneck_fusion(model, "f", FusionConfig(members=["b", "a"]), state)
    attach_bottleneck_fusion(other, "f", FusionConfig(members=["b", "a"]), fusion_state(model))
    assert attached_fusion(other) == ("f", FusionConfig(members=["b", "a"]))
    assert torch.equal(run(model), run(other))
    outputs = [run(model)]
    for options in ({"query_before_ln": True}, {"residual_before": True}):
        detach_fusion(other)
        attach_bottleneck_fusion(other, "f", FusionConfig(members=["b", "a"]), state, **options)
        outputs.append(run(other))
    assert (outputs[1] - outputs[0]).abs().max() > 1e-4 and (outputs[2] - outputs[0]).abs().max() > 1e-4
    detach_fusion(other)
    parallel_last = []
    for query_before_ln in (False, True):  # a parallel last member's query is x either way
        attach_bottleneck_fusion(other, "f", FusionConfig(members=["a", "b"]), query_before_ln=query_before_ln, seed=3)
        parallel_last.append(run(other))
        detach_fusion(other)
    assert torch.equal(*parallel_last)


def test_fusion_errors():
    model = tiny_gpt2()
    attach_bottleneck(model, "a", PFEIFFER, random_state(model, PFEIFFER, 1))
    attach_bottleneck(model, "h", HOULSBY, random_state(model, HOULSBY, 2))
    with pytest.raises(CompositionError, match=r"members \['x'\] are not attached"):
        attach_bottleneck_fusion(model, "f", FusionConfig(members=["a", "x"]))
    with pytest.raises(CompositionError, match=r"site transformer.h.0.mh_adapter holds fusion members \['h'\] but not \['a'\]"):
        attach_bottleneck_fusion(model, "f", FusionConfig(members=["a", "h"]))
    with pytest.raises(CompositionError, match=r"fusion tensor 'transformer.h.0.mh_adapter.fusion.query.weight' names no site this fusion covers \(transformer.h.0.output_adapter, transformer.h.1.output_adapter\)"):
        attach_bottleneck_fusion(model, "f", FusionConfig(members=["a"]), {"transformer.h.0.mh_adapter.fusion.query.weight": torch.zeros(32, 32)})
    state = {k: v for k, v in _fresh_fusion_state(model, ["a"]).items() if not k.endswith("value.weight")}
    with pytest.raises(CompositionError, match=r"site transformer.h.0.output_adapter: fusion state has \['key.bias', 'key.weight', 'query.bias', 'query.weight'\], expected"):
        attach_bottleneck_fusion(model, "f", FusionConfig(members=["a"]), state)
    assert attached_fusion(model) is None
    attach_bottleneck_fusion(model, "f", FusionConfig(members=["a"]))
    with pytest.raises(CompositionError, match="bottleneck fusion 'f' is already attached"):
        attach_bottleneck_fusion(model, "g", FusionConfig(members=["a"]))
    detach_bottleneck(model, "a")  # a fusion loses its member: it goes too
    assert attached_fusion(model) is None and all(s.fusion is None for _, s in sites(model))


def _fresh_fusion_state(model, members):
    probe = copy.deepcopy(model)
    attach_bottleneck_fusion(probe, "probe", FusionConfig(members=members))
    return fusion_state(probe)


def test_attach_errors_leave_the_model_untouched():
    model = tiny_llama()
    base, keys = run(model), list(model.state_dict())
    good = random_state(model, PFEIFFER)
    cases = {
        r"model.layers.0.output_adapter.adapter_down.weight has shape \(8, 32\), expected \(2, 32\)": (BottleneckConfig(reduction_factor=16), good),
        "lacks tensors for model.layers.0.mh_adapter but the config adapts it": (HOULSBY, good),
        r"has tensors for model.layers.1.output_adapter but output_adapter=True, leave_out=\[1\]": (PFEIFFER.model_copy(update={"leave_out": [1]}), good),
        "has tensors .*, expected .*gate.bias": (PFEIFFER.model_copy(update={"use_gating": True}), good),
        "tensor 'encoder.layer.0.output_adapter.adapter_down.weight' of adapter 'a' is not <layer>": (PFEIFFER, {"encoder.layer.0.output_adapter.adapter_down.weight": torch.zeros(2, 32)}),
        "non_linearity 'nope' is not a transformers activation": (PFEIFFER.model_copy(update={"non_linearity": "nope"}), good),
        "residual_before_ln='post_add' needs a post-LN model": (PFEIFFER.model_copy(update={"residual_before_ln": "post_add"}), good),
    }
    for message, (config, state) in cases.items():
        with pytest.raises(CompositionError, match=message) as error:
            attach_bottleneck(model, "a", config, state)
        assert "\n" not in str(error.value)
    assert torch.equal(run(model), base) and list(model.state_dict()) == keys and not hasattr(model, "_compose_bottleneck")
    attach_bottleneck(model, "a", PFEIFFER, good)
    with pytest.raises(CompositionError, match="bottleneck adapter 'a' is already attached"):
        attach_bottleneck(model, "a", PFEIFFER, good)
    with pytest.raises(CompositionError, match="bottleneck adapter 'b' is not attached"):
        detach_bottleneck(model, "b")


def test_config_presets_and_validation():
    assert PARALLEL.is_parallel and PARALLEL.scaling == 4.0 and PARALLEL.reduction_factor == 2 and PARALLEL.locations == ["output_adapter"]
    assert HOULSBY.locations == ["mh_adapter", "output_adapter"] and not HOULSBY.original_ln_before and HOULSBY.non_linearity == "swish"
    config = BottleneckConfig(reduction_factor={"0": 4, "default": 8})
    assert [config.bottleneck_size(i, 32) for i in (0, 1)] == [8, 4]
    assert BottleneckConfig(reduction_factor=64).bottleneck_size(0, 32) == 1
    with pytest.raises(ValueError, match="needs mh_adapter or output_adapter"):
        BottleneckConfig(output_adapter=False)
    with pytest.raises(ValueError, match="'post_add' needs original_ln_before=True"):
        BottleneckConfig(original_ln_before=False, residual_before_ln="post_add")
    with pytest.raises(ValueError, match="layer numbers or 'default'"):
        BottleneckConfig(reduction_factor={"first": 2})
    with pytest.raises(ValueError, match="no entry for layer 1"):
        BottleneckConfig(reduction_factor={"0": 2}).bottleneck_size(1, 32)
    with pytest.raises(ValueError, match="unknown bottleneck preset 'compacter'"):
        BottleneckConfig.preset("compacter")


def test_bottleneck_composes_with_lora_on_the_same_layers(tmp_path):
    from compose.lora.model import attach_lora, detach_lora
    from tests.tiny import load_adapter, make_peft_adapter

    model = tiny_gpt2()
    lora_config, lora_state = load_adapter(make_peft_adapter(tiny_gpt2(), tmp_path, target_modules=["c_attn", "c_proj"]))
    state = random_state(model, HOULSBY)
    attach_bottleneck(model, "a", HOULSBY, state)
    attach_lora(model, "l", lora_config, lora_state)  # the model's own modules are still where LoRA expects them
    both = run(model)
    other = tiny_gpt2()
    attach_lora(other, "l", lora_config, lora_state)
    attach_bottleneck(other, "a", HOULSBY, state)
    assert torch.equal(both, run(other))
    detach_lora(model)
    detach_bottleneck(model)
    assert torch.equal(run(model), run(tiny_gpt2()))


def test_fp64_and_bf16_bases():
    state = random_state(tiny_llama(), HOULSBY)
    reference = tiny_llama()
    attach_bottleneck(reference, "a", HOULSBY, state)
    model = tiny_llama().double()
    attach_bottleneck(model, "a", HOULSBY, state)
    assert all(p.dtype == torch.float64 for _, s in sites(model) for p in s.parameters())
    assert (run(model).float() - run(reference)).abs().max() < 1e-5
    half = tiny_llama().to(torch.bfloat16)
    attach_bottleneck(half, "a", HOULSBY, state)
    out = run(half)
    assert out.dtype == torch.bfloat16 and (out.float() - run(reference)).abs().max() < 0.2


def test_mam_is_its_prefix_plus_its_parallel_adapter_and_attaches_atomically():
    from compose.mam.config import MamConfig
    from compose.mam.model import attach_mam, detach_mam
    from compose.prefix.config import PrefixConfig
    from compose.prefix.model import attach_prefix

    model = tiny_llama()
    prefix = PrefixConfig(num_virtual_tokens=3, num_layers=2, token_dim=16, num_attention_heads=2, position_offset=False)
    prompt = torch.randn(3, 2 * 2 * 16, generator=torch.Generator().manual_seed(5))
    adapter = random_state(model, PARALLEL)
    config = MamConfig(prefix=prefix, adapter=PARALLEL)
    assert MamConfig(prefix=prefix).adapter == PARALLEL
    base = run(model)
    bad = {**adapter, "model.layers.0.output_adapter.adapter_up.bias": torch.zeros(3)}
    with pytest.raises(CompositionError, match=r"adapter_up.bias has shape \(3,\), expected \(32,\)"):
        attach_mam(model, "m", config, {"prompt_embeddings": prompt, **bad})
    assert not hasattr(model, "_compose_prefix") and torch.equal(run(model), base)
    attach_mam(model, "m", config, {"prompt_embeddings": prompt, **adapter})
    parts = tiny_llama()
    attach_prefix(parts, "p", prefix, {"prompt_embeddings": prompt})
    attach_bottleneck(parts, "b", PARALLEL, adapter)
    assert torch.equal(run(model), run(parts))
    with pytest.raises(CompositionError, match="adapter 'm' is the parallel adapter of a mam adapter; detach it with detach_mam"):
        detach_bottleneck(model, "m")
    detach_bottleneck(model)  # all bottleneck adapters: MAM's stays
    assert torch.equal(run(model), run(parts))
    detach_mam(model)
    assert torch.equal(run(model), base) and not hasattr(model, "_compose_prefix") and not hasattr(model, "_compose_bottleneck")
