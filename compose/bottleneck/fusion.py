"""AdapterFusion over bottleneck adapters, placed as AdapterHub places it.

Every site that holds the members gets a `FusionLayer` (its `fusion` child, so tensors are keyed
`<layer>.<location>.fusion.query.weight` etc.). There the last member's pre-step runs once, every
member's adapter runs on its output, and the fusion attends over their scaled up-projections u:

    query = h (query_before_ln) or the pre-step's output (x for a parallel last member)
    out   = fusion(query, u) + r            (residual_before: fusion(query, u + r))

then the last member's post-step closes the sub-layer (see `compose.bottleneck.layer`). One fusion
per model at a time; it makes exactly its members active, and remembers itself in the model's
bottleneck registry.
"""

from __future__ import annotations

import torch
from torch import nn

from compose.bottleneck.model import registry, set_active_bottlenecks, sites
from compose.errors import CompositionError
from compose.fusion.config import FusionConfig
from compose.fusion.layer import FusionLayer
from compose.modules import resolve_path


def attach_bottleneck_fusion(
    model: nn.Module,
    name: str,
    config: FusionConfig,
    state: dict[str, torch.Tensor] | None = None,
    *,
    seed: int = 0,
    query_before_ln: bool | None = None,
    residual_before: bool | None = None,
) -> None:
    """
    Fuse the attached bottleneck adapters `config.members` (MAM adapters' parallel adapters count) with attention.

    Args:
        model (`nn.Module`): a model with the members attached (`attach_bottleneck` / `attach_mam`).
        name (`str`): the fusion's name.
        config ([`FusionConfig`]): members (order kept) and temperature.
        state (`dict[str, torch.Tensor]`, *optional*): `<layer>.<location>.fusion.{query,key}.{weight,bias}` and
            `.fusion.value.weight` for every fused site (`read_adapterhub_fusion` gives AdapterHub's). Without it the
            fusion starts as the plain average of its members.
        seed (`int`): seeds a fresh fusion's random key projection (ignored with `state`).
        query_before_ln, residual_before (`bool`, *optional*): AdapterHub's placement of the query and residual
            (default: the config's fields of those names if it has them, else False, AdapterHub's defaults).

    Raises:
        [`CompositionError`]: a fusion is already attached; a member is not attached; a site holds only some members;
            `state` misses a site's tensors, names a site the fusion does not cover, or has a wrong shape.
    """
    reg = registry(model)
    if reg["fusion"] is not None:
        raise CompositionError(f"bottleneck fusion '{reg['fusion']['name']}' is already attached; detach_bottleneck_fusion(model) first")
    missing = [m for m in config.members if m not in reg["adapters"]]
    if missing:
        raise CompositionError(f"fusion '{name}': members {missing} are not attached bottleneck adapters (attached: {list(reg['adapters'])})")
    covered = {path: site for path, site in sites(model) if set(config.members) & set(site.adapters)}
    for path, site in covered.items():
        lacking = [m for m in config.members if m not in site.adapters]
        if lacking:
            raise CompositionError(f"site {path} holds fusion members {[m for m in config.members if m in site.adapters]} but not {lacking}; fuse adapters placed at the same sites")
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.get_text_config().hidden_size
    fusions = {path: FusionLayer(hidden, config.temperature, generator=generator, dtype=site.dtype) for path, site in covered.items()}
    if state is not None:
        _load(model, fusions, state)
    options = {
        "query_before_ln": getattr(config, "query_before_ln", False) if query_before_ln is None else query_before_ln,
        "residual_before": getattr(config, "residual_before", False) if residual_before is None else residual_before,
    }
    set_active_bottlenecks(model, config.members)
    for path, site in covered.items():
        device = next(iter(site.adapters.values())).adapter_up.weight.device
        site.set_fusion(fusions[path].to(device), tuple(config.members), **options)
    reg["fusion"] = {"name": name, "config": config}


def attached_bottleneck_fusion(model: nn.Module) -> tuple[str, FusionConfig] | None:
    """(name, config) of the bottleneck fusion attached to `model`, or None."""
    fusion = registry(model)["fusion"]
    return None if fusion is None else (fusion["name"], fusion["config"])


def detach_bottleneck_fusion(model: nn.Module) -> nn.Module:
    """Take the bottleneck fusion off `model` (its members stay attached and active, stacked) and return it."""
    for _, site in sites(model):
        site.set_fusion(None)
    registry(model)["fusion"] = None
    return model


def bottleneck_fusion_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fusion's tensors keyed as `attach_bottleneck_fusion` takes them.

    Raises:
        [`CompositionError`]: no bottleneck fusion is attached.
    """
    if attached_bottleneck_fusion(model) is None:
        raise CompositionError("no bottleneck fusion is attached; attach_bottleneck_fusion(model, ...) first")
    return {f"{path}.fusion.{k}": t.detach().clone() for path, site in sites(model) if site.fusion is not None for k, t in site.fusion.state_dict().items()}


def _load(model: nn.Module, fusions: dict[str, FusionLayer], state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the fresh `fusions` ({site path: layer}) after checking it covers them exactly."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        site, sep, param = key.rpartition(".fusion.")
        layer, _, location = site.rpartition(".")
        path = f"{resolve_path(model, layer)}.{location}" if sep and resolve_path(model, layer) else None
        if path not in fusions:
            raise CompositionError(f"fusion tensor '{key}' names no site this fusion covers ({', '.join(fusions)}); it was trained for other adapters or another model")
        grouped.setdefault(path, {})[param] = tensor
    for path, fusion in fusions.items():
        expected = fusion.state_dict()
        found = grouped.get(path, {})
        if found.keys() != expected.keys():
            raise CompositionError(f"site {path}: fusion state has {sorted(found)}, expected {sorted(expected)}; the fusion was trained for other adapters or another model")
        for param, t in found.items():
            if t.shape != expected[param].shape:
                raise CompositionError(f"site {path}: fusion tensor {param} has shape {tuple(t.shape)}, expected {tuple(expected[param].shape)}; the fusion was trained for another model")
    for path, fusion in fusions.items():
        fusion.load_state_dict({k: t.to(fusion.value.weight.dtype) for k, t in grouped[path].items()})
