"""Attach MAM adapters (prefix + parallel bottleneck) to a transformers model, and take them off again.

The state holds both halves: `prompt_embeddings` (the prefix, PEFT's layout) and the bottleneck tensors
(`<layer>.<location>.<tensor>`). The prefix joins the model's prefixes and the adapter its bottleneck stack,
both under the MAM adapter's name; a fusion over MAM adapters fuses their bottleneck halves.
"""

from __future__ import annotations

import torch
from torch import nn

from compose.bottleneck.model import install_bottleneck, plan_bottleneck, registry, remove_bottlenecks
from compose.errors import CompositionError
from compose.mam.config import MamConfig
from compose.prefix.model import attach_prefix, detach_prefix
from compose.prompt.model import PROMPT_KEY


def attach_mam(model: nn.Module, name: str, config: MamConfig, state: dict[str, torch.Tensor]) -> None:
    """
    Attach MAM adapter `name` to `model` in place, active at once (after the prefixes and bottlenecks already attached).

    Args:
        model (`nn.Module`): a transformers model of a family `compose.families` knows.
        name (`str`): the adapter's name, unique among the model's prefixes and bottleneck adapters.
        config ([`MamConfig`]): the prefix's layout and the bottleneck's options.
        state (`dict[str, torch.Tensor]`): `prompt_embeddings` (T, num_layers·2·token_dim) plus the bottleneck tensors.

    Raises:
        [`CompositionError`]: `name` is taken; either half does not fit the model (nothing is attached then).
    """
    if PROMPT_KEY not in state:
        raise CompositionError(f"MAM adapter '{name}' has no '{PROMPT_KEY}' tensor (its prefix); check that its state was loaded")
    plan = plan_bottleneck(model, name, config.adapter, {k: v for k, v in state.items() if k != PROMPT_KEY})  # checks, changes nothing
    attach_prefix(model, name, config.prefix, {PROMPT_KEY: state[PROMPT_KEY]})
    install_bottleneck(model, plan, owner="mam")


def detach_mam(model: nn.Module, name: str | None = None) -> nn.Module:
    """
    Take MAM adapter `name` (None: all MAM adapters) off `model` and return it.

    Raises:
        [`CompositionError`]: `name` is not an attached MAM adapter.
    """
    mams = [n for n, (_, owner) in registry(model)["adapters"].items() if owner == "mam"]
    if name is not None and name not in mams:
        raise CompositionError(f"MAM adapter '{name}' is not attached; attached MAM adapters: {mams}")
    names = mams if name is None else [name]
    remove_bottlenecks(model, names)
    for n in names:
        detach_prefix(model, n)
    return model
