"""Install an AdapterFusion over LoRA adapters; read, train, record, prune, save and remove any fusion.

A fusion lives in the modules that run it: every module whose `fusion` child is a `FusionLayer`, i.e. a
`LoraLayer` (LoRA-form members, attached here) or a `BottleneckSite` (bottleneck members, attached by
`compose.bottleneck.fusion`, which places their query and residual). Everything else here finds those
modules whatever their kind, so one API saves, trains, records, prunes and detaches both. Tensors are
keyed `<module path>.fusion.query.weight` etc., relative to the transformers model like adapter states.
One fusion per model at a time; the model remembers it (name and config) in `model._compose_fusion`.

Over LoRA adapters, every `LoraLayer` that holds the members returns y₀ + fusion(y₀, stack(δᵢ)) instead
of y₀ + Σδᵢ; layers that hold none of them are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from compose.bottleneck.layer import BottleneckSite
from compose.bottleneck.model import set_active_bottlenecks
from compose.devices import execution_device
from compose.errors import CompositionError
from compose.fusion.config import FusionConfig
from compose.fusion.layer import FusionLayer
from compose.lora.layer import LoraLayer, adapter_dtype, base_features
from compose.lora.model import attached_adapters, set_active_adapters
from compose.modules import resolve_path


def attach_fusion(model: nn.Module, name: str, config: FusionConfig, state: dict[str, torch.Tensor] | None = None, *, seed: int = 0) -> None:
    """Fuse the LoRA adapters `config.members` (already attached) with attention, in place.

    Makes exactly the members active. Each module that holds them then runs the fusion over their
    outputs, whatever the active list says later; other adapters on those modules do not run there.
    Without `state` the fusion starts as the uniform average of its members (see `compose.fusion.layer`).

    Args:
        model: a model with the members attached by `compose.lora.model.attach_lora`.
        name: the fusion's name (for the caller's bookkeeping; `attached_fusion` returns it).
        config: members (order kept), temperature and regularisation.
        state: trained tensors as `fusion_state` returns them: `<module path>.fusion.{query,key}.{weight,bias}`
            and `<module path>.fusion.value.weight` for every fused module. Paths may differ from the
            model's by its `base_model_prefix`, as for LoRA states.
        seed: seeds the random key projections of a fresh fusion (ignored with `state`).

    Raises:
        CompositionError: a fusion is already attached; a member is not attached, is DoRA, or holds no
            LoRA module; a module holds only some members; a layer is merged; `state` lacks a module's
            tensors, has tensors for a module the fusion does not cover, or a shape does not fit.
    """
    check_no_fusion(model)
    attached = attached_adapters(model)
    missing = [m for m in config.members if m not in attached]
    if missing:
        raise CompositionError(f"fusion '{name}': members {missing} are not attached (attached: {attached}); attach them with attach_lora first")
    layers = {path: m for path, m in model.named_modules() if isinstance(m, LoraLayer) and set(config.members) & set(m.adapters)}
    if not layers:
        raise CompositionError(f"fusion '{name}': members {config.members} have no LoRA modules to fuse (only modules_to_save?)")
    for path, layer in layers.items():
        lacking = [m for m in config.members if m not in layer.adapters]
        if lacking:
            raise CompositionError(f"module '{path}' holds fusion members {[m for m in config.members if m in layer.adapters]} but not {lacking}; fuse adapters that target the same modules")
        dora = [m for m in config.members if layer.adapters[m].magnitude is not None]
        if dora:
            raise CompositionError(f"adapter '{dora[0]}' is DoRA (module '{path}'); AdapterFusion takes plain LoRA adapters only")
        if layer.merged:
            raise CompositionError(f"LoRA layer '{path}' is merged; unmerge() it before attaching a fusion")
    generator = torch.Generator().manual_seed(seed)
    fusions = {
        path: FusionLayer(base_features(layer.base_layer)[1], config.temperature, generator=generator,
                          dtype=adapter_dtype(layer.base_layer), device=execution_device(layer.base_layer))
        for path, layer in layers.items()
    }
    if state is not None:
        load_fusion_state(model, fusions, state, where="module '{}'")
    set_active_adapters(model, config.members)  # checks its own errors before changing anything
    for path, layer in layers.items():
        layer.set_fusion(fusions[path], tuple(config.members))
    remember_fusion(model, name, config)


def attached_fusion(model: nn.Module) -> tuple[str, FusionConfig] | None:
    """(name, config) of the fusion attached to `model` (over LoRA or bottleneck adapters), or None."""
    record = getattr(model, "_compose_fusion", None)
    if record is None or not _fused_modules(model):  # detaching a member adapter takes the fusion off its modules
        model._compose_fusion = None
        return None
    return record["name"], record["config"]


def detach_fusion(model: nn.Module) -> nn.Module:
    """Take the fusion off `model` (its members stay attached and active, so they stack again) and return it."""
    for _, module in _fused_modules(model):
        module.set_fusion(None)
    model._compose_fusion = None
    return model


def fusion_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fusion's tensors keyed as its attach function takes them (`<module path>.fusion.query.weight`, ...;
    for bottleneck sites `<layer>.<location>.fusion.query.weight`, ...).

    Raises:
        CompositionError: no fusion is attached.
    """
    return {f"{path}.fusion.{key}": t.detach().clone() for path, module in _require(model) for key, t in module.fusion.state_dict().items()}


def fusion_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The fusion's trainable tensors (Q, K, V of every fused module), with gradients on."""
    params = [p for _, module in _require(model) for p in module.fusion.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def fusion_regularization(model: nn.Module) -> torch.Tensor:
    """Σ over fused modules of ‖I − V‖²_F (0 for an untrained fusion)."""
    return sum(module.fusion.value_regularization() for _, module in _require(model))


def record_attention(model: nn.Module, enabled: bool = True) -> None:
    """Start (clearing earlier records) or stop recording how much attention each member receives."""
    for _, module in _require(model):
        module.fusion.record = enabled
        if enabled:
            module.fusion.attention_sum, module.fusion.attention_count = None, 0


def fusion_attention(model: nn.Module) -> dict[str, float]:
    """Mean attention per member over every position and fused module recorded since `record_attention`.

    The values sum to 1. Positions include padding: record on unpadded batches (or accept the blur).

    Raises:
        CompositionError: no fusion is attached, or nothing was recorded.
    """
    recorded = [module.fusion for _, module in _require(model) if module.fusion.attention_count]
    if not recorded:
        raise CompositionError("no fusion attention recorded; call record_attention(model) and run the model on some data first")
    mean = sum(f.attention_sum.cpu() for f in recorded) / sum(f.attention_count for f in recorded)  # modules may sit on several devices
    return dict(zip(attached_fusion(model)[1].members, mean.tolist()))


def prune_fusion(model: nn.Module, keep: list[str]) -> None:
    """Keep only the members in `keep` (in the fusion's order): each fused module attends over them alone.

    Q, K, V are shared by all members, so nothing else changes: the result equals a fusion of the kept
    members with the same tensors. Their recorded attention is kept too; the others' is dropped. Exactly
    the kept members are active afterwards (so they alone stack after `detach_fusion`).

    Raises:
        CompositionError: no fusion is attached, `keep` is empty, or names a non-member.
    """
    fused = _require(model)
    name, config = attached_fusion(model)
    strangers = [k for k in keep if k not in config.members]
    if strangers or not keep:
        raise CompositionError(f"keep {list(keep)} must be a non-empty subset of the members of fusion '{name}': {config.members}")
    kept = [m for m in config.members if m in keep]
    index = torch.tensor([config.members.index(m) for m in kept])
    (set_active_bottlenecks if _kind(fused) == "bottleneck" else set_active_adapters)(model, kept)
    for _, module in fused:
        module.set_fusion(module.fusion, tuple(kept))
        if module.fusion.attention_sum is not None:
            module.fusion.attention_sum = module.fusion.attention_sum[index.to(module.fusion.attention_sum.device)]
    remember_fusion(model, name, config.model_copy(update={"members": kept}))


def check_no_fusion(model: nn.Module) -> None:
    """Refuse a second fusion (of either kind): an attach function calls this before anything else.

    Raises:
        CompositionError: a fusion is attached.
    """
    attached = attached_fusion(model)
    if attached is not None:
        raise CompositionError(f"{_kind(_fused_modules(model))} fusion '{attached[0]}' is already attached; detach_fusion(model) first")


def remember_fusion(model: nn.Module, name: str, config: FusionConfig) -> None:
    """Record the fusion its attach function has just installed (what `attached_fusion` returns)."""
    model._compose_fusion = {"name": name, "config": config}


def load_fusion_state(model: nn.Module, fusions: dict[str, FusionLayer], state: dict[str, torch.Tensor], *, where: str) -> None:
    """Copy `state` into the fresh `fusions` ({module path: layer}) after checking it covers them exactly.

    Keys are `<module path>.fusion.<tensor>`, the path resolved as adapters' are (`compose.modules.resolve_path`).
    `where` is how errors name a fused module, its first word the kind: "module '{}'" or "site {}".

    Raises:
        CompositionError: a tensor names no module in `fusions`, a module's tensors are missing or extra,
            or a shape does not fit.
    """
    noun = where.split()[0]
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, sep, param = key.rpartition(".fusion.")
        path = resolve_path(model, module) if sep else None
        if path not in fusions:
            raise CompositionError(f"fusion tensor '{key}' names no {noun} this fusion covers ({_few(list(fusions))}); it was trained for other adapters or another model")
        grouped.setdefault(path, {})[param] = tensor
    for path, fusion in fusions.items():
        expected = fusion.state_dict()
        found = grouped.get(path, {})
        if found.keys() != expected.keys():
            raise CompositionError(f"{where.format(path)}: fusion state has {sorted(found)}, expected {sorted(expected)}; the fusion was trained for other adapters or another model")
        for param, t in found.items():
            if t.shape != expected[param].shape:
                raise CompositionError(f"{where.format(path)}: fusion tensor {param} has shape {tuple(t.shape)}, expected {tuple(expected[param].shape)}; the fusion was trained for another model")
    for path, fusion in fusions.items():
        fusion.load_state_dict(grouped[path])  # copies into the fusion's dtype and device


def _fused_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module whose `fusion` child is a FusionLayer, with its path (a wrapper around one is not counted twice)."""
    modules = dict(model.named_modules())
    return [(path, m) for path, m in modules.items() if isinstance(modules.get(f"{path}.fusion" if path else "fusion"), FusionLayer)]


def _require(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if attached_fusion(model) is None:
        raise CompositionError("no fusion is attached to this model; attach_fusion(model, ...) first")
    return _fused_modules(model)


def _kind(fused: list[tuple[str, nn.Module]]) -> str:
    """'bottleneck' or 'LoRA': which adapters a fusion's modules fuse (one kind per fusion)."""
    return "bottleneck" if isinstance(fused[0][1], BottleneckSite) else "LoRA"


def _few(paths: list[str]) -> str:
    """Up to four paths, else the first two, the last and the count (errors stay one readable line)."""
    return ", ".join(paths) if len(paths) <= 4 else f"{paths[0]}, {paths[1]}, ..., {paths[-1]} ({len(paths)})"
