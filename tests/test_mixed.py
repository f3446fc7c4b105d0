"""Mixed-adapter batches (`compose.lora.mixed`): each row runs its own adapter, or none for id −1.

Oracles: the same row run alone with only its adapter active (the engine's single-adapter path), and
PEFT's `model(..., adapter_names=[...])` / `generate(..., adapter_names=[...])` on the same adapters.
The adapters differ in targets, ranks, alphas, rsLoRA and lora_bias, so a module lacking an adapter,
rank padding and scaling folding are all exercised; every comparison also checks that the adapters
really move the rows.
"""

from __future__ import annotations


import pytest
import torch
from tiny import same_lora_adapters, tiny_gpt2, tiny_llama, token_ids

from compose.drop import set_drop
from compose.errors import CompositionError
from compose.fusion.config import FusionConfig
from compose.fusion.model import attach_fusion
from compose.lora.config import LoraConfig
from compose.lora.layer import LoraLayer
from compose.lora.mixed import disable_mixed, enable_mixed, grouped_path, mixed_adapters
from compose.lora.model import attach_lora, detach_lora, set_active_adapters
from compose.lora.state import new_lora_state

ATOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore")

LLAMA = {
    "a": dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8),
    "b": dict(target_modules=["q_proj", "k_proj", "o_proj", "up_proj"], r=8, lora_alpha=4, use_rslora=True, lora_bias=True),
    "c": dict(target_modules=["o_proj"], r=2, lora_alpha=16),
}
GPT2 = {
    "a": dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8, fan_in_fan_out=True),
    "b": dict(target_modules=["c_attn", "c_proj"], r=8, lora_alpha=4, use_rslora=True, lora_bias=True, fan_in_fan_out=True),
    "c": dict(target_modules=["c_proj"], r=2, lora_alpha=16, fan_in_fan_out=True),
}
IDS = [0, -1, 2, 1, 0, 2, 1]  # rows of every adapter and of the base model, in no order


@torch.no_grad()
def alone(model: torch.nn.Module, names: list[str], ids: list[int], x: torch.Tensor) -> torch.Tensor:
    """Each row run on its own with only its adapter active (none for −1), stacked back into a batch."""
    rows = []
    for i, k in enumerate(ids):
        set_active_adapters(model, [] if k < 0 else [names[k]])
        rows.append(model(x[i : i + 1]).logits)
    return torch.cat(rows)


#: every adapter twice and a base row (the grid of rows per adapter is full); lopsided (the grid is padded); no adapter at all
ROWS = {"even": IDS, "lopsided": [0, 0, -1, 2, 0, 1, 0], "base-only": [-1, -1, -1]}


@pytest.mark.parametrize("rows", list(ROWS))
@pytest.mark.parametrize("tokens", [1, 8, 9], ids=lambda t: f"{t}-tokens-{'grouped' if grouped_path(t) else 'gathered'}")
@pytest.mark.parametrize("arch", ["llama", "gpt2-conv1d"])
def test_each_row_equals_its_adapter_alone_and_peft(arch, tokens, rows):
    base, specs = (tiny_llama(), LLAMA) if arch == "llama" else (tiny_gpt2(), GPT2)
    ours, ref = same_lora_adapters(base, specs)
    names = list(specs)
    enable_mixed(ours, names)
    assert mixed_adapters(ours) == names
    assert [grouped_path(t) for t in (1, 8, 9)] == [True, True, False]  # both ways to the sum are checked
    ids = ROWS[rows]
    x = token_ids(len(ids), tokens)
    with torch.no_grad():
        mixed = ours(x, adapter_ids=torch.tensor(ids)).logits
        peft_mixed = ref(x, adapter_names=["__base__" if k < 0 else names[k] for k in ids]).logits
        plain = base(x).logits
    torch.testing.assert_close(mixed, alone(ours, names, ids, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed, peft_mixed, atol=ATOL, rtol=0)
    moved = (mixed - plain).abs().amax((1, 2))
    assert all((moved[i] > 100 * ATOL) == (k >= 0) for i, k in enumerate(ids)), moved  # −1 rows are the base, others are not
    if rows != "even":
        return
    # ids as a list work too, and a call without them runs the active adapters for every row
    set_active_adapters(ours, ["b"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, adapter_ids=IDS).logits, mixed, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x).logits, alone(ours, names, [1] * len(IDS), x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("search", ["greedy", "beams"])
def test_generate_keeps_each_rows_adapter_across_cached_steps(search):
    base = tiny_llama()
    ours, ref = same_lora_adapters(base, LLAMA)
    names = list(LLAMA)
    enable_mixed(ours, names)
    ids = [2, -1, 0, 1]
    x = token_ids(len(ids), 5)
    kwargs = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    if search == "beams":  # transformers repeats adapter_ids with the rows: 3 beams, 2 sequences back per row
        kwargs |= dict(num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        mixed = ours.generate(x, adapter_ids=torch.tensor(ids), **kwargs)
        by_peft = ref.generate(input_ids=x, adapter_names=["__base__" if k < 0 else names[k] for k in ids], **kwargs)
        rows = []
        for i, k in enumerate(ids):
            set_active_adapters(ours, [] if k < 0 else [names[k]])
            rows.append(ours.generate(x[i : i + 1], **kwargs))
        plain = base.generate(x, **kwargs)
    assert torch.equal(mixed.sequences, by_peft.sequences)
    assert torch.equal(mixed.sequences, torch.cat([r.sequences for r in rows]))
    per = len(mixed.sequences) // len(ids)
    if search == "greedy":
        scores = torch.stack(mixed.scores)  # (steps, rows, vocab)
        torch.testing.assert_close(scores, torch.cat([torch.stack(r.scores) for r in rows], 1), atol=ATOL, rtol=0)
        torch.testing.assert_close(scores, torch.stack(by_peft.scores), atol=ATOL, rtol=0)
        moved = (scores - torch.stack(plain.scores)).abs().amax((0, 2))
    else:
        torch.testing.assert_close(mixed.sequences_scores, torch.cat([r.sequences_scores for r in rows]), atol=ATOL, rtol=0)
        moved = (mixed.sequences_scores - plain.sequences_scores).abs().view(len(ids), per).amax(1)
    assert all((moved[i] > 100 * ATOL) == (k >= 0) for i, k in enumerate(ids)), moved


def test_with_adapter_drop():
    ours, _ = same_lora_adapters(tiny_llama(), LLAMA)
    names = list(LLAMA)
    enable_mixed(ours, names)
    x = token_ids(len(IDS), 6)
    set_drop(ours, 1)  # layer 0 runs no adapter, for any row
    with torch.no_grad():
        torch.testing.assert_close(ours(x, adapter_ids=torch.tensor(IDS)).logits, alone(ours, names, IDS, x), atol=ATOL, rtol=0)


def test_half_precision_base_and_stacks_follow_the_model():
    base = tiny_llama().to(torch.bfloat16)
    ours, _ = same_lora_adapters(base, LLAMA)  # adapters in fp32 over the bf16 base, as PEFT keeps them
    names = list(LLAMA)
    enable_mixed(ours, names)
    x = token_ids(len(IDS), 6)
    with torch.no_grad():
        mixed = ours(x, adapter_ids=torch.tensor(IDS)).logits
        assert mixed.dtype == torch.bfloat16
        torch.testing.assert_close(mixed.float(), alone(ours, names, IDS, x).float(), atol=0.05, rtol=0)
        assert ((mixed - base(x).logits).float().abs().amax((1, 2)) > 0.05).tolist() == [k >= 0 for k in IDS]
    ours.to(torch.float64)  # the stacks are (unsaved) buffers, so they follow the model
    stacks = [m.mixed for m in ours.modules() if isinstance(m, LoraLayer)]
    assert all(s.At is None or (s.At.dtype == s.Bt.dtype == torch.float64) for s in stacks)
    assert not any(".mixed." in k for k in ours.state_dict())


def test_calls_without_ids_are_unchanged_and_disable_undoes_everything():
    base = tiny_llama()
    ours, _ = same_lora_adapters(base, LLAMA)
    x = token_ids(3, 5)
    with torch.no_grad():
        before = ours(x).logits
        generated = ours.generate(x, max_new_tokens=3, do_sample=False)
        enable_mixed(ours, ["c", "a"])
        enable_mixed(ours, ["a", "c"])  # enabling again replaces the set
        assert mixed_adapters(ours) == ["a", "c"]
        torch.testing.assert_close(ours(x).logits, before, atol=0, rtol=0)
        assert torch.equal(ours.generate(x, max_new_tokens=3, do_sample=False), generated)
        disable_mixed(ours)
        assert mixed_adapters(ours) is None
        assert not ours._forward_pre_hooks and not ours._forward_hooks
        assert "prepare_inputs_for_generation" not in ours.__dict__
        assert all(m.mixed is None for m in ours.modules() if isinstance(m, LoraLayer))
        with pytest.raises(ValueError, match="adapter_ids"):  # transformers' own check: the argument is gone
            ours.generate(x, adapter_ids=torch.tensor([0, 1, 0]), max_new_tokens=2)
        disable_mixed(ours)  # a no-op when off
        torch.testing.assert_close(ours(x).logits, before, atol=0, rtol=0)


def plain_state(seed: int, **config) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A tiny-Llama LoRA adapter on q/v with random A and B."""
    config = LoraConfig(**({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]} | config))
    state = new_lora_state(tiny_llama(), config, seed=seed)
    return config, {k: torch.randn_like(v) if "lora_B" in k else v for k, v in state.items()}


def two_adapters(**b_config):
    model = tiny_llama()
    attach_lora(model, "a", *plain_state(0))
    attach_lora(model, "b", *plain_state(1, **b_config))
    return model


def dora():
    config, state = plain_state(1, use_dora=True)
    state |= {k.replace("lora_B.weight", "lora_magnitude_vector"): torch.rand(len(v)) + 0.5 for k, v in state.items() if k.endswith("lora_B.weight")}
    return config, state


def refusal(case: str):
    """(model, how to fail, message pattern) for one way of misusing mixed batches."""
    x = token_ids(2, 4)
    model = two_adapters()
    call = lambda ids: model(x, adapter_ids=ids)  # noqa: E731
    enable = lambda: enable_mixed(model, ["a", "b"])  # noqa: E731
    if case == "dora":
        model = tiny_llama()
        attach_lora(model, "a", *plain_state(0))
        attach_lora(model, "b", *dora())
        return lambda: enable_mixed(model, ["a", "b"]), "'b' is DoRA"
    if case == "merged":
        model.model.layers[0].self_attn.q_proj.merge()
        return enable, "merged"
    if case == "merged later":
        enable()
        model.model.layers[1].self_attn.v_proj.merge()
        return lambda: call(torch.tensor([0, 1])), "merged"
    if case == "fusion":
        attach_fusion(model, "f", FusionConfig(members=["a", "b"]))
        return enable, "fused"
    if case == "modules_to_save":
        state = {"lm_head.weight": model.lm_head.weight.detach().clone()}
        attach_lora(model, "head", LoraConfig(r=1, lora_alpha=1, modules_to_save=["lm_head"]), state)
        return lambda: enable_mixed(model, ["a", "head"]), "modules_to_save"
    if case == "saved copy active":  # another adapter's head copy would run for every row
        attach_lora(model, "head", LoraConfig(r=1, lora_alpha=1, modules_to_save=["lm_head"]), {"lm_head.weight": model.lm_head.weight.detach() + 1})
        enable()
        return lambda: call(torch.tensor([0, 1])), "'head' replaces a module"
    if case == "unknown name":
        return lambda: enable_mixed(model, ["a", "z"]), "distinct attached"
    if case == "repeated name":
        return lambda: enable_mixed(model, ["a", "a"]), "distinct attached"
    if case == "detached later":
        enable()
        detach_lora(model, "b")
        return lambda: call(torch.tensor([0, 0])), "enable_mixed again"
    if case == "training":
        enable()
        model.train()
        return lambda: call(torch.tensor([0, 1])), "model.eval"
    enable()
    ids = {"too few ids": [0], "too many ids": [0, 1, 1], "id too large": [0, 2], "id below -1": [-2, 0], "float ids": [0.0, 1.0], "2-D ids": [[0, 1]]}[case]
    return lambda: call(torch.tensor(ids)), {"id too large": r"\[-1, 1\]", "id below -1": r"\[-1, 1\]"}.get(case, "one id per batch row")


CASES = ["dora", "merged", "merged later", "fusion", "modules_to_save", "saved copy active", "unknown name", "repeated name", "detached later", "training",
         "too few ids", "too many ids", "id too large", "id below -1", "float ids", "2-D ids"]


@pytest.mark.parametrize("case", CASES)
def test_refusals_are_one_line_composition_errors(case):
    fail, pattern = refusal(case)
    with torch.no_grad(), pytest.raises(CompositionError, match=pattern) as error:
        fail()
    assert "\n" not in str(error.value)


def test_the_ids_are_cleared_after_each_call_even_a_failed_one():
    model = two_adapters()
    enable_mixed(model, ["a", "b"])
    x = token_ids(2, 4)
    with torch.no_grad():
        expected = model(x).logits
        model(x, adapter_ids=torch.tensor([1, 0]))
        torch.testing.assert_close(model(x).logits, expected, atol=0, rtol=0)
        with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
            model(x, adapter_ids=torch.tensor([1, 0]), inputs_embeds=torch.zeros(2, 4, 32))  # the model itself refuses both
        torch.testing.assert_close(model(x).logits, expected, atol=0, rtol=0)
