"""Attach LoKr adapters to any transformers model in place, and take them off again.

Targeted Linear / GPT-2 Conv1D modules are wrapped in a `compose.delta.DeltaLayer` that adds x·ΔWᵀ; merging,
unmerging and conversion to LoRA are `compose.delta`'s (`merge_deltas`, `unmerge_deltas`, `convert_to_lora`).
PEFT adapts nn.Linear (and convolutions) only; on a GPT-2 Conv1D the engine applies the same ΔW (out, in).
"""

from __future__ import annotations

import torch
from torch import nn

from compose.delta import DeltaAdapter, attach_delta, cast_for, detach_delta
from compose.lokr.config import LoKrConfig
from compose.lokr.layer import LoKrAdapter


def attach_lokr(model: nn.Module, name: str, config: LoKrConfig, state: dict[str, torch.Tensor]) -> None:
    """
    Attach LoKr adapter `name` to `model` in place; it is active at once, with the delta adapters already attached.

    Args:
        model (`nn.Module`): any transformers model (Linear or GPT-2 Conv1D targets; a LoRA layer over one too).
        name (`str`): the adapter's name, unique among the model's delta adapters.
        config (`LoKrConfig`): ranks, alphas and the factorization (`decompose_both`, `decompose_factor`).
        state (`dict[str, torch.Tensor]`): tensors keyed relative to the model (PEFT keys minus `base_model.model.`):
            per module the `lokr_w*` tensors `config.tensor_shapes` names, and full tensors of `modules_to_save`
            modules such as `classifier.weight`. Cast to fp32 (fp64 over fp64 bases).

    Raises:
        [`CompositionError`]: `name` is taken; a module is missing or not a Linear/Conv1D; a tensor is missing, extra
            or misshapen for the config at its module. The model is untouched then.
    """

    def build(targets, modules) -> dict[str, DeltaAdapter]:
        return {path: LoKrAdapter({n: cast_for(base, t) for n, t in modules[key].items()}, config.scaling_for(key)) for key, (path, base) in targets.items()}

    attach_delta(model, name, config, state, "lokr_", build)


def detach_lokr(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take LoKr adapter `name` (None: every LoKr adapter) off `model` and return it (`compose.delta.detach_delta`)."""
    return detach_delta(model, LoKrConfig, name)
