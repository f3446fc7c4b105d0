"""Attach LoRA adapters to any transformers model in place, switch them, and take them off again.

Targeted modules are swapped for a `LoraLayer` wrapping the original (which it keeps as
`base_layer`); `modules_to_save` modules get each adapter's trained copy (`compose.heads`), switched with it.
Everything is checked before the model is touched, so a failed attach leaves it as it was.
The model remembers its adapters (attach order and active list) in `model._compose_lora`.
"""

from __future__ import annotations

import torch
from torch import nn

from compose.devices import execution_device
from compose.errors import CompositionError
from compose.heads import attach_heads, detach_heads, prepare_heads, resolve_module, set_active_heads
from compose.lora.config import LoraConfig
from compose.lora.layer import LoraAdapter, LoraLayer, adapter_dtype, base_features, base_kind
from compose.modules import get_module, replace_module

#: PEFT tensor-name suffixes → LoraAdapter fields.
_LORA_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_B.bias": "lora_bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}


def attach_lora(model: nn.Module, name: str, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    """Attach adapter `name` to `model` in place and make it active alongside the adapters already active.

    Args:
        model: any transformers model (or `nn.Module`), possibly loaded with `dtype`/`device_map` or quantized
            by bitsandbytes. Adapter tensors go to each base layer's device, in fp32 (fp64 over fp64 bases).
        name: the adapter's name, unique on this model.
        config: its hyper-parameters; ranks must agree with the tensors, scaling comes from `config.scaling_for`.
        state: tensors keyed relative to the transformers model, i.e. a PEFT safetensors key with the leading
            `base_model.model.` removed: `<module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>.lora_B.bias`
            (lora_bias), `<module>.lora_magnitude_vector` (DoRA), and full tensors of `modules_to_save`
            modules such as `classifier.weight`. Module paths may differ from the model's by its
            `base_model_prefix` (an adapter trained on `XForCausalLM` loaded onto `XModel`, or back).

    Raises:
        CompositionError: `name` is taken; a module is missing, of an unsupported type, or merged; a tensor's
            shape does not fit its module; the rank disagrees with the config; two active adapters would
            replace the same `modules_to_save` module.
    """
    registry = _registry(model)
    if name in registry["attached"]:
        raise CompositionError(f"adapter '{name}' is already attached; detach_lora(model, '{name}') first or choose another name")
    if any(isinstance(m, LoraLayer) and m.merged for m in model.modules()):
        raise CompositionError(f"cannot attach adapter '{name}' while LoRA layers are merged; unmerge() them first")
    lora, full = _split_state(state)
    if not lora and not full:
        raise CompositionError(f"adapter '{name}' has no tensors; check that its state dict was loaded")
    targets = [_make_adapter(model, key, tensors, config) for key, tensors in lora.items()]
    heads = prepare_heads(model, name, "LoRA", full)

    for path, adapter in targets:
        layer = get_module(model, path)
        if not isinstance(layer, LoraLayer):
            layer = LoraLayer(layer)
            replace_module(model, path, layer)
        layer.add_adapter(name, adapter)
    attach_heads(model, name, "LoRA", heads, switched=True)
    registry["attached"].append(name)
    set_active_adapters(model, registry["active"] + [name])


def set_active_adapters(model: nn.Module, names: list[str]) -> None:
    """Make exactly `names` active, in that order (their deltas add; `[]` runs the base model).

    Raises:
        CompositionError: a name is not attached, two of them (or one and another method's adapter) replace the
            same `modules_to_save` module, or a layer is merged (unmerge it first).
    """
    registry = _registry(model)
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in registry["attached"]]
    if unknown:
        raise CompositionError(f"adapters {unknown} are not attached; attached: {registry['attached']}")
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]
    for path, m in layers:
        if m.merged:
            raise CompositionError(f"LoRA layer '{path}' is merged; unmerge() it before changing the active adapters")
    set_active_heads(model, names)  # checks every module before it changes any
    for _, m in layers:
        m.set_active(names)
    registry["active"] = names


def detach_lora(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take adapter `name` (None: all adapters) off `model` and return the model.

    Modules left without adapters get their original objects back, so with everything detached
    the model is the one that went in. Merged layers are unmerged first (exact up to float rounding).

    Raises:
        CompositionError: `name` is not attached.
    """
    registry = _registry(model)
    if name is not None and name not in registry["attached"]:
        raise CompositionError(f"adapter '{name}' is not attached; attached: {registry['attached']}")
    names = set(registry["attached"]) if name is None else {name}
    for path, m in list(model.named_modules()):
        if isinstance(m, LoraLayer):
            if m.merged:
                m.unmerge()
            for n in names & set(m.adapters):
                m.remove_adapter(n)
            if not m.adapters:
                replace_module(model, path, m.base_layer)
    detach_heads(model, names, "LoRA")
    registry["attached"] = [n for n in registry["attached"] if n not in names]
    registry["active"] = [n for n in registry["active"] if n not in names]
    return model


def attached_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters attached to `model`, in attach order."""
    return list(_registry(model)["attached"])


def _registry(model: nn.Module) -> dict[str, list[str]]:
    if getattr(model, "_compose_lora", None) is None:
        model._compose_lora = {"attached": [], "active": []}
    return model._compose_lora


def _split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """LoRA tensors grouped by module path ({path: {field: tensor}}), and the full (`modules_to_save`) tensors."""
    lora: dict[str, dict] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            lora.setdefault(key[: -len(suffix)], {})[_LORA_SUFFIXES[suffix]] = tensor
        elif "lora_" in key:
            raise CompositionError(f"tensor '{key}' is a LoRA tensor this engine does not support (Linear/Conv1D targets only)")
        else:
            full[key] = tensor
    return lora, full


def _make_adapter(model: nn.Module, key: str, tensors: dict, config: LoraConfig) -> tuple[str, LoraAdapter]:
    """Check one module's LoRA tensors against the model and build its `LoraAdapter` (model untouched)."""
    path = resolve_module(model, key)
    module = get_module(model, path)
    base = module.base_layer if isinstance(module, LoraLayer) else module
    from compose.ia3.layer import IA3Layer  # here: compose.ia3 builds on this module

    if isinstance(base, IA3Layer):
        raise CompositionError(f"module '{path}' is already scaled by an IA3 adapter; LoRA and IA3 cannot adapt the same module (detach the IA3 adapter, or target other modules)")
    if base_kind(base) is None:
        raise CompositionError(f"module '{path}' is a {type(base).__name__}; LoRA supports Linear, GPT-2 Conv1D and bitsandbytes Linear4bit/Linear8bitLt")
    missing = {"lora_A", "lora_B"} - set(tensors)
    if missing:
        raise CompositionError(f"module '{key}' lacks {sorted(missing)}; the adapter file is incomplete")
    a, b, bias, magnitude = (tensors.get(f) for f in ("lora_A", "lora_B", "lora_bias", "magnitude"))
    n_in, n_out = base_features(base)
    r = a.shape[0]
    if a.shape != (r, n_in) or b.shape != (n_out, r):
        raise CompositionError(
            f"module '{path}': lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
            f"{type(base).__name__} (in {n_in}, out {n_out}); expected lora_A (r, {n_in}) and lora_B ({n_out}, r) — "
            "the adapter was trained for a different model"
        )
    if r != config.rank_for(key):
        raise CompositionError(f"module '{path}': the tensors have rank {r} but the config says {config.rank_for(key)} (r / rank_pattern); fix the adapter config")
    if (magnitude is not None) != config.use_dora:
        raise CompositionError(f"module '{path}': use_dora={config.use_dora} but the adapter {'has' if magnitude is not None else 'lacks'} lora_magnitude_vector; fix the adapter config")
    if magnitude is not None and bias is not None:
        raise CompositionError(f"module '{path}': DoRA with lora_bias is not supported (PEFT refuses it too)")
    for field, t in (("lora_B.bias", bias), ("lora_magnitude_vector", magnitude)):
        if t is not None and t.shape != (n_out,):
            raise CompositionError(f"module '{path}': {field} has shape {tuple(t.shape)}, expected ({n_out},) for the base's {n_out} outputs")
    dtype, device = adapter_dtype(base), execution_device(base)  # an offloaded base's weight is on meta
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    # patterns (rank/alpha) name modules as the adapter was trained, so match on `key`, not `path`
    return path, LoraAdapter(cast(a), cast(b), config.scaling_for(key), cast(bias), cast(magnitude))
