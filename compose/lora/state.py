"""Adapter tensors in and out of a model: fresh factors for a new adapter, and an attached adapter's
tensors back out (keyed as `attach_lora` takes them, so a save/attach round trip is exact).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compose.errors import CompositionError
from compose.lora.config import LoraConfig
from compose.lora.layer import LoraLayer, SavedModule, base_features, base_kind
from compose.targets import matches_target


def new_lora_state(model: nn.Module, config: LoraConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fresh LoRA factors for every module `config.target_modules` names, initialised as PEFT does by
    default: A ~ Kaiming-uniform (a=√5, as nn.Linear), B = 0 (on an embedding: A = 0, B ~ N(0, 1)), so the
    new adapter starts as a no-op.

    Raises:
        CompositionError: no Linear/Conv1D/Embedding module matches the targets.
    """
    generator = torch.Generator().manual_seed(seed)
    wrapped = [p for p, m in model.named_modules() if isinstance(m, (LoraLayer, SavedModule))]
    state = {}
    for path, module in model.named_modules():
        if not matches_target(path, config.target_modules) or base_kind(module) is None:
            continue
        if any(path == w or path.startswith(w + ".") for w in wrapped):  # adapter machinery (e.g. a fusion's query)
            continue
        n_in, n_out = base_features(module)
        r = config.rank_for(path)
        if base_kind(module) == "embedding":
            state[f"{path}.lora_embedding_A"] = torch.zeros(r, n_in)
            state[f"{path}.lora_embedding_B"] = torch.randn(n_out, r, generator=generator)
            continue
        bound = 1 / math.sqrt(n_in)  # kaiming_uniform_(a=√5) on an (r, in) matrix
        state[f"{path}.lora_A.weight"] = (torch.rand(r, n_in, generator=generator) * 2 - 1) * bound
        state[f"{path}.lora_B.weight"] = torch.zeros(n_out, r)
    if not state:
        raise CompositionError(f"no Linear/Conv1D/Embedding module of {type(model).__name__} matches target_modules={config.target_modules!r}")
    return state


def lora_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of attached adapter `name`, keyed relative to the model (PEFT keys minus 'base_model.model.'):
    as it was saved, so a PiSSA/OLoRA adapter gives its trained factors (its config recomputes the rest)."""
    state = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer) and name in module.adapters:
            ad = module.adapters[name]
            r = ad.lora_A.shape[0] // 2 if ad.residual else ad.lora_A.shape[0]
            a, b = ("lora_embedding_A", "lora_embedding_B") if module.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
            state[f"{path}.{a}"] = ad.lora_A[:r].detach().clone()
            state[f"{path}.{b}"] = ad.lora_B[:, :r].detach().clone()
            for field, t in ad.base_weights.items():
                state[f"{path}.base_layer.{field}"] = t.detach().clone()
            if ad.lora_bias is not None:
                state[f"{path}.lora_B.bias"] = ad.lora_bias.detach().clone()
            if ad.magnitude is not None:
                state[f"{path}.lora_magnitude_vector"] = ad.magnitude.detach().clone()
        elif isinstance(module, SavedModule) and name in module.copies:
            for n, t in module.copies[name].state_dict().items():
                state[f"{path}.{n}"] = t.detach().clone()
    if not state:
        raise CompositionError(f"adapter '{name}' is not attached to this model")
    return state


def lora_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The trainable tensors of adapter `name` (A, B, β, m and its saved module copies), with gradients on."""
    params = []
    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.adapters:
            params += list(module.adapters[name].parameters())
        elif isinstance(module, SavedModule) and name in module.copies:
            params += list(module.copies[name].parameters())
    for p in params:
        p.requires_grad_(True)
    return params
