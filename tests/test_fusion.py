"""AdapterFusion over LoRA adapters: against PEFT (an untrained fusion is the uniform average), against the
attention written out (per layer, key bias and temperature included), and its training, saving and pruning.

Every comparison also checks that the thing compared moves the output well beyond the tolerance.
"""

from __future__ import annotations

import copy

import peft  # noqa: F401  (the oracle; imported so a missing peft fails loudly here)
import pytest
import torch
from tiny import load_adapter, make_peft_adapter, peft_model, tiny_bert, tiny_gpt2, tiny_llama, token_ids

from compose.errors import CompositionError
from compose.fusion.config import FusionConfig
from compose.fusion.layer import FusionLayer
from compose.fusion.model import (
    attach_fusion, attached_fusion, detach_fusion, fusion_attention, fusion_parameters, fusion_regularization,
    fusion_state, prune_fusion, record_attention,
)
from compose.fusion.train import causal_lm_labels, train_fusion
from compose.lora.layer import LoraLayer
from compose.lora.model import attach_lora, attached_adapters, detach_lora, set_active_adapters

ATOL = 1e-5
LLAMA = ["q_proj", "v_proj", "up_proj", "down_proj"]

pytestmark = pytest.mark.filterwarnings("ignore")


def assert_same(ours: torch.Tensor, ref: torch.Tensor, other: torch.Tensor | None = None) -> None:
    """ours == ref within ATOL; and, given another output, ref really differs from it."""
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    if other is not None:
        assert (ref - other).abs().max() > 100 * ATOL, "the compared outputs do not differ"


@torch.no_grad()
def run(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def members(base, tmp_path, n: int, **lora_kwargs) -> list:
    """n PEFT adapters for `base` (ranks 2, 3, 4, ... unless given), saved under tmp_path/a0, a1, ..."""
    return [make_peft_adapter(base, tmp_path / f"a{i}", seed=i, **(dict(target_modules=LLAMA, r=2 + i, lora_alpha=8) | lora_kwargs))
            for i in range(n)]


def with_members(base, dirs) -> torch.nn.Module:
    model = copy.deepcopy(base)
    for i, d in enumerate(dirs):
        attach_lora(model, f"a{i}", *load_adapter(d))
    return model


def fused(base, dirs, state=None, **config) -> torch.nn.Module:
    model = with_members(base, dirs)
    attach_fusion(model, "f", FusionConfig(members=[f"a{i}" for i in range(len(dirs))], **config), state)
    return model


def random_state(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's fusion state with every tensor redrawn, large enough that attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) / v.shape[-1] ** 0.5 for k, v in fusion_state(model).items()}
    for k, v in state.items():
        v += torch.eye(v.shape[0]) if k.endswith("value.weight") else 0
        v *= 10 if ".query." in k else 1
    return state


def attention_written_out(fusion: FusionLayer, hidden: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    """AdapterHub's BertFusion as the paper writes it: sᵢ = Q(h)·K(oᵢ) (key bias included), p = softmax(s/T), Σ pᵢ·V(oᵢ)."""
    q = hidden @ fusion.query.weight.T + fusion.query.bias
    scores = torch.stack([(q * (o @ fusion.key.weight.T + fusion.key.bias)).sum(-1) for o in outputs], -1)
    p = torch.softmax(scores / fusion.temperature, -1)
    return sum(p[..., i : i + 1] * (o @ fusion.value.weight.T) for i, o in enumerate(outputs))


# --- an untrained fusion is the uniform average (PEFT's cat combination with weights 1/N) ---------------

@pytest.mark.parametrize("case", ["llama-2", "llama-3", "gpt2-conv1d-2"])
def test_untrained_fusion_is_the_uniform_average(case, tmp_path):
    arch, _, n = case.rpartition("-")
    n = int(n)
    if arch == "llama":
        base, kwargs = tiny_llama(), {}
    else:
        base, kwargs = tiny_gpt2(), dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    dirs = members(base, tmp_path, n, **kwargs)
    ref = peft_model(base, dirs[0], name="a0")
    for i in range(1, n):
        ref.load_adapter(str(dirs[i]), adapter_name=f"a{i}")
    ref.add_weighted_adapter([f"a{i}" for i in range(n)], [1 / n] * n, "avg", combination_type="cat")  # exactly Σ sᵢBᵢAᵢ / N
    ref.set_adapter("avg")

    ours = with_members(base, dirs)
    ids = token_ids()
    summed = run(ours, ids)
    attach_fusion(ours, "f", FusionConfig(members=[f"a{i}" for i in range(n)]))
    assert_same(run(ours, ids), run(ref, ids), summed)
    assert_same(run(ours, ids), run(ref, ids), run(base, ids))
    assert fusion_regularization(ours).item() == 0.0
    assert attached_fusion(ours) == ("f", FusionConfig(members=[f"a{i}" for i in range(n)]))


# --- the attention itself ---------------------------------------------------------------------------

def test_fusion_layer_is_the_attention_written_out():
    torch.manual_seed(0)
    fusion = FusionLayer(16, temperature=2.0)
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_(std=0.5)  # the key bias too: it must cancel in the softmax, as the layer assumes
    hidden, outputs = torch.randn(2, 5, 16), [torch.randn(2, 5, 16) for _ in range(3)]
    expected = attention_written_out(fusion, hidden, outputs)
    with torch.no_grad():
        assert_same(fusion(hidden, torch.stack(outputs)), expected, sum(outputs) / 3)
        fusion.temperature = 1.0
        assert (fusion(hidden, torch.stack(outputs)) - expected).abs().max() > 100 * ATOL  # temperature matters
        fusion.record = True
        fusion(hidden, torch.stack(outputs))
    q = hidden @ fusion.query.weight.T + fusion.query.bias
    scores = torch.stack([(q * (o @ fusion.key.weight.T + fusion.key.bias)).sum(-1) for o in outputs], -1)
    torch.testing.assert_close(fusion.attention_sum / fusion.attention_count, scores.softmax(-1).mean((0, 1)))
    assert fusion.attention_count == 10


def test_fresh_fusion_layer_init():
    fusion = FusionLayer(8, generator=torch.Generator().manual_seed(3))
    assert not fusion.query.weight.any() and not fusion.query.bias.any()
    assert torch.equal(fusion.value.weight, torch.eye(8)) and fusion.value.bias is None
    assert 0.01 < fusion.key.weight.std() < 0.03
    assert torch.equal(FusionLayer(8, generator=torch.Generator().manual_seed(3)).key.weight, fusion.key.weight)
    assert fusion.value_regularization().item() == 0.0


def test_fused_module_is_base_plus_fusion_of_the_adapters_outputs(tmp_path):
    base = tiny_llama()
    dirs = members(base, tmp_path, 3, lora_bias=True)  # δᵢ = sᵢ·(BᵢAᵢx + βᵢ)
    model = fused(base, dirs, random_state(fused(base, dirs)), temperature=0.5)
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = layer.base_layer(x)
        deltas = [ad.scaling * (x @ ad.lora_A.T @ ad.lora_B.T + ad.lora_bias) for ad in (layer.adapters[f"a{i}"] for i in range(3))]
        assert_same(layer(x), y0 + attention_written_out(layer.fusion, y0, deltas), y0 + sum(deltas) / 3)
        # the temperature is the config's, and changes the model's output
        ids = token_ids()
        assert_same(run(model, ids), run(fused(base, dirs, fusion_state(model), temperature=0.5), ids),
                    run(fused(base, dirs, fusion_state(model), temperature=2.0), ids))


# --- training ---------------------------------------------------------------------------------------

def lm_batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    batches = []
    for i in range(n):
        ids = token_ids(batch=4, length=12, seed=10 + i)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # one padded row
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def test_training_lowers_the_loss_and_touches_only_the_fusion(tmp_path):
    base = tiny_llama()
    model = fused(base, members(base, tmp_path, 2, r=8, lora_alpha=32))  # strong members: the fusion has room to move
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".fusion." not in k}
    before_fusion = fusion_state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = token_ids()
    untrained = run(model, ids)
    steps = []
    losses = train_fusion(model, lambda: lm_batches(2), objective="causal_lm", epochs=8, lr=1e-2, on_step=lambda s, l: steps.append((s, l)))

    assert len(losses) == 16 and steps == list(enumerate(losses, 1))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses  # from ≈ ln 64 = 4.16
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # base and adapters bit-identical
    assert all(p.grad is None for p in model.parameters())  # nothing but the fusion had gradients, and those are freed
    assert all(not torch.equal(fusion_state(model)[k], v) for k, v in before_fusion.items() if not k.endswith("key.bias"))
    assert fusion_regularization(model).item() > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    assert (run(model, ids) - untrained).abs().max() > 100 * ATOL


def test_causal_lm_labels_mask_padding():
    batch = lm_batches(1)[0]
    labels = causal_lm_labels(batch)
    assert (labels[0, -3:] == -100).all() and torch.equal(labels[1:], batch["input_ids"][1:])
    assert causal_lm_labels({"input_ids": batch["input_ids"]}) is batch["input_ids"]


def test_classification_trains_fusion_and_head_contrastive_the_fusion(tmp_path):
    ids = token_ids(batch=6, length=8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]

    base = tiny_bert()
    model = fused(base, members(base, tmp_path / "cls", 2, target_modules=["query", "value"]))
    head = model.classifier.weight.clone()
    encoder = {k: v.clone() for k, v in model.bert.state_dict().items() if ".fusion." not in k}
    losses = train_fusion(model, batches, objective="classification", epochs=5, lr=1e-2)
    assert losses[-1] < losses[0]
    assert not torch.equal(model.classifier.weight, head)
    assert all(torch.equal(model.bert.state_dict()[k], v) for k, v in encoder.items())

    bare = tiny_bert(num_labels=None)
    model = fused(bare, members(bare, tmp_path / "enc", 2, target_modules=["query", "value"]))
    key = "encoder.layer.0.attention.self.query.fusion.query.weight"
    before = fusion_state(model)[key]
    losses = train_fusion(model, batches, objective="contrastive", epochs=3, lr=1e-2)
    assert torch.isfinite(torch.tensor(losses)).all() and not torch.equal(fusion_state(model)[key], before)
    with pytest.raises(CompositionError, match="logits"):
        train_fusion(model, batches, objective="classification")
    with pytest.raises(CompositionError, match="labels"):
        train_fusion(model, [{"input_ids": ids}], objective="contrastive")


# --- saving, pruning, detaching ----------------------------------------------------------------------

def test_state_round_trip_gives_identical_logits(tmp_path):
    base = tiny_llama()
    dirs = members(base, tmp_path, 3)
    model = fused(base, dirs)
    train_fusion(model, lm_batches(2), objective="causal_lm", epochs=2, lr=1e-2)
    state = fusion_state(model)
    assert len(state) == 5 * 8  # 4 targets × 2 layers, Q/K weight+bias and V weight
    ids = token_ids()
    assert torch.equal(run(fused(base, dirs, state), ids), run(model, ids))
    assert (run(fused(base, dirs), ids) - run(model, ids)).abs().max() > 100 * ATOL
    # keyed relative to the transformers model: the same state loads onto the bare LlamaModel
    assert_same(run(fused(base.model, dirs, state), ids), run(model.model, ids))


def test_prune_the_least_attended_member(tmp_path):
    base = tiny_llama()
    dirs = members(base, tmp_path, 3)
    model = fused(base, dirs)
    state = random_state(model, seed=0)
    model = fused(base, dirs, state)
    ids = token_ids(batch=4, length=10)
    record_attention(model)
    before = run(model, ids)
    attention = fusion_attention(model)
    assert list(attention) == ["a0", "a1", "a2"] and abs(sum(attention.values()) - 1) < 1e-5
    low = min(attention, key=attention.get)
    keep = [m for m in attention if m != low]
    assert all(attention[m] > attention[low] + 0.1 for m in keep), attention

    prune_fusion(model, keep)
    assert attached_fusion(model)[1].members == keep
    assert fusion_attention(model).keys() == set(keep)  # the kept members' records survive
    kept_dirs = [dirs[int(m[1])] for m in keep]
    reference = with_members(base, kept_dirs)  # named a0, a1: rename the state's members by position
    attach_fusion(reference, "f", FusionConfig(members=["a0", "a1"]), state)
    assert_same(run(model, ids), run(reference, ids), before)
    layer = model.model.layers[0].self_attn.q_proj  # and the math over the kept members
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = layer.base_layer(x)
        deltas = [layer.adapters[m].scaling * (x @ layer.adapters[m].lora_A.T @ layer.adapters[m].lora_B.T) for m in keep]
        assert_same(layer(x), y0 + attention_written_out(layer.fusion, y0, deltas))
    with pytest.raises(CompositionError, match="members"):
        prune_fusion(model, [low])


def test_detach_fusion_and_members(tmp_path):
    base = tiny_llama()
    dirs = members(base, tmp_path, 2)
    state = random_state(fused(base, dirs))
    model = fused(base, dirs, state)
    ids = token_ids()
    fused_out = run(model, ids)
    summed = run(with_members(base, dirs), ids)
    set_active_adapters(model, ["a0"])  # the fusion runs whatever the active list says
    assert torch.equal(run(model, ids), fused_out)
    with pytest.raises(CompositionError, match="AdapterFusion"):
        model.model.layers[0].self_attn.q_proj.merge()

    assert detach_fusion(model) is model and attached_fusion(model) is None
    set_active_adapters(model, ["a0", "a1"])
    assert_same(run(model, ids), summed, fused_out)
    assert not any(m.fusion is not None for m in model.modules() if isinstance(m, LoraLayer))

    model = fused(base, dirs, state)
    detach_lora(model, "a1")  # losing a member takes the fusion off
    assert attached_fusion(model) is None and attached_adapters(model) == ["a0"]
    assert_same(run(model, ids), run(with_members(base, dirs[:1]), ids), fused_out)
    detach_lora(model)
    assert torch.equal(run(model, ids), run(base, ids))


# --- errors -----------------------------------------------------------------------------------------

def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_dora_member_is_refused(tmp_path):
    base = tiny_llama()
    plain = make_peft_adapter(base, tmp_path / "a", target_modules=["q_proj"], r=2, lora_alpha=4)
    dora = make_peft_adapter(base, tmp_path / "b", target_modules=["q_proj"], r=2, lora_alpha=4, use_dora=True)
    model = with_members(base, [plain, dora])
    with pytest.raises(CompositionError) as err:
        attach_fusion(model, "f", FusionConfig(members=["a0", "a1"]))
    assert "'a1' is DoRA" in _one_line(err) and "model.layers.0.self_attn.q_proj" in str(err.value)
    assert attached_fusion(model) is None and not any(m.fusion is not None for m in model.modules() if isinstance(m, LoraLayer))


def test_attach_errors_name_what_is_wrong(tmp_path):
    base = tiny_llama()
    dirs = [make_peft_adapter(base, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4),
            make_peft_adapter(base, tmp_path / "b", seed=2, target_modules=["q_proj"], r=2, lora_alpha=4)]
    model = with_members(base, dirs)
    with pytest.raises(CompositionError) as err:
        attach_fusion(model, "f", FusionConfig(members=["a0", "zz"]))
    assert "['zz'] are not attached" in _one_line(err)
    with pytest.raises(CompositionError) as err:
        attach_fusion(model, "f", FusionConfig(members=["a0", "a1"]))
    assert "'model.layers.0.self_attn.v_proj'" in _one_line(err) and "['a1']" in str(err.value)
    assert attached_fusion(model) is None

    good = with_members(base, dirs[:1])
    attach_fusion(good, "f", FusionConfig(members=["a0"]))
    state = fusion_state(good)
    key = "model.layers.1.self_attn.v_proj.fusion.value.weight"
    for broken, expected in [
        ({k: v for k, v in state.items() if k != key}, "'model.layers.1.self_attn.v_proj'"),
        (dict(state, **{key: torch.zeros(8, 8)}), r"shape \(8, 8\), expected \(16, 16\)"),
        (dict(state, **{"model.layers.1.mlp.up_proj.fusion.value.weight": torch.zeros(32, 32)}), "model.layers.1.mlp.up_proj"),
    ]:
        fresh = with_members(base, dirs[:1])
        with pytest.raises(CompositionError, match=expected) as err:
            attach_fusion(fresh, "f", FusionConfig(members=["a0"]), broken)
        _one_line(err)
        assert attached_fusion(fresh) is None
    with pytest.raises(CompositionError, match="already attached"):
        attach_fusion(good, "g", FusionConfig(members=["a0"]))
    with pytest.raises(CompositionError, match="no fusion"):
        fusion_parameters(with_members(base, dirs[:1]))
    with pytest.raises(CompositionError, match="record_attention"):
        fusion_attention(good)
    with pytest.raises(ValueError, match="more than once"):
        FusionConfig(members=["a0", "a0"])
