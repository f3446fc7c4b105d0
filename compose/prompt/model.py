"""Attach soft prompts (prompt tuning, P-tuning) to a transformers model, and take them off again.

No wrapper: a forward pre-hook on the model the user calls turns `input_ids` into embeddings and
prepends the prompts [P₁; P₂; …; E(x)] (attached adapters concatenate, in attach order), exactly as
PEFT's `PeftModel.forward` does:

- `attention_mask` gets T ones in front; `position_ids` are dropped (the model counts positions over
  the virtual tokens too);
- a causal LM (one that can `generate`) gets `labels` with T × -100 in front and loses `token_type_ids`;
  other models (classifiers) get `token_type_ids` with T zeros in front;
- the output has the T virtual positions too (logits of shape (B, T + L, V) for a causal LM).

The prompt goes in on the first call of a sequence only (no cache, or an empty one); a call that
continues a cache (`generate`'s later steps) just extends the mask, since the cache already holds the
prompt's keys and values. The model remembers its prompts in `model._compose_prompt`.

A PEFT classifier adapter also saves the trained head (`classifier.weight`, ...: PEFT's
`modules_to_save`); its copy (`compose.heads`) runs while the prompt is attached.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from compose.devices import execution_device
from compose.errors import CompositionError
from compose.heads import attach_heads, detach_heads, prepare_heads
from compose.prompt.config import PromptConfig

PROMPT_KEY = "prompt_embeddings"


def attach_prompt(model: nn.Module, name: str, config: PromptConfig, state: dict[str, torch.Tensor]) -> None:
    """
    Attach soft prompt `name` to `model` in place, active at once after the prompts already attached.

    Args:
        model (`nn.Module`):
            a transformers model (`XForCausalLM`, `XForSequenceClassification`, `XModel`, ...): the module whose
            forward the user calls. `model.generate` works too.
        name (`str`):
            the adapter's name, unique among the model's prompts.
        config ([`PromptConfig`]):
            its `num_virtual_tokens` T and `token_dim` D.
        state (`dict[str, torch.Tensor]`):
            `{"prompt_embeddings": (T, D)}` as PEFT saves it (for P-tuning, the encoder's output), plus the full
            tensors of a trained head if the adapter has one (`classifier.weight`, keyed relative to the model).

    Raises:
        [`CompositionError`]: `name` is taken; the tensor is missing or its shape disagrees with the config, with
            the prompts already attached or with the model's embedding width; prefix adapters are attached.
    """
    attached = check_attachable(model, name, "prompt")
    if config.num_transformer_submodules != 1:
        raise CompositionError(f"prompt '{name}' has num_transformer_submodules={config.num_transformer_submodules} (an encoder-decoder prompt); only decoder-only and encoder-only models are supported")
    prompt, heads = split_state(name, state)
    expected = (config.num_virtual_tokens, config.token_dim)
    if tuple(prompt.shape) != expected:
        raise CompositionError(f"prompt '{name}': {PROMPT_KEY} has shape {tuple(prompt.shape)}, expected (num_virtual_tokens, token_dim) = {expected}; fix the adapter config")
    for other, p in attached.items():
        if p.shape[1] != config.token_dim:
            raise CompositionError(f"prompt '{name}' has token_dim {config.token_dim} but attached prompt '{other}' has {p.shape[1]}; stacked prompts must share a width")
    embeddings = model.get_input_embeddings()
    if embeddings.embedding_dim != config.token_dim:
        raise CompositionError(f"prompt '{name}' has token_dim {config.token_dim} but {type(model).__name__}'s input embeddings are {embeddings.embedding_dim} wide; the adapter was trained for a different model")
    registry = install_registry(model, name, "prompt", heads, _prepend_prompt)
    registry["prompts"][name] = prompt.detach().to(execution_device(embeddings))
    _concatenate(registry)


def detach_prompt(model: nn.Module, name: str | None = None) -> nn.Module:
    """
    Take prompt `name` (None: all prompts) off `model` and return it; with none left the hook goes and the
    model is exactly as before.

    Raises:
        [`CompositionError`]: `name` is not attached.
    """
    return detach_adapters(model, name, "prompt", _concatenate)


def _concatenate(registry: dict) -> None:
    """The stack's prompt: every attached prompt along the token axis, in attach order."""
    registry["prompt"] = torch.cat(list(registry["prompts"].values()))


def _prepend_prompt(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The forward pre-hook: [P; E(x)] on a sequence's first call, the mask extended on every call."""
    registry = model._compose_prompt
    kwargs = call_kwargs(model, args, kwargs)
    prompt = registry["prompt"]
    n = prompt.shape[0]
    cache = get_cache(kwargs, registry["cache"])
    ids = kwargs.get("input_ids")
    batch = (ids if ids is not None else kwargs["inputs_embeds"]).shape[0]
    if cache is None or cache.get_seq_length() == 0:
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        kwargs.pop("input_ids", None)
        kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds).expand(batch, -1, -1), embeds], dim=1)
        if registry["causal"] and kwargs.get("labels") is not None:
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        if not registry["causal"] and kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
    kwargs.pop("position_ids", None)  # PEFT ignores them: positions run over the virtual tokens as well
    if registry["causal"]:
        kwargs.pop("token_type_ids", None)  # PEFT's causal-LM model drops them
    extend_mask(kwargs, batch, n)
    return (), kwargs


# Shared with compose.prefix: one prompt-learning method at a time, its adapters kept by name in
# `model._compose_<method>` with the forward pre-hook that runs them; how the hooks read and rewrite a call.

_PLURAL = {"prompt": "prompts", "prefix": "prefixes"}


def check_attachable(model: nn.Module, name: str, method: str) -> dict:
    """The `method` ("prompt" or "prefix") adapters attached to `model` by name (empty if none), after refusing
    `name` if one of them has it or if adapters of the other method are attached."""
    other = "prefix" if method == "prompt" else "prompt"
    registry = getattr(model, f"_compose_{method}", None)
    attached = registry[_PLURAL[method]] if registry is not None else {}
    if name in attached:
        raise CompositionError(f"{method} '{name}' is already attached; detach_{method}(model, '{name}') first or choose another name")
    if getattr(model, f"_compose_{other}", None) is not None:
        raise CompositionError(f"cannot attach {method} '{name}' while {other} adapters are attached (one prompt-learning method at a time, as in PEFT); detach_{other} first")
    return attached


def install_registry(model: nn.Module, name: str, method: str, heads: dict[str, torch.Tensor], hook: Callable) -> dict:
    """Put adapter `name`'s trained heads on `model` and return its registry of `method` adapters, made (with the
    forward pre-hook `hook`) on the first attach. Refuses a model without a KV cache, or bad heads, untouched."""
    kwarg = cache_kwarg(model)
    attach_heads(model, name, method, prepare_heads(model, name, method, heads))
    registry = getattr(model, f"_compose_{method}", None)
    if registry is None:
        registry = {_PLURAL[method]: {}, "cache": kwarg, "causal": is_causal_lm(model)}
        registry["hook"] = model.register_forward_pre_hook(hook, with_kwargs=True)
        setattr(model, f"_compose_{method}", registry)
    return registry


def detach_adapters(model: nn.Module, name: str | None, method: str, restack: Callable[[dict], None]) -> nn.Module:
    """Take `method` adapter `name` (None: all) off `model`; `restack(registry)` rebuilds what the hook runs from
    the ones left. With none left the hook and the registry go."""
    plural = _PLURAL[method]
    registry = getattr(model, f"_compose_{method}", None)
    attached = list(registry[plural]) if registry is not None else []
    if name is not None and name not in attached:
        raise CompositionError(f"{method} '{name}' is not attached; attached {plural}: {attached}")
    names = attached if name is None else [name]
    for n in names:
        del registry[plural][n]
    detach_heads(model, names, method)
    if attached and not registry[plural]:
        registry["hook"].remove()
        delattr(model, f"_compose_{method}")
    elif attached:
        restack(registry)
    return model


def split_state(name: str, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(prompt_embeddings, the other tensors: a trained head's) of a prompt-learning adapter's state."""
    if PROMPT_KEY not in state:
        raise CompositionError(f"adapter '{name}' has no '{PROMPT_KEY}' tensor (found {sorted(state)[:4]}); is it a prompt-learning adapter?")
    if state[PROMPT_KEY].dim() != 2:
        raise CompositionError(f"adapter '{name}': {PROMPT_KEY} has shape {tuple(state[PROMPT_KEY].shape)}, expected 2 dimensions (num_virtual_tokens, width)")
    return state[PROMPT_KEY], {k: v for k, v in state.items() if k != PROMPT_KEY}


def cache_kwarg(model: nn.Module) -> str:
    """The name under which `model` takes its KV cache: `cache` (transformers ≥ 5.2x) or `past_key_values`.

    A head model that only forwards `**kwargs` (e.g. `BertForSequenceClassification`) is read through its
    `base_model`.
    """
    for module in (model, getattr(model, "base_model", model)):
        params = inspect.signature(module.forward).parameters
        for kwarg in ("cache", "past_key_values"):
            if kwarg in params:
                return kwarg
    raise CompositionError(f"{type(model).__name__}.forward takes no KV cache (cache / past_key_values); prompt learning needs a transformers attention model")


def get_cache(kwargs: dict, kwarg: str):
    """The cache passed in `kwargs`, under the model's name for it or the deprecated `past_key_values`
    (moved to the model's name), or None."""
    if kwargs.get(kwarg) is None and kwargs.get("past_key_values") is not None:
        kwargs[kwarg] = kwargs.pop("past_key_values")
    return kwargs.get(kwarg)


def call_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """All arguments of a `model(...)` call as keywords (positional ones named by the forward's signature)."""
    if not args:
        return dict(kwargs)
    names = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {**dict(zip(names, args)), **kwargs}


def extend_mask(kwargs: dict, batch: int, n: int) -> None:
    """Prepend n ones (the virtual tokens are always visible) to a 2-D `attention_mask`."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    if mask.dim() != 2:
        raise CompositionError(f"prompt learning needs a 2-D attention_mask (batch, length), got shape {tuple(mask.shape)}; pass the padding mask, not a prepared 4-D one (e.g. no static cache)")
    kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` is a generative LM (PEFT's CAUSAL_LM task): it can `generate`."""
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate and can_generate())
