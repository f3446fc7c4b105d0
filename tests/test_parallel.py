"""Parallel multi-task inference (`compose.parallel`): the first k layers run once, then one copy of the batch per task.

Oracle: each task run alone on a fresh copy of the base model carrying only that task's adapter, restricted
to the modules of layers ≥ k (the state filtered here, independently of `compose.drop`). The tasks differ in
targets, ranks, alphas, rsLoRA and lora_bias; inputs carry padding so the attention mask is per row.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from tiny import load_adapter, make_peft_adapter, tiny_llama, token_ids

from compose.drop import current_drop, set_drop
from compose.errors import CompositionError
from compose.lora.mixed import mixed_adapters
from compose.lora.model import attach_lora
from compose.parallel import disable_parallel, enable_parallel, parallel_tasks

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore")

LLAMA = {
    "a": dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8),
    "b": dict(target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], r=8, lora_alpha=4, use_rslora=True, lora_bias=True),
    "c": dict(target_modules=["o_proj", "gate_proj"], r=2, lora_alpha=16),
}
BERT = {
    "a": dict(target_modules=["query", "value"], r=4, lora_alpha=8),
    "b": dict(target_modules=["query", "key", "dense"], r=8, lora_alpha=4, use_rslora=True, lora_bias=True),
    "c": dict(target_modules=["intermediate.dense"], r=2, lora_alpha=16),
}


def tiny_bert3() -> torch.nn.Module:
    """A 3-layer `BertModel` (no pooler), random biases as in `tiny`."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


def above(state: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The tensors of modules in layers ≥ k."""
    return {key: t for key, t in state.items() if int(re.search(r"\.(?:layers|layer)\.(\d+)\.", key).group(1)) >= k}


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """{family: (base, {task: (config, state)})}."""
    out = {}
    for family, build, specs in (("llama", tiny_llama, LLAMA), ("bert", tiny_bert3, BERT)):
        base = build()
        folder = tmp_path_factory.mktemp(family)
        out[family] = base, {name: load_adapter(make_peft_adapter(base, folder / name, seed=i, **spec)) for i, (name, spec) in enumerate(specs.items())}
    return out


def with_tasks(base, tasks) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for name, (config, state) in tasks.items():
        attach_lora(model, name, config, state)
    return model


def inputs(batch: int) -> dict[str, torch.Tensor]:
    ids = token_ids(batch, 7)
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0  # a padded row when batch > 1 (left padding): the mask differs per row
    if batch == 1:
        mask[0, :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def main_output(family: str, out) -> torch.Tensor:
    return out.logits if family == "llama" else out.last_hidden_state


@torch.no_grad()
@pytest.mark.parametrize("family,k,batch", [("llama", 0, 3), ("llama", 1, 3), ("llama", 2, 3), ("llama", 1, 1),
                                            ("bert", 0, 2), ("bert", 1, 2), ("bert", 2, 2), ("bert", 3, 2), ("bert", 2, 1)])
def test_each_task_equals_running_it_alone_with_drop_k(setups, family, k, batch):
    base, tasks = setups[family]
    names = list(tasks)
    model = with_tasks(base, tasks)
    enable_parallel(model, names, k)
    x = inputs(batch)
    out = main_output(family, model(**x))
    assert out.shape[:2] == (len(names), batch)
    plain = main_output(family, base(**x))
    for t, name in enumerate(names):
        config, state = tasks[name]
        alone = copy.deepcopy(base)
        if above(state, k):
            attach_lora(alone, name, config, above(state, k))
        ref = main_output(family, alone(**x))
        torch.testing.assert_close(out[t], ref, atol=ATOL, rtol=0)
        if k < 3 and above(state, k):  # the task really changes the output, so the comparison means something
            assert (ref - plain).abs().max() > 1e-3
    if k == len(model.base_model.layers if family == "llama" else model.encoder.layer):
        assert all(torch.equal(out[t], out[0]) for t in range(len(names)))  # all layers shared, no head adapter: the base for all


@torch.no_grad()
def test_hidden_states_are_per_task_and_shared_ones_expanded(setups):
    base, tasks = setups["bert"]
    model = with_tasks(base, tasks)
    enable_parallel(model, list(tasks), 2)
    x = inputs(2)
    out = model(**x, output_hidden_states=True)
    ref = base(**x, output_hidden_states=True)
    assert len(out.hidden_states) == 4 and all(h.shape == (3, 2, 7, 32) for h in out.hidden_states)
    for i in range(3):  # embeddings and layers 0, 1 ran once, without adapters: the base's for every task
        for t in range(3):
            torch.testing.assert_close(out.hidden_states[i][t], ref.hidden_states[i], atol=ATOL, rtol=0)
    assert (out.hidden_states[3][0] - out.hidden_states[3][1]).abs().max() > 1e-3  # layer 2 ran per task


@torch.no_grad()
def test_disable_restores_the_model_and_its_drop(setups):
    base, tasks = setups["llama"]
    model = with_tasks(base, tasks)
    set_drop(model, 1)
    x = inputs(2)
    before = model(**x).logits
    enable_parallel(model, ["c", "a"], 2)
    assert parallel_tasks(model) == (["c", "a"], 2) and current_drop(model) == 2
    assert model(**x).logits.shape[:2] == (2, 2)
    enable_parallel(model, ["b"], 0)  # enabling again replaces the set-up
    assert parallel_tasks(model) == (["b"], 0)
    disable_parallel(model)
    assert parallel_tasks(model) is None and mixed_adapters(model) is None and current_drop(model) == 1
    torch.testing.assert_close(model(**x).logits, before, atol=0, rtol=0)
    disable_parallel(model)  # no-op


def test_refusals(setups):
    base, tasks = setups["llama"]
    model = with_tasks(base, tasks)
    with pytest.raises(CompositionError, match=r"k=3 is outside \[0, 2\]"):
        enable_parallel(model, ["a"], 3)
    with pytest.raises(CompositionError, match="not attached|distinct"):
        enable_parallel(model, ["a", "zzz"], 1)
    enable_parallel(model, ["a", "b"], 1)
    x = inputs(2)
    with pytest.raises(CompositionError, match="labels"):
        model(**x, labels=x["input_ids"])
    with pytest.raises(CompositionError, match="adapter_ids"):
        model(**x, adapter_ids=torch.tensor([0, 1]))
    with pytest.raises(CompositionError, match="KV cache"):
        model(**x, use_cache=True)
    set_drop(model, 0)
    with pytest.raises(CompositionError, match="enable_parallel again"):
        model(**x)
    set_drop(model, 1)
    model.train()
    with pytest.raises(CompositionError, match="eval"):
        model(**x)
    model.eval()
    with torch.no_grad():
        assert model(**x).logits.shape[:2] == (2, 2)  # a refused call leaves the set-up working
