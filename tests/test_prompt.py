"""Prompt tuning and P-tuning in the engine (compose.prompt), against PEFT as the oracle.

Adapters are saved by PEFT (`save_pretrained`) and read back from the file, so the engine sees what a
user's adapter folder holds: the prompt itself (P-tuning: its encoder's output) and, for classifiers,
the trained head. Both the model PEFT loads from that folder and the live PEFT model (which runs the
MLP/LSTM encoder) must agree with the engine.

PEFT 0.21.2's `generate` is broken for prompt learning on transformers 5.24 (it looks for
`past_key_values`, which transformers renamed `cache`, so it re-injects the prompt at every step);
generation is checked against greedy decoding with PEFT's (correct) full forward instead.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import (
    VOCAB,
    engine_config,
    peft_model,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

from compose.errors import CompositionError
from compose.prompt.config import PromptConfig
from compose.prompt.model import attach_prompt, detach_prompt

FAMILIES = {"llama": (tiny_llama, "CAUSAL_LM"), "gpt2": (tiny_gpt2, "CAUSAL_LM"), "bert": (tiny_bert, "SEQ_CLS")}
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # PEFT warns that it ignores position_ids / token_type_ids, as intended
        warnings.simplefilter("ignore", UserWarning)
        yield


# ---- helpers (test_prefix.py uses them too) ----


def varied(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw the matrices with std 0.3: with transformers' 0.02 the random biases dominate and tiny GPT-2
    emits one token whatever it reads, so greedy generation could not tell a prompt's effect apart."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def save_peft(base: torch.nn.Module, config, out_dir: Path, seed: int = 0) -> torch.nn.Module:
    """PEFT's model for `config` on a copy of `base` (eval mode), saved to `out_dir`; a classifier head
    (modules_to_save) is perturbed so that loading it matters."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return model


def read_peft(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter_config.json, and the tensors keyed as the engine takes them (PEFT stores a prompt
    adapter's head as `base_model.<module>`)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    state = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    return config, {k.removeprefix("base_model."): v for k, v in state.items()}


def inputs(family: str, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    """Ids with a left-padded second row, token types, and labels fitting the family's head."""
    ids = token_ids(batch, length)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    types = torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(3))
    labels = ids.clone() if FAMILIES[family][1] == "CAUSAL_LM" else torch.tensor([0, 2])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def greedy(forward, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding without a cache: each step runs the whole sequence, with the position ids that
    transformers' generate derives from the mask. Returns the ids and each step's last-position logits."""
    scores = []
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = forward(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        scores.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
    return ids, scores


def assert_generate_matches(model, oracle, base, batch: dict[str, torch.Tensor], steps: int = 6) -> None:
    """`model.generate` (greedy) gives the oracle's tokens and step logits, with its cache and without, and
    tokens other than `base` alone gives."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model.generation_config.eos_token_id = None  # run every step on every row (the oracle has no stopping)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
        ref_ids, ref_scores = greedy(oracle, ids, mask, steps)
        uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, use_cache=False)
        plain = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    assert torch.equal(out.sequences, ref_ids)
    for got, ref in zip(out.logits, ref_scores):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    assert torch.equal(uncached, out.sequences)
    assert not torch.equal(out.sequences, plain)


def _attached(base, adapter_dir: Path) -> torch.nn.Module:
    """A copy of `base` with the PEFT prompt adapter saved in `adapter_dir` attached by the engine as "p"."""
    cfg, state = read_peft(adapter_dir)
    model = copy.deepcopy(base)
    attach_prompt(model, "p", engine_config(PromptConfig, cfg), state)
    return model


def word_tokenizer(out_dir: Path) -> Path:
    """A local word-level tokenizer over the tiny vocabulary ("w1" → id 1), for PEFT's TEXT init."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(out_dir)
    return out_dir


# ---- against PEFT ----

VARIANTS = ["prompt-random", "prompt-text", "ptuning-mlp", "ptuning-lstm"]


def peft_prompt_config(variant: str, task: str, tmp_path: Path, num_virtual_tokens: int = 5):
    if variant == "prompt-random":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens)
    if variant == "prompt-text":
        return peft.PromptTuningConfig(
            task_type=task, num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="TEXT",
            prompt_tuning_init_text="w5 w9 w3", tokenizer_name_or_path=str(word_tokenizer(tmp_path / "tok")),
        )
    kind = variant.split("-")[1].upper()
    return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=num_virtual_tokens, encoder_reparameterization_type=kind, encoder_hidden_size=24)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_peft(family, variant, tmp_path):
    make, task = FAMILIES[family]
    base = make()
    live = save_peft(base, peft_prompt_config(variant, task, tmp_path), tmp_path / "adapter")
    loaded = peft_model(base, tmp_path / "adapter")
    cfg, state = read_peft(tmp_path / "adapter")
    config = engine_config(PromptConfig, cfg, method="ptuning" if variant.startswith("ptuning") else "prompt")
    if variant == "prompt-text":  # the init reached the file: the text's embeddings, repeated to T
        torch.testing.assert_close(state["prompt_embeddings"], base.get_input_embeddings().weight[[5, 9, 3, 5, 9]])
    assert set(state) == ({"prompt_embeddings", "classifier.weight", "classifier.bias"} if task == "SEQ_CLS" else {"prompt_embeddings"})

    model = copy.deepcopy(base)
    attach_prompt(model, "p", config, state)
    batch = inputs(family)
    with torch.no_grad():
        got = model(**batch)
        for ref in (loaded(**batch), live(**batch)):
            torch.testing.assert_close(got.logits, ref.logits, atol=ATOL, rtol=0)
            torch.testing.assert_close(got.loss, ref.loss, atol=ATOL, rtol=0)
        plain = base(**batch).logits
    if task == "CAUSAL_LM":  # logits come with the virtual positions, as PEFT's
        assert got.logits.shape[1] == config.num_virtual_tokens + 7
        got = got.__class__(logits=got.logits[:, config.num_virtual_tokens:])
    assert not torch.allclose(got.logits, plain, atol=1e-3)


def test_positional_and_embeds_calls(tmp_path):
    base = tiny_llama()
    save_peft(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path)
    model = _attached(base, tmp_path)
    ids = token_ids()
    with torch.no_grad():
        ref = peft_model(base, tmp_path)(input_ids=ids).logits
        torch.testing.assert_close(model(ids).logits, ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(model(inputs_embeds=base.get_input_embeddings()(ids)).logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["prompt-random", "ptuning-mlp"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_matches_peft_forward(family, variant, tmp_path):
    base = varied(FAMILIES[family][0]())
    live = save_peft(base, peft_prompt_config(variant, "CAUSAL_LM", tmp_path, num_virtual_tokens=3), tmp_path / "adapter")
    assert_generate_matches(_attached(base, tmp_path / "adapter"), live, base, inputs(family))


# ---- stacking ----


def _single_peft_prompt(base, prompt: torch.Tensor, task: str, out_dir: Path) -> torch.nn.Module:
    """PEFT's model for one prompt adapter holding exactly `prompt`."""
    save_peft(base, peft.PromptTuningConfig(task_type=task, num_virtual_tokens=len(prompt)), out_dir)
    state = load_file(out_dir / "adapter_model.safetensors")
    save_file({**state, "prompt_embeddings": prompt.contiguous()}, out_dir / "adapter_model.safetensors")
    return peft_model(base, out_dir)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_stacked_prompts_concatenate(family, tmp_path):
    make, task = FAMILIES[family]
    base = make()
    states = []
    for i, T in enumerate((2, 3)):
        save_peft(base, peft.PromptTuningConfig(task_type=task, num_virtual_tokens=T), tmp_path / f"a{i}", seed=i)
        states.append(read_peft(tmp_path / f"a{i}"))
    model = copy.deepcopy(base)
    for i, (cfg, state) in enumerate(states):
        heads = {} if i else {k: v for k, v in state.items() if k.startswith("classifier")}  # one head for the stack
        attach_prompt(model, f"p{i}", engine_config(PromptConfig, cfg), {"prompt_embeddings": state["prompt_embeddings"], **heads})
    both = torch.cat([s["prompt_embeddings"] for _, s in states])
    oracle = _single_peft_prompt(base, both, task, tmp_path / "both")
    if task == "SEQ_CLS":  # the stack's head is p0's
        with torch.no_grad():
            oracle.classifier.modules_to_save["default"].weight.copy_(states[0][1]["classifier.weight"])
            oracle.classifier.modules_to_save["default"].bias.copy_(states[0][1]["classifier.bias"])
    batch = inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, oracle(**batch).logits, atol=ATOL, rtol=0)
        detach_prompt(model, "p0")  # the second alone remains (with the base head)
        oracle = _single_peft_prompt(base, states[1][1]["prompt_embeddings"], task, tmp_path / "second")
        if task == "SEQ_CLS":
            oracle.classifier.modules_to_save["default"].weight.copy_(base.classifier.weight)
            oracle.classifier.modules_to_save["default"].bias.copy_(base.classifier.bias)
        torch.testing.assert_close(model(**batch).logits, oracle(**batch).logits, atol=ATOL, rtol=0)


# ---- detach ----


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_the_model(family, tmp_path):
    make, task = FAMILIES[family]
    base = make()
    save_peft(base, peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3), tmp_path)
    cfg, state = read_peft(tmp_path)
    model = copy.deepcopy(base)
    children = dict(model.named_children())
    batch = inputs(family)
    with torch.no_grad():
        before = model(**batch).logits
        attach_prompt(model, "a", engine_config(PromptConfig, cfg), state)
        attach_prompt(model, "b", engine_config(PromptConfig, cfg), {"prompt_embeddings": state["prompt_embeddings"]})
        assert not torch.equal(model(**batch).logits[:, -before.shape[1]:], before)
        assert detach_prompt(model) is model
        assert torch.equal(model(**batch).logits, before)
    assert not model._forward_pre_hooks and not hasattr(model, "_compose_prompt")
    assert dict(model.named_children()) == children  # the classifier copy is gone, the original back
    assert model.state_dict().keys() == base.state_dict().keys()


# ---- errors ----


def _attached_llama(tmp_path):
    base = tiny_llama()
    save_peft(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path)
    return _attached(base, tmp_path), read_peft(tmp_path)[1]


@pytest.mark.parametrize(
    "config, state, match",
    [
        ({"num_virtual_tokens": 3, "token_dim": 32}, {"prompt": torch.zeros(3, 32)}, "no 'prompt_embeddings'"),
        ({"num_virtual_tokens": 4, "token_dim": 32}, {"prompt_embeddings": torch.zeros(3, 32)}, r"shape \(3, 32\), expected .* \(4, 32\)"),
        ({"num_virtual_tokens": 3, "token_dim": 32}, {"prompt_embeddings": torch.zeros(3, 32, 1)}, "expected 2 dimensions"),
        ({"num_virtual_tokens": 3, "token_dim": 24}, {"prompt_embeddings": torch.zeros(3, 24)}, "token_dim 24 but attached prompt 'p' has 32"),
        ({"num_virtual_tokens": 3, "token_dim": 32, "num_transformer_submodules": 2}, {"prompt_embeddings": torch.zeros(6, 32)}, "encoder-decoder"),
        ({"num_virtual_tokens": 3, "token_dim": 32}, {"prompt_embeddings": torch.zeros(3, 32), "classifier.weight": torch.zeros(3, 32)}, "classifier"),
    ],
)
def test_bad_adapters_are_refused_untouched(config, state, match, tmp_path):
    model, _ = _attached_llama(tmp_path)
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(CompositionError, match=match) as err:
            attach_prompt(model, "q", PromptConfig(**config), state)
        assert "\n" not in str(err.value)
        assert torch.equal(model(ids).logits, before)
    assert list(model._compose_prompt["prompts"]) == ["p"] and len(model._forward_pre_hooks) == 1


def test_wrong_model_width_and_names(tmp_path):
    model, state = _attached_llama(tmp_path)
    with pytest.raises(CompositionError, match="token_dim 24 but LlamaForCausalLM's input embeddings are 32 wide"):
        attach_prompt(tiny_llama(), "q", PromptConfig(num_virtual_tokens=3, token_dim=24), {"prompt_embeddings": torch.zeros(3, 24)})
    with pytest.raises(CompositionError, match="'p' is already attached"):
        attach_prompt(model, "p", PromptConfig(num_virtual_tokens=3, token_dim=32), state)
    with pytest.raises(CompositionError, match="'x' is not attached; attached prompts: \\['p'\\]"):
        detach_prompt(model, "x")
    assert detach_prompt(tiny_llama()) is not None  # nothing attached: nothing to do
