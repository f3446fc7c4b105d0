"""`modules_to_save` copies (a trained classifier head saved with an adapter) through `compose.heads`, for every
method: one copy runs per module, conflicts between methods are refused in one line, detaching restores the
original module object, and a prompt's or prefix's head is no LoRA adapter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compose import methods
from compose.errors import CompositionError
from compose.heads import SavedModule
from compose.ia3.config import IA3Config
from compose.ia3.model import attach_ia3, detach_ia3
from compose.lora.config import LoraConfig
from compose.lora.model import attach_lora, attached_adapters, detach_lora, set_active_adapters
from compose.prefix.config import PrefixConfig
from compose.prompt.config import PromptConfig
from compose.prompt.model import attach_prompt, detach_prompt
from tests.tiny import tiny_bert, token_ids

LABEL = {"lora": "LoRA", "ia3": "IA3", "prompt": "prompt", "prefix": "prefix"}  # as messages name the methods


def head(seed: int) -> dict[str, torch.Tensor]:
    """A trained classifier for `tiny_bert` (hidden 32, 3 labels), keyed as the adapter file has it."""
    g = torch.Generator().manual_seed(seed)
    return {"classifier.weight": torch.randn(3, 32, generator=g), "classifier.bias": torch.randn(3, generator=g)}


def adapter(method: str, seed: int):
    """(config, state) of a small adapter of `method` for `tiny_bert` that also carries its own head."""
    g = torch.Generator().manual_seed(seed + 100)
    if method == "lora":
        key = "bert.encoder.layer.0.attention.self.query"
        lora = {f"{key}.lora_A.weight": torch.randn(2, 32, generator=g), f"{key}.lora_B.weight": torch.randn(32, 2, generator=g)}
        return LoraConfig(r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"]), {**lora, **head(seed)}
    if method == "ia3":
        vector = {"bert.encoder.layer.0.attention.self.key.ia3_l": 0.5 + torch.rand(32, 1, generator=g)}
        return IA3Config(target_modules=["key"], modules_to_save=["classifier"]), {**vector, **head(seed)}
    if method == "prompt":
        return PromptConfig(num_virtual_tokens=2, token_dim=32), {"prompt_embeddings": torch.randn(2, 32, generator=g), **head(seed)}
    return PrefixConfig(num_virtual_tokens=2, num_layers=1, token_dim=32, num_attention_heads=2), {"prompt_embeddings": torch.randn(2, 64, generator=g), **head(seed)}


def runs_head(model, seed: int | None) -> bool:
    """Whether `model.classifier` computes `head(seed)` (None: the original classifier of `tiny_bert()`)."""
    w, b = head(seed).values() if seed is not None else tiny_bert().classifier.parameters()
    x = torch.randn(4, 32)
    with torch.no_grad():
        return torch.allclose(model.classifier(x), F.linear(x, w, b), atol=1e-6)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_ids()).logits


PAIRS = [(a, b) for a in LABEL for b in LABEL if {a, b} != {"prompt", "prefix"}]  # prompt and prefix refuse each other anyway


@pytest.mark.parametrize("first, second", PAIRS)
def test_two_active_heads_on_one_module_are_refused_whatever_the_methods(first, second):
    model = tiny_bert()
    methods.attach(model, "a", *adapter(first, 1))
    before, wrapper = logits(model), model.classifier
    with pytest.raises(CompositionError) as err:
        methods.attach(model, "b", *adapter(second, 2))
    message = str(err.value)
    assert "\n" not in message
    assert f"module 'classifier' (modules_to_save) is already replaced by {LABEL[first]} adapter 'a', so {LABEL[second]} adapter 'b' cannot replace it too" in message
    assert methods.attached(model) == {"a": first} and model.classifier is wrapper and runs_head(model, 1)
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)  # refused before anything changed


@pytest.mark.parametrize("method", LABEL)
def test_detach_restores_the_original_module(method):
    model = tiny_bert()
    original, keys, before = model.classifier, model.state_dict().keys(), logits(model)
    methods.attach(model, "a", *adapter(method, 1))
    assert isinstance(model.classifier, SavedModule) and model.classifier.active == "a" and runs_head(model, 1)
    assert model.classifier.out_features == 3  # look-ups reach the running copy
    methods.detach(model, "a")
    assert model.classifier is original and model.state_dict().keys() == keys
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_an_inactive_lora_head_waits_for_another_methods_head():
    model = tiny_bert()
    original = model.classifier
    attach_lora(model, "a", *adapter("lora", 1))
    set_active_adapters(model, [])
    assert runs_head(model, None)
    attach_ia3(model, "b", *adapter("ia3", 2))  # a's copy does not run, so b's may
    assert runs_head(model, 2)
    with pytest.raises(CompositionError, match=r"^LoRA adapter 'a' and IA3 adapter 'b' each replace module 'classifier' \(modules_to_save\); leave \['a'\] out") as err:
        set_active_adapters(model, ["a"])
    assert "\n" not in str(err.value) and runs_head(model, 2)
    assert model.bert.encoder.layer[0].attention.self.query.active == ()  # nothing switched
    detach_ia3(model, "b")
    assert runs_head(model, None)
    set_active_adapters(model, ["a"])
    assert runs_head(model, 1)
    detach_lora(model)
    assert model.classifier is original


def test_a_prompt_head_is_not_a_lora_adapter():
    model = tiny_bert()
    attach_prompt(model, "p", *adapter("prompt", 1))
    assert attached_adapters(model) == [] and model.classifier.methods == {"p": "prompt"}
    set_active_adapters(model, [])  # LoRA's active list does not switch the prompt's head
    assert runs_head(model, 1)
    detach_prompt(model)
    assert runs_head(model, None) and not isinstance(model.classifier, SavedModule)


def test_detach_takes_only_its_own_methods_copies():
    """Without compose.methods two methods may use one name: each detaches its own copy only."""
    model = tiny_bert()
    attach_prompt(model, "x", *adapter("prompt", 1))
    attach_lora(model, "x", LoraConfig(r=2, lora_alpha=4), {k: v for k, v in adapter("lora", 2)[1].items() if "lora_" in k})
    detach_lora(model, "x")
    assert runs_head(model, 1)
    with pytest.raises(CompositionError, match=r"module 'classifier' \(modules_to_save\) already holds a copy of prompt adapter 'x'"):
        attach_ia3(model, "x", *adapter("ia3", 3))
    assert runs_head(model, 1)


def test_lora_head_over_a_module_another_adapter_wraps_is_refused_clearly():
    model = tiny_bert()
    attach_ia3(model, "a", IA3Config(target_modules=["classifier"]), {"classifier.ia3_l": torch.ones(3, 1)})
    with pytest.raises(CompositionError, match=r"^module 'classifier' is wrapped by IA3Layer \(another adapter adapts it\) and cannot also be replaced"):
        attach_lora(model, "b", *adapter("lora", 2))
    assert attached_adapters(model) == []
