"""Attach VeRA adapters to any transformers model in place, and take them off again.

Targeted Linear / GPT-2 Conv1D modules are wrapped in a `compose.delta.DeltaLayer`; merging, unmerging and
conversion to LoRA are `compose.delta`'s (`merge_deltas`, `unmerge_deltas`, `convert_to_lora`). Each adapter
keeps its own projections (from its file, or regenerated from its `projection_prng_key`); PEFT shares the first
adapter's among all, which is the same when their keys are (PEFT requires one key for all adapters).
"""

from __future__ import annotations

import torch
from torch import nn

from compose.delta import DeltaAdapter, attach_delta, cast_for, detach_delta
from compose.devices import execution_device
from compose.lora.layer import base_features
from compose.vera.config import VeraConfig
from compose.vera.layer import VeraAdapter, random_projections


def attach_vera(model: nn.Module, name: str, config: VeraConfig, state: dict[str, torch.Tensor]) -> None:
    """
    Attach VeRA adapter `name` to `model` in place; it is active at once, with the delta adapters already attached.

    Args:
        model (`nn.Module`): any transformers model (Linear or GPT-2 Conv1D targets; a LoRA layer over one too).
        name (`str`): the adapter's name, unique among the model's delta adapters.
        config (`VeraConfig`): `r`, and whether the projections are in `state` (`save_projection`) or come from
            `projection_prng_key`.
        state (`dict[str, torch.Tensor]`): tensors keyed relative to the model (PEFT keys minus `base_model.model.`,
            and `vera_A` / `vera_B` for PEFT's `base_model.vera_A` / `base_model.vera_B`), as `config.tensor_shapes`
            has them, and full tensors of `modules_to_save` modules. Cast to fp32 (fp64 over fp64 bases).

    Raises:
        [`CompositionError`]: `name` is taken; a module is missing or not a Linear/Conv1D; a tensor is missing, extra
            or misshapen for the config (the projections must span the largest adapted module). The model is untouched then.
    """

    def build(targets, modules) -> dict[str, DeltaAdapter]:
        shared = modules.get("")
        if not config.save_projection:
            dims = [base_features(base) for _, base in targets.values()]
            A, B = random_projections(config.r, max(d[0] for d in dims), max(d[1] for d in dims), config.projection_prng_key)
            shared = {"vera_A": A, "vera_B": B}
        cast: dict[tuple, dict[str, torch.Tensor]] = {}  # one copy of the projections per device and dtype, sliced by every module
        adapters = {}
        for key, (path, base) in targets.items():
            n_in, n_out = base_features(base)
            where = (execution_device(base), base.weight.dtype)
            projections = cast.setdefault(where, {k: cast_for(base, t) for k, t in shared.items()})
            vectors = {n: cast_for(base, t) for n, t in modules[key].items()}
            adapters[path] = VeraAdapter(vectors, projections["vera_A"][:, :n_in], projections["vera_B"][:n_out, :])
        return adapters

    attach_delta(model, name, config, state, "vera_", build)


def detach_vera(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take VeRA adapter `name` (None: every VeRA adapter) off `model` and return it (`compose.delta.detach_delta`)."""
    return detach_delta(model, VeraConfig, name)
