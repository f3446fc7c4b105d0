"""Attach AdaLoRA adapters by converting them exactly into LoRA adapters.

PEFT's AdaLoRA layer adds  x·(E⊙A)ᵀ·Bᵀ · s/(ranknum + 1e-5)  with A (r, in), E (r, 1), B (out, r). That is
LoRA with A' = E⊙A (E scales A's rows), B' = B and scaling s/(ranknum + 1e-5), so a converted adapter goes
through `compose.lora` and every LoRA path (merge, unmerge, stacking, fusion, weighted sums, the
streaming merge) applies unchanged.

On load PEFT prunes each module listed in `rank_pattern` to the rows its mask keeps (the saved tensors
already hold only those) but keeps ranknum = init_r, so the scaling is the one the adapter was trained
with. A module pruned to rank 0 adds nothing and gets no layer here.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from compose.adalora.config import AdaLoraConfig
from compose.errors import CompositionError
from compose.lora.config import LoraConfig
from compose.lora.model import attach_lora, attached_adapters, detach_lora

_FACTORS = ("lora_A", "lora_B", "lora_E")


def adalora_to_lora(config: AdaLoraConfig, state: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """
    The LoRA adapter that computes exactly what PEFT computes for an AdaLoRA adapter it loaded.

    Args:
        config (`AdaLoraConfig`): The adapter's configuration (init_r, lora_alpha, rank_pattern, ...).
        state (`dict[str, torch.Tensor]`): Its tensors keyed relative to the transformers model:
            `<module>.lora_A` (r, in), `<module>.lora_E` (r, 1), `<module>.lora_B` (out, r), and full
            tensors of `modules_to_save` modules (passed through unchanged).

    Returns:
        `tuple[LoraConfig, dict[str, torch.Tensor]]`: a config whose `scaling_for(module)` is
        s/(init_r + 1e-5) at every module (per-module ranks and alphas as escaped `rank_pattern` /
        `alpha_pattern` keys), and the tensors `<module>.lora_A.weight` = E⊙A, `<module>.lora_B.weight` = B.
        Modules pruned to rank 0 are left out.

    Raises:
        [`CompositionError`]: a module lacks one of A/E/B, or their ranks disagree with each other or with
        the rank `rank_pattern` keeps (init_r for modules it does not list); a mask is not init_r long.
    """
    masks = config.masks()
    factors: dict[str, dict[str, torch.Tensor]] = {}
    lora_state: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, field = key.rpartition(".")
        if field in _FACTORS:
            factors.setdefault(module, {})[field] = tensor
        else:
            lora_state[key] = tensor  # modules_to_save: compose.lora checks them against the model
    ranks, alphas = {}, {}
    for module, t in factors.items():
        missing = [f for f in _FACTORS if f not in t]
        if missing:
            raise CompositionError(f"module '{module}' lacks {missing}; an AdaLoRA adapter needs lora_A, lora_E and lora_B at every module")
        A, E, B = t["lora_A"], t["lora_E"], t["lora_B"]
        rank = sum(masks[module]) if module in masks else config.init_r
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != rank or B.shape[1] != rank or tuple(E.shape) != (rank, 1):
            why = f"rank_pattern keeps {rank} of {config.init_r}" if module in masks else f"it is not in rank_pattern, so it has init_r={rank}"
            raise CompositionError(
                f"module '{module}': lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)}, lora_B {tuple(B.shape)} do not have rank {rank} "
                f"({why}); expected ({rank}, in), ({rank}, 1), (out, {rank}) — the tensors and adapter_config.json do not belong together"
            )
        if rank == 0:
            continue
        dtype = torch.promote_types(A.dtype, torch.float32)  # PEFT computes E⊙A in the fp32 it loads adapters in
        lora_state[f"{module}.lora_A.weight"] = A.to(dtype) * E.to(dtype)
        lora_state[f"{module}.lora_B.weight"] = B
        ranks[module], alphas[module] = rank, config.scaling_for(rank) * rank
    # LoRA scales by alpha/r, so a module whose rank differs from the default needs its own alpha too
    others = [m for m in ranks if ranks[m] != config.init_r]
    lora_config = LoraConfig(
        r=config.init_r,
        lora_alpha=config.scaling_for(config.init_r) * config.init_r,
        rank_pattern={re.escape(m): ranks[m] for m in others},  # pattern keys are regexes: match this path only
        alpha_pattern={re.escape(m): alphas[m] for m in others},
        fan_in_fan_out=config.fan_in_fan_out,
        target_modules=config.target_modules,
        modules_to_save=config.modules_to_save,
    )
    return lora_config, lora_state


def attach_adalora(model: nn.Module, name: str, config: AdaLoraConfig, state: dict[str, torch.Tensor]) -> None:
    """
    Attach AdaLoRA adapter `name` to `model` in place, active alongside the adapters already active.

    It becomes a LoRA adapter of that name (see `adalora_to_lora`): `compose.lora`'s functions
    (`set_active_adapters`, `LoraLayer.merge`, `lora_state`, ...) see it as one.

    Args:
        model (`nn.Module`): any transformers model; see `compose.lora.model.attach_lora`.
        name (`str`): the adapter's name, unique among the model's LoRA-form adapters.
        config (`AdaLoraConfig`): its configuration.
        state (`dict[str, torch.Tensor]`): its tensors, PEFT keys minus the leading `base_model.model.`.

    Raises:
        [`CompositionError`]: the tensors disagree with the config (`adalora_to_lora`), every module was
        pruned to rank 0 and nothing else is saved, or `attach_lora`'s checks fail (the model is left as it was).
    """
    lora_config, lora_state = adalora_to_lora(config, state)
    if not lora_state:
        raise CompositionError(f"AdaLoRA adapter '{name}' has no module left with rank > 0 and no modules_to_save, so it changes nothing; don't attach it")
    attach_lora(model, name, lora_config, lora_state)
    _registry(model).append(name)


def detach_adalora(model: nn.Module, name: str | None = None) -> nn.Module:
    """
    Take AdaLoRA adapter `name` (None: every AdaLoRA adapter, plain LoRA ones stay) off `model`; returns it.

    Raises:
        [`CompositionError`]: `name` is not an attached AdaLoRA adapter.
    """
    registry = _registry(model)
    registry[:] = [n for n in registry if n in attached_adapters(model)]  # drop any detached through compose.lora
    if name is not None and name not in registry:
        raise CompositionError(f"AdaLoRA adapter '{name}' is not attached; attached AdaLoRA adapters: {registry}")
    for n in list(registry) if name is None else [name]:
        detach_lora(model, n)
        registry.remove(n)
    return model


def _registry(model: nn.Module) -> list[str]:
    if getattr(model, "_compose_adalora", None) is None:
        model._compose_adalora = []
    return model._compose_adalora
