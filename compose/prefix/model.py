"""Attach prefixes (prefix tuning / P-tuning v2) to a transformers model, and take them off again.

No wrapper: a forward pre-hook on the model the user calls hands it a KV cache that already holds
every layer's T virtual keys and values (attached prefixes concatenate, in attach order), as PEFT's
`get_prompt` does. Attention then runs over [prefix; tokens]:

- `attention_mask` gets T ones in front, on every call (the cache keeps the prefix);
- positions: with `position_offset=True` (PEFT) the real tokens continue after the prefix (given
  `position_ids` get +T, missing ones are counted from the cache as transformers does); with False
  (AdapterHub) they start at 0 (given `position_ids` are kept, missing ones are passed explicitly);
- a causal LM (one that can `generate`) loses `token_type_ids`, as in PEFT; outputs have the real
  positions only.

The prefix goes in on a sequence's first call (no cache, or an empty one, which is filled in place;
with `use_cache=False` every call is a first call); calls that continue a cache (`generate`'s later
steps) find it there. The model remembers its prefixes
in `model._compose_prefix`. A trained head saved with the adapter (PEFT's modules_to_save) runs while
the prefix is attached (`compose.heads`).
"""

from __future__ import annotations

import torch
from torch import nn

from compose.devices import execution_device
from compose.errors import CompositionError
from compose.prefix.config import PrefixConfig
from compose.prompt.model import (
    PROMPT_KEY,
    call_kwargs,
    check_attachable,
    detach_adapters,
    extend_mask,
    get_cache,
    install_registry,
    split_state,
)


def prefix_key_values(config: PrefixConfig, state: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """
    The per-layer (key, value) a prefix adapter prepends, from PEFT's stored layout.

    Args:
        config ([`PrefixConfig`]): T, num_layers L, num_attention_heads H, token_dim = H·head_dim.
        state (`dict[str, torch.Tensor]`): `{"prompt_embeddings": (T, L·2·token_dim)}` (other keys are ignored).

    Returns:
        `list[tuple[torch.Tensor, torch.Tensor]]`: L pairs of (1, H, T, head_dim) views of the stored tensor.

    Raises:
        [`CompositionError`]: the tensor is missing or its shape disagrees with the config.
    """
    prompt, _ = split_state("prefix", state)
    T, L, H = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
    if tuple(prompt.shape) != (T, L * 2 * config.token_dim):
        raise CompositionError(
            f"{PROMPT_KEY} has shape {tuple(prompt.shape)}, expected (num_virtual_tokens, num_layers·2·token_dim) = "
            f"({T}, {L * 2 * config.token_dim}); fix the adapter config"
        )
    # each row is [layer 0 key, layer 0 value, layer 1 key, ...], each (H, head_dim)
    kv = prompt.view(T, 2 * L, H, config.head_dim).permute(1, 2, 0, 3).unsqueeze(1)  # (2L, 1, H, T, head_dim)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(L)]


def attach_prefix(model: nn.Module, name: str, config: PrefixConfig, state: dict[str, torch.Tensor]) -> None:
    """
    Attach prefix `name` to `model` in place, active at once after the prefixes already attached.

    Args:
        model (`nn.Module`):
            a transformers model (`XForCausalLM`, `XForSequenceClassification`, `XModel`, ...): the module whose
            forward the user calls. `model.generate` works too.
        name (`str`):
            the adapter's name, unique among the model's prefixes.
        config ([`PrefixConfig`]):
            its layout (must match the model's layers, KV heads and head size) and `position_offset`.
        state (`dict[str, torch.Tensor]`):
            `{"prompt_embeddings": (T, num_layers·2·token_dim)}` in PEFT's layout, plus the full tensors of a
            trained head if the adapter has one (`classifier.weight`, keyed relative to the model).

    Raises:
        [`CompositionError`]: `name` is taken; the tensor is missing or its shape disagrees with the config;
            the layout disagrees with the prefixes already attached or with the model's attention; prompt
            adapters are attached.
    """
    attached = check_attachable(model, name, "prefix")
    _, heads = split_state(name, state)
    kv = prefix_key_values(config, state)
    layout = _layout(config)
    for other, (other_config, _) in attached.items():
        if _layout(other_config) != layout:
            raise CompositionError(f"prefix '{name}' has layout {layout} but attached prefix '{other}' has {_layout(other_config)}; stacked prefixes must share layers, heads, head size and position_offset")
    expected = _model_layout(model)
    if layout[:3] != expected:
        raise CompositionError(
            f"prefix '{name}' has (num_layers, num_attention_heads, head_dim) = {layout[:3]} but {type(model).__name__} "
            f"has {expected} (KV heads under GQA); the adapter was trained for a different model"
        )
    registry = install_registry(model, name, "prefix", heads, _inject_prefix)
    device = execution_device(model.get_input_embeddings())  # where the first layer's inputs are
    registry["prefixes"][name] = (config, [(k.detach().to(device), v.detach().to(device)) for k, v in kv])
    _concatenate(registry)


def detach_prefix(model: nn.Module, name: str | None = None) -> nn.Module:
    """
    Take prefix `name` (None: all prefixes) off `model` and return it; with none left the hook goes and the
    model is exactly as before.

    Raises:
        [`CompositionError`]: `name` is not attached.
    """
    return detach_adapters(model, name, "prefix", _concatenate)


def _concatenate(registry: dict) -> None:
    """The stack's per-layer prefix: every attached prefix's keys (values) along the token axis, in attach order."""
    stacks = [kv for _, kv in registry["prefixes"].values()]
    registry["kv"] = [tuple(torch.cat([kv[i][j] for kv in stacks], dim=2) for j in (0, 1)) for i in range(len(stacks[0]))]
    registry["offset"] = next(iter(registry["prefixes"].values()))[0].position_offset


def _inject_prefix(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The forward pre-hook: fill an empty cache with the prefix, extend the mask, place the positions."""
    registry = model._compose_prefix
    kwargs = call_kwargs(model, args, kwargs)
    kv = registry["kv"]
    n = kv[0][0].shape[2]
    cache = get_cache(kwargs, registry["cache"])
    if kwargs.get("use_cache") is False:  # every call is a whole sequence (generate then hands back the last call's cache)
        cache = None
    x = kwargs.get("input_ids")
    x = x if x is not None else kwargs["inputs_embeds"]
    batch, length = x.shape[:2]
    if cache is None or cache.get_seq_length() == 0:
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
        dtype = model.dtype
        for i, (k, v) in enumerate(kv):
            cache.update(k.to(dtype).expand(batch, -1, -1, -1), v.to(dtype).expand(batch, -1, -1, -1), i)
        kwargs[registry["cache"]] = cache
    positions = kwargs.get("position_ids")
    if registry["offset"] and positions is not None:
        kwargs["position_ids"] = positions + n  # PEFT: the prefix occupies positions 0..T-1
    elif not registry["offset"] and positions is None:
        start = cache.get_seq_length() - n  # real tokens seen so far
        kwargs["position_ids"] = torch.arange(start, start + length, device=x.device).unsqueeze(0)
    if registry["causal"]:
        kwargs.pop("token_type_ids", None)  # PEFT's causal-LM model drops them
    extend_mask(kwargs, batch, n)
    return (), kwargs


def _layout(config: PrefixConfig) -> tuple[int, int, int, bool]:
    return config.num_layers, config.num_attention_heads, config.head_dim, config.position_offset


def _model_layout(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head size) of a transformers model's attention, from its config."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim
