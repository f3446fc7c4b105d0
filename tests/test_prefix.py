"""Prefix tuning / P-tuning v2 in the engine (compose.prefix), against PEFT and against the math.

Adapters are saved by PEFT and read back from the file (with prefix_projection the file holds the
MLP's output, which is all the engine needs). PEFT 0.21.2 cannot run a prefix on BERT with
transformers 5.24 (it looks for a `past_key_values` argument, which BERT renamed `cache`), and its
`generate` ignores the prefix there; those are checked against explicit cache forwards and greedy
decoding with PEFT's full forward instead.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from test_prompt import (
    ATOL,
    FAMILIES,
    assert_generate_matches,
    inputs,
    read_peft,
    save_peft,
    varied,
)
from tiny import engine_config, peft_model, tiny_bert, tiny_llama, token_ids
from transformers import DynamicCache

from compose.errors import CompositionError
from compose.prefix.config import PrefixConfig
from compose.prefix.model import attach_prefix, detach_prefix, prefix_key_values
from compose.prompt.config import PromptConfig
from compose.prompt.model import attach_prompt


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _attached(base, adapter_dir, name: str = "p", **overrides):
    cfg, state = read_peft(adapter_dir)
    model = copy.deepcopy(base)
    attach_prefix(model, name, engine_config(PrefixConfig, cfg, **overrides), state)
    return model


def _manual(base, state: dict, config: PrefixConfig, batch: dict, positions: torch.Tensor) -> torch.Tensor:
    """The prefix written out: an explicit cache of the per-layer keys/values, the mask extended by T ones,
    explicit position ids, and the adapter's head (if it has one) on a copy of the base."""
    model = copy.deepcopy(base)
    if "classifier.weight" in state:
        model.classifier.load_state_dict({"weight": state["classifier.weight"], "bias": state["classifier.bias"]})
    B = batch["input_ids"].shape[0]
    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix_key_values(config, state)):
        cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), i)
    mask = torch.cat([torch.ones(B, config.num_virtual_tokens, dtype=torch.long), batch["attention_mask"]], dim=1)
    return model(**{**batch, "attention_mask": mask, "position_ids": positions, "cache": cache}).logits


# ---- against PEFT ----


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_peft(family, projection, tmp_path):
    base = FAMILIES[family][0]()
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=24)
    live = save_peft(base, config, tmp_path)
    loaded = peft_model(base, tmp_path)
    model = _attached(base, tmp_path)
    batch = inputs(family)
    explicit = {**batch, "position_ids": torch.arange(7).expand(2, -1)}  # PEFT shifts given positions by T
    with torch.no_grad():
        for b in (batch, explicit):
            got = model(**b)
            for ref in (loaded(**b), live(**b)):
                torch.testing.assert_close(got.logits, ref.logits, atol=ATOL, rtol=0)
                torch.testing.assert_close(got.loss, ref.loss, atol=ATOL, rtol=0)
        assert got.logits.shape[1] == 7  # the real positions only
        assert not torch.allclose(got.logits, base(**batch).logits, atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_key_values_match_peft_get_prompt(family, tmp_path):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=24)
    live = save_peft(FAMILIES[family][0](), config, tmp_path)
    cfg, state = read_peft(tmp_path)
    ours = prefix_key_values(engine_config(PrefixConfig, cfg), state)
    theirs = live.get_prompt(batch_size=1)  # runs the projection MLP
    assert len(ours) == len(theirs.layers) == 2
    for (k, v), layer in zip(ours, theirs.layers):
        assert k.shape == (1, cfg["num_attention_heads"], 3, cfg["token_dim"] // cfg["num_attention_heads"])
        torch.testing.assert_close(k, layer.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(v, layer.values, atol=ATOL, rtol=0)
    if family == "llama":  # GQA: PEFT stores the 2 KV heads of 8, not the 4 query heads
        assert (cfg["num_attention_heads"], cfg["token_dim"]) == (2, 16)


# ---- against the math ----


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_prefix_is_a_cache(family):
    """A prefix holding the base's own keys/values for tokens x makes model(y) the base's model([x; y])
    at y's positions: exact, and independent of PEFT."""
    base = FAMILIES[family][0]()
    x, y = token_ids(1, 4, seed=5), token_ids(2, 6, seed=6)
    with torch.no_grad():
        cache = base(x, use_cache=True).cache
        kv = torch.stack([t[0] for layer in cache.layers for t in (layer.keys, layer.values)])  # (2L, H, T, hd)
        heads, _, head_dim = kv.shape[1:]
        state = {"prompt_embeddings": kv.permute(2, 0, 1, 3).reshape(4, -1)}
        config = PrefixConfig(num_virtual_tokens=4, num_layers=2, token_dim=heads * head_dim, num_attention_heads=heads)
        model = copy.deepcopy(base)
        attach_prefix(model, "x", config, state)
        torch.testing.assert_close(model(y).logits, base(torch.cat([x.expand(2, -1), y], dim=1)).logits[:, 4:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_position_offset_against_explicit_cache(family, tmp_path):
    """Both offsets equal a forward with an explicit cache and explicit positions (T.. or 0..); they differ."""
    base = FAMILIES[family][0]()
    save_peft(base, peft.PrefixTuningConfig(task_type=FAMILIES[family][1], num_virtual_tokens=3), tmp_path)
    cfg, state = read_peft(tmp_path)
    batch = inputs(family)
    if FAMILIES[family][1] == "CAUSAL_LM":
        del batch["token_type_ids"]  # a causal LM's hook drops them (as PEFT does); the manual forward must not get them
    outs = {}
    with torch.no_grad():
        for offset, start in ((True, 3), (False, 0)):
            config = engine_config(PrefixConfig, cfg, position_offset=offset)
            model = copy.deepcopy(base)
            attach_prefix(model, "p", config, state)
            outs[offset] = model(**batch).logits
            manual = _manual(base, state, config, batch, torch.arange(start, start + 7).unsqueeze(0))
            torch.testing.assert_close(outs[offset], manual, atol=ATOL, rtol=0)
    assert not torch.allclose(outs[True], outs[False], atol=1e-3)


def test_bert_prefix_peft_fails_on_this_transformers(tmp_path):
    """Why BERT is checked against the math: if PEFT starts to run it, compare with PEFT here too."""
    base = tiny_bert()
    live = save_peft(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3), tmp_path)
    with pytest.raises(ValueError, match="does not support past key values"):
        live(**inputs("bert"))
    state = read_peft(tmp_path)[1]
    assert {"classifier.weight", "classifier.bias"} < set(state)  # the head comes with the file and is used
    model = _attached(base, tmp_path)
    with torch.no_grad():
        plain = copy.deepcopy(base)
        plain.classifier.load_state_dict({"weight": state["classifier.weight"], "bias": state["classifier.bias"]})
        assert not torch.allclose(model(**inputs("bert")).logits, plain(**inputs("bert")).logits, atol=1e-3)


# ---- generate ----


@pytest.mark.parametrize("offset", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate(family, offset, tmp_path):
    """Cached greedy generation equals full forwards step by step: PEFT's for PEFT's offset, the engine's
    (checked against the math above) for AdapterHub's."""
    base = varied(FAMILIES[family][0]())
    live = save_peft(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), tmp_path)
    model = _attached(base, tmp_path, position_offset=offset)
    oracle = live if offset else _attached(base, tmp_path, position_offset=False)
    assert_generate_matches(model, oracle, base, inputs(family))


# ---- stacking, detach ----


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stacked_prefixes_concatenate(family, tmp_path):
    base = FAMILIES[family][0]()
    for i, T in enumerate((2, 3)):
        save_peft(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=T), tmp_path / f"a{i}", seed=i)
    model = _attached(base, tmp_path / "a0", "a0")
    cfg, state = read_peft(tmp_path / "a1")
    attach_prefix(model, "a1", engine_config(PrefixConfig, cfg), state)
    save_peft(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), tmp_path / "both")
    both = torch.cat([read_peft(tmp_path / f"a{i}")[1]["prompt_embeddings"] for i in (0, 1)])
    save_file({"prompt_embeddings": both}, tmp_path / "both" / "adapter_model.safetensors")
    batch = inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, peft_model(base, tmp_path / "both")(**batch).logits, atol=ATOL, rtol=0)
        detach_prefix(model, "a0")
        torch.testing.assert_close(model(**batch).logits, peft_model(base, tmp_path / "a1")(**batch).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_the_model(family, tmp_path):
    base = FAMILIES[family][0]()
    save_peft(base, peft.PrefixTuningConfig(task_type=FAMILIES[family][1], num_virtual_tokens=3), tmp_path)
    model = copy.deepcopy(base)
    children = dict(model.named_children())
    batch = inputs(family)
    with torch.no_grad():
        before = model(**batch).logits
        cfg, state = read_peft(tmp_path)
        attach_prefix(model, "a", engine_config(PrefixConfig, cfg), state)
        attach_prefix(model, "b", engine_config(PrefixConfig, cfg), {"prompt_embeddings": state["prompt_embeddings"]})
        assert not torch.allclose(model(**batch).logits, before, atol=1e-3)
        assert detach_prefix(model) is model
        assert torch.equal(model(**batch).logits, before)
    assert not model._forward_pre_hooks and not hasattr(model, "_compose_prefix")
    assert dict(model.named_children()) == children


# ---- errors ----


def _llama_prefix(T: int = 3, layers: int = 2, heads: int = 2, token_dim: int = 16, **kw):
    config = PrefixConfig(num_virtual_tokens=T, num_layers=layers, num_attention_heads=heads, token_dim=token_dim, **kw)
    return config, {"prompt_embeddings": torch.randn(T, layers * 2 * token_dim)}


@pytest.mark.parametrize(
    "stacked, make, match",
    [
        (True, lambda: (_llama_prefix()[0], {"x": torch.zeros(3, 64)}), "no 'prompt_embeddings'"),
        (True, lambda: (_llama_prefix()[0], {"prompt_embeddings": torch.zeros(2, 64)}), r"shape \(2, 64\), expected .* \(3, 64\)"),
        (False, lambda: _llama_prefix(layers=1), r"\(num_layers, num_attention_heads, head_dim\) = \(1, 2, 8\) but LlamaForCausalLM has \(2, 2, 8\)"),
        (False, lambda: _llama_prefix(heads=4, token_dim=32), r"= \(2, 4, 8\) but LlamaForCausalLM has \(2, 2, 8\) \(KV heads under GQA\)"),
        (True, lambda: _llama_prefix(position_offset=False), "prefix 'q' has layout .* but attached prefix 'p' has"),
        (True, lambda: _llama_prefix(), "'p' is already attached"),
        (True, lambda: (_llama_prefix()[0], {**_llama_prefix()[1], "score.weight": torch.zeros(3, 32)}), "score"),
    ],
)
def test_bad_adapters_are_refused_untouched(stacked, make, match):
    model = tiny_llama()
    if stacked:
        attach_prefix(model, "p", *_llama_prefix())
    config, state = make()
    ids = token_ids()
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(CompositionError, match=match) as err:
            attach_prefix(model, "p" if "already" in match else "q", config, state)
        assert "\n" not in str(err.value)
        assert torch.equal(model(ids).logits, before)
    assert list(getattr(model, "_compose_prefix", {"prefixes": {}})["prefixes"]) == (["p"] if stacked else [])
    assert len(model._forward_pre_hooks) == stacked


def test_prompt_and_prefix_do_not_mix():
    model = tiny_llama()
    attach_prefix(model, "p", *_llama_prefix())
    with pytest.raises(CompositionError, match="while prefix adapters are attached"):
        attach_prompt(model, "q", PromptConfig(num_virtual_tokens=2, token_dim=32), {"prompt_embeddings": torch.zeros(2, 32)})
    detach_prefix(model)
    attach_prompt(model, "q", PromptConfig(num_virtual_tokens=2, token_dim=32), {"prompt_embeddings": torch.zeros(2, 32)})
    with pytest.raises(CompositionError, match="while prompt adapters are attached"):
        attach_prefix(model, "p", *_llama_prefix())
    with pytest.raises(CompositionError, match="'x' is not attached"):
        detach_prefix(model, "x")


def test_config_checks_heads_divide_token_dim():
    with pytest.raises(ValidationError, match="not a multiple"):
        PrefixConfig(num_virtual_tokens=2, num_layers=2, token_dim=10, num_attention_heads=4)
