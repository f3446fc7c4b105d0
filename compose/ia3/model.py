"""Attach (IA)³ adapters to any transformers model in place, merge them into the weights, take them off, and
combine several into one.

Targeted modules are swapped for an `IA3Layer` wrapping the original; `modules_to_save` modules get the
adapter's trained copy (`compose.heads`). All attached IA3 adapters are active: at a module that several
of them target, their vectors multiply. Everything is checked before the model is touched. The model
remembers its IA3 adapters, in attach order, in `model._compose_ia3`.
"""

from __future__ import annotations

import torch
from torch import nn

from compose.devices import execution_device
from compose.errors import CompositionError
from compose.heads import attach_heads, detach_heads, prepare_heads
from compose.ia3.config import IA3Config
from compose.ia3.layer import IA3Layer
from compose.lora.layer import (
    LoraLayer,
    adapter_dtype,
    base_features,
    base_kind,
)
from compose.modules import get_module, replace_module, resolve_path

_SUFFIX = ".ia3_l"


def attach_ia3(model: nn.Module, name: str, config: IA3Config, state: dict[str, torch.Tensor]) -> None:
    """
    Attach (IA)³ adapter `name` to `model` in place; it is active at once, with the IA3 adapters already attached.

    Args:
        model (`nn.Module`): any transformers model (Linear or GPT-2 Conv1D targets).
        name (`str`): the adapter's name, unique among the model's IA3 adapters.
        config (`IA3Config`): which targets scale their input (`feedforward_modules`); the rest scale their output.
        state (`dict[str, torch.Tensor]`): tensors keyed relative to the transformers model (PEFT keys minus
            `base_model.model.`): `<module>.ia3_l` of shape (out, 1), or (1, in) at feed-forward modules, and
            full tensors of `modules_to_save` modules such as `classifier.weight`. Vectors are cast to fp32
            (fp64 over fp64 bases) on the module's device.

    Raises:
        [`CompositionError`]: `name` is taken; IA3 layers are merged; a module is missing, not a Linear/Conv1D,
            already has a LoRA layer, or is already replaced by an active adapter's copy; a vector's shape does not
            fit its module or the config; another IA3 adapter scales the other side of the same module.
    """
    registry = _registry(model)
    if name in registry:
        raise CompositionError(f"IA3 adapter '{name}' is already attached; detach_ia3(model, '{name}') first or choose another name")
    if any(isinstance(m, IA3Layer) and m.merged is not None for m in model.modules()):
        raise CompositionError(f"cannot attach IA3 adapter '{name}' while IA3 layers are merged; unmerge_ia3(model) first")
    if not state:
        raise CompositionError(f"IA3 adapter '{name}' has no tensors; check that its state dict was loaded")
    full: dict[str, torch.Tensor] = {}
    vectors = []
    for key, tensor in state.items():
        if key.endswith(_SUFFIX):
            vectors.append(_check_vector(model, key.removesuffix(_SUFFIX), tensor, config))
        else:
            full[key] = tensor
    heads = prepare_heads(model, name, "IA3", full)

    for path, vector, feedforward in vectors:
        layer = get_module(model, path)
        if not isinstance(layer, IA3Layer):
            layer = IA3Layer(layer, feedforward)
            replace_module(model, path, layer)
        layer.add_adapter(name, vector)
    attach_heads(model, name, "IA3", heads)
    registry.append(name)


def detach_ia3(model: nn.Module, name: str | None = None) -> nn.Module:
    """
    Take IA3 adapter `name` (None: all IA3 adapters) off `model` and return the model.

    Merged layers are unmerged first; modules left without adapters get their original objects back.

    Raises:
        [`CompositionError`]: `name` is not attached.
    """
    registry = _registry(model)
    if name is not None and name not in registry:
        raise CompositionError(f"IA3 adapter '{name}' is not attached; attached IA3 adapters: {registry}")
    names = set(registry) if name is None else {name}
    for path, m in list(model.named_modules()):
        if isinstance(m, IA3Layer):
            m.unmerge()
            for n in names & set(m.vectors):
                m.remove_adapter(n)
            if not m.vectors:
                replace_module(model, path, m.base_layer)
    detach_heads(model, names, "IA3")
    registry[:] = [n for n in registry if n not in names]
    return model


def merge_ia3(model: nn.Module) -> None:
    """
    Fold every IA3 layer's vectors into its base weight (and bias, for output scaling), in place, so the
    model runs as the base alone; the same weights PEFT's `merge_and_unload` leaves.

    Raises:
        [`CompositionError`]: a layer's product of vectors has zero entries (its merge could not be undone;
            layers merged before it stay merged), or a layer is dropped by AdapterDrop.
    """
    for m in model.modules():
        if isinstance(m, IA3Layer):
            m.merge()


def unmerge_ia3(model: nn.Module) -> None:
    """Undo `merge_ia3`: divide the weights by the vectors again (exact up to float rounding)."""
    for m in model.modules():
        if isinstance(m, IA3Layer):
            m.unmerge()


def combine_ia3(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """
    One IA3 adapter from several, as PEFT's `add_weighted_adapter` makes it: l = Σ wᵢ·lᵢ per module, summed
    over the adapters that have a vector there (the others add nothing, not a vector of ones).

    Args:
        states (`list[dict[str, torch.Tensor]]`): the adapters' `<module>.ia3_l` tensors.
        weights (`list[float]`): one weight per adapter, possibly negative.

    Returns:
        `dict[str, torch.Tensor]`: the vectors of every module any adapter has, in the first adapter's dtype
        (computed in fp32 at least). Attach it with `combine_ia3_configs` of the adapters' configs.

    Raises:
        [`CompositionError`]: the counts differ; a state holds a tensor that is not an IA3 vector (a
            `modules_to_save` copy has no weighted sum); two adapters' vectors at one module differ in shape.
    """
    if not states or len(states) != len(weights):
        raise CompositionError(f"got {len(states)} IA3 adapters and {len(weights)} weights; give one weight per adapter")
    other = next((k for s in states for k in s if not k.endswith(_SUFFIX)), None)
    if other is not None:
        raise CompositionError(f"tensor '{other}' is not an IA3 vector (a modules_to_save copy?); a weighted sum combines only '*{_SUFFIX}' tensors, so drop it")
    dtype = next((v.dtype for s in states for v in s.values()), torch.float32)
    work = torch.promote_types(dtype, torch.float32)
    combined: dict[str, torch.Tensor] = {}
    for state, weight in zip(states, weights):
        for key, vector in state.items():
            if key in combined and combined[key].shape != vector.shape:
                raise CompositionError(
                    f"'{key}': shapes {tuple(combined[key].shape)} and {tuple(vector.shape)} differ (one adapter scales the module's input, "
                    "another its output); combine only adapters with the same feedforward_modules"
                )
            combined[key] = combined.get(key, 0) + weight * vector.to(work)
    return {k: v.to(dtype) for k, v in combined.items()}


def attached_ia3(model: nn.Module) -> list[str]:
    """The names of the IA3 adapters attached to `model`, in attach order."""
    return list(_registry(model))


def _check_vector(model: nn.Module, key: str, vector: torch.Tensor, config: IA3Config) -> tuple[str, torch.Tensor, bool]:
    """(path, vector cast for the module, feedforward) for module `key`'s vector, checked against the model."""
    path = resolve_path(model, key)
    if path is None:
        prefix = getattr(model, "base_model_prefix", "")
        raise CompositionError(f"module '{key}' not found in {type(model).__name__} (also tried with/without its base_model_prefix '{prefix}'); the adapter was trained for a different architecture")
    module = get_module(model, path)
    if isinstance(module, LoraLayer):
        raise CompositionError(f"module '{path}' already has a LoRA layer; IA3 and LoRA cannot adapt the same module, detach the LoRA adapters there first")
    base = module.base_layer if isinstance(module, IA3Layer) else module
    if base_kind(base) not in ("linear", "conv1d"):
        raise CompositionError(f"module '{path}' is a {type(base).__name__}; IA3 supports Linear and GPT-2 Conv1D")
    feedforward = config.is_feedforward(key)  # matched on the name the adapter was trained with, as PEFT does
    n_in, n_out = base_features(base)
    expected = (1, n_in) if feedforward else (n_out, 1)
    if tuple(vector.shape) != expected:
        side = "input (it is in feedforward_modules)" if feedforward else "output (it is not in feedforward_modules)"
        raise CompositionError(
            f"module '{path}': ia3_l has shape {tuple(vector.shape)}, expected {expected} to scale the {side} of a "
            f"{type(base).__name__} (in {n_in}, out {n_out}); check feedforward_modules, or the adapter was trained for a different model"
        )
    if isinstance(module, IA3Layer) and module.feedforward != feedforward:
        side = {True: "input", False: "output"}
        raise CompositionError(
            f"module '{path}': IA3 adapters {list(module.vectors)} scale its {side[module.feedforward]} but this one its {side[feedforward]}; "
            "adapters on one module must agree (feedforward_modules)"
        )
    return path, vector.to(device=execution_device(base), dtype=adapter_dtype(base)), feedforward


def _registry(model: nn.Module) -> list[str]:
    if getattr(model, "_compose_ia3", None) is None:
        model._compose_ia3 = []
    return model._compose_ia3
