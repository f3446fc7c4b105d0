"""AdapterDrop: dropping the first k layers' adapters equals attaching the adapters without those layers'
modules (a filtered state), with LoRA alone and under a fusion; random drop per training step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import load_adapter, make_peft_adapter, tiny_bert, tiny_gpt2, tiny_llama, token_ids

from compose.drop import current_drop, layer_index, num_layers, random_drop, set_drop
from compose.errors import CompositionError
from compose.fusion.config import FusionConfig
from compose.fusion.model import attach_fusion, fusion_state
from compose.fusion.train import train_fusion
from compose.lora.layer import LoraLayer
from compose.lora.model import attach_lora

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore")

CASES = {  # builder, LoRA targets, extra PEFT kwargs
    "llama": (tiny_llama, ["q_proj", "v_proj", "o_proj", "down_proj"], {}),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj"], {"fan_in_fan_out": True}),
}


@torch.no_grad()
def run(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def adapters(case: str, tmp_path) -> tuple[torch.nn.Module, list]:
    """The base model and two adapters on it, as (config, state) pairs."""
    build, targets, extra = CASES[case]
    base = build()
    return base, [load_adapter(make_peft_adapter(base, tmp_path / f"a{i}", seed=i, target_modules=targets, r=2 + i, lora_alpha=8, **extra))
                  for i in range(2)]


def above(state: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Only the tensors of modules in layers ≥ k (written out independently of `compose.drop`)."""
    import re

    return {key: t for key, t in state.items() if int(re.search(r"\.(?:layers|h)\.(\d+)\.", key).group(1)) >= k}


def attached(base, pairs, k: int = 0, fusion_state_: dict | None = None) -> torch.nn.Module:
    """A copy of `base` with the adapters' modules of layers ≥ k (and a fusion of them, given its state)."""
    model = copy.deepcopy(base)
    for i, (config, state) in enumerate(pairs):
        attach_lora(model, f"a{i}", config, above(state, k))
    if fusion_state_ is not None:
        attach_fusion(model, "f", FusionConfig(members=["a0", "a1"]), above(fusion_state_, k))
    return model


def test_layer_index_and_num_layers():
    assert layer_index("model.layers.3.self_attn.q_proj") == 3
    assert layer_index("transformer.h.12.attn.c_attn") == 12
    assert layer_index("bert.encoder.layer.0.attention.self.query") == 0
    assert layer_index("vision.blocks.7.mlp.fc1") == 7
    assert layer_index("lm_head") is None and layer_index("model.layers_norm.3") is None
    assert num_layers(tiny_llama()) == num_layers(tiny_gpt2()) == 2
    assert num_layers(tiny_bert()) == 1
    with pytest.raises(CompositionError, match="no layer list"):
        num_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("case", CASES)
def test_drop_equals_adapters_removed_from_the_first_k_layers(case, tmp_path):
    base, pairs = adapters(case, tmp_path)
    model = attached(base, pairs)
    ids = token_ids()
    full, plain = run(model, ids), run(base, ids)
    outputs = []
    for k in (0, 1, 2):
        set_drop(model, k)
        assert current_drop(model) == k
        reference = plain if k == num_layers(model) else run(attached(base, pairs, k), ids)
        torch.testing.assert_close(run(model, ids), reference, atol=ATOL, rtol=0)
        outputs.append(reference)
    assert (outputs[0] - outputs[1]).abs().max() > 100 * ATOL and (outputs[1] - plain).abs().max() > 100 * ATOL
    set_drop(model, 0)
    assert torch.equal(run(model, ids), full)


def test_drop_with_fusion(tmp_path):
    base, pairs = adapters("llama", tmp_path)
    model = attached(base, pairs)
    attach_fusion(model, "f", FusionConfig(members=["a0", "a1"]))
    g = torch.Generator().manual_seed(0)
    state = {key: t + torch.randn(t.shape, generator=g) / t.shape[-1] ** 0.5 for key, t in fusion_state(model).items()}  # non-uniform attention
    model = attached(base, pairs, fusion_state_=state)
    ids = token_ids()
    full, plain = run(model, ids), run(base, ids)
    set_drop(model, 2)
    torch.testing.assert_close(run(model, ids), plain, atol=ATOL, rtol=0)
    set_drop(model, 1)
    reference = run(attached(base, pairs, 1, state), ids)  # the fusion of layer 1 alone
    torch.testing.assert_close(run(model, ids), reference, atol=ATOL, rtol=0)
    assert (reference - full).abs().max() > 100 * ATOL and (reference - plain).abs().max() > 100 * ATOL
    set_drop(model, 0)
    assert torch.equal(run(model, ids), full)


def skipped(model) -> dict[str, bool]:
    return {path: m.skip for path, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_random_drop_draws_k_per_step_and_restores(tmp_path):
    base, pairs = adapters("llama", tmp_path)
    model = attached(base, pairs)
    set_drop(model, 2)
    before = skipped(model)
    drawn = []
    for _ in range(16):
        with random_drop(model, torch.Generator().manual_seed(len(drawn))) as k:
            assert skipped(model) == {path: layer_index(path) < k for path in before}
            drawn.append(k)
        assert skipped(model) == before and current_drop(model) == 2
    assert set(drawn) == {0, 1}  # k ∈ [0, L − 1]
    with pytest.raises(RuntimeError), random_drop(model):
        raise RuntimeError("a failed step")
    assert skipped(model) == before


def test_drop_train_runs_a_fusion_with_random_drops(tmp_path):
    base, pairs = adapters("llama", tmp_path)
    batches = [{"input_ids": token_ids(batch=4, length=8, seed=s)} for s in range(3)]
    losses = {}
    for drop in (False, True):
        model = attached(base, pairs)
        attach_fusion(model, "f", FusionConfig(members=["a0", "a1"]))
        losses[drop] = train_fusion(model, batches, objective="causal_lm", epochs=2, lr=1e-2, drop_train=drop, seed=3)
        assert not any(skipped(model).values())
    assert losses[True] != losses[False]  # some steps ran with the first layer dropped


def test_drop_errors(tmp_path):
    base, pairs = adapters("llama", tmp_path)
    model = attached(base, pairs)
    with pytest.raises(CompositionError, match=r"k=3 is outside \[0, 2\]"):
        set_drop(model, 3)
    layer = model.model.layers[1].self_attn.q_proj
    layer.merge()
    with pytest.raises(CompositionError, match="'model.layers.1.self_attn.q_proj' is merged"):
        set_drop(model, 1)
    assert not any(skipped(model).values())
    layer.unmerge()
    set_drop(model, 1)
    with pytest.raises(CompositionError, match="dropped"):
        model.model.layers[0].self_attn.q_proj.merge()
