"""Attach bottleneck adapters to a transformers model, stack them, and take them off again.

Each layer gets a `BottleneckSite` child per location it adapts (`<layer>.mh_adapter`,
`<layer>.output_adapter`); the model's own modules are not replaced, so LoRA/IA3 paths still
resolve. Forward hooks feed a site (see `compose.families`):

- post-LN: a hook on `<out>.dropout` keeps h; a hook on `<out>` replaces LN(h + x) by the site's result;
- pre-LN: a pre-hook on the norm in front of the sub-layer keeps x; a hook on the sub-layer replaces h.

State keys are `<layer path>.<location>.<tensor>`, e.g. `model.layers.0.output_adapter.adapter_down.weight`
(tensors: adapter_down / adapter_up / adapter_norm_before / adapter_norm_after / gate `.weight`/`.bias`,
and `scaling` for a trained scaling). All attached bottleneck adapters run, as AdapterHub's
`Stack(...)` in attach order; `set_active_bottlenecks` picks and orders them. The model remembers
them in `model._compose_bottleneck`.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch
from torch import nn

from compose.bottleneck.config import LOCATIONS, BottleneckConfig
from compose.bottleneck.layer import (
    Bottleneck,
    BottleneckSite,
    activation,
    expected_shapes,
)
from compose.devices import execution_device
from compose.errors import CompositionError
from compose.families import Family, detect_family
from compose.modules import resolve_path

_KEY = re.compile(rf"^(?P<layer>.+)\.(?P<location>{'|'.join(LOCATIONS)})\.(?P<tensor>[^.]+(?:\.(?:weight|bias))?)$")


@dataclass
class BottleneckPlan:
    """A checked adapter, ready to install: its tensors per (layer path, location)."""

    name: str
    config: BottleneckConfig
    family: Family
    tensors: dict[tuple[str, str], dict[str, torch.Tensor]]


def attach_bottleneck(model: nn.Module, name: str, config: BottleneckConfig, state: dict[str, torch.Tensor]) -> None:
    """
    Attach bottleneck adapter `name` to `model` in place; it runs at once, after those already attached.

    Args:
        model (`nn.Module`): a transformers model whose layers fit a row of `compose.families`
            (BERT-style post-LN, GPT-2 or Llama-style pre-LN), with or without a head.
        name (`str`): the adapter's name, unique among the model's bottleneck adapters.
        config ([`BottleneckConfig`]): AdapterHub's options (sites, width, wiring).
        state (`dict[str, torch.Tensor]`): `<layer path>.<mh_adapter|output_adapter>.<tensor>`, for every layer
            and site the config adapts (layer paths may differ from the model's by its base_model_prefix).

    Raises:
        [`CompositionError`]: `name` is taken; the model fits no family; a tensor names no layer or site, is
            missing, extra or mis-shaped for the config; the activation is unknown.
    """
    install_bottleneck(model, plan_bottleneck(model, name, config, state), owner="bottleneck")


def plan_bottleneck(model: nn.Module, name: str, config: BottleneckConfig, state: dict[str, torch.Tensor]) -> BottleneckPlan:
    """Check adapter `name` against `model` without touching it (`attach_bottleneck` = this + `install_bottleneck`)."""
    if name in registry(model)["adapters"]:
        raise CompositionError(f"bottleneck adapter '{name}' is already attached; detach it first or choose another name")
    family, layers = detect_family(model)
    if not family.post_ln and config.residual_before_ln == "post_add":
        raise CompositionError(f"adapter '{name}': residual_before_ln='post_add' needs a post-LN model (AdapterHub fails on {family.name}-style layers)")
    activation(config.non_linearity)
    hidden = model.config.get_text_config().hidden_size
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        path = match and resolve_path(model, match["layer"])
        if path not in layers:
            raise CompositionError(
                f"tensor '{key}' of adapter '{name}' is not <layer>.<mh_adapter|output_adapter>.<tensor> for a layer of "
                f"{type(model).__name__} (layers: {layers[0]} ... {layers[-1]}); the adapter was made for another model"
            )
        grouped.setdefault((path, match["location"]), {})[match["tensor"]] = tensor
    for index, path in enumerate(layers):
        for location in LOCATIONS:
            wanted = getattr(config, location) and index not in config.leave_out
            found = grouped.get((path, location))
            if wanted != (found is not None):
                why = "the config adapts it" if wanted else f"{location}={getattr(config, location)}, leave_out={config.leave_out}"
                raise CompositionError(f"adapter '{name}' {'lacks' if wanted else 'has'} tensors for {path}.{location} but {why}; the config and tensors disagree")
            if found is None:
                continue
            expected = expected_shapes(config, index, hidden)
            if found.keys() != expected.keys():
                raise CompositionError(f"adapter '{name}' at {path}.{location} has tensors {sorted(found)}, expected {sorted(expected)} for its config")
            for tensor, shape in expected.items():
                if tuple(found[tensor].shape) != shape:
                    raise CompositionError(
                        f"adapter '{name}': {path}.{location}.{tensor} has shape {tuple(found[tensor].shape)}, expected {shape} "
                        f"(hidden {hidden}, reduction_factor {config.reduction_factor}); the adapter was made for another model or config"
                    )
    for path, location in grouped:
        child = getattr(model.get_submodule(path), location, None)
        if child is not None and not isinstance(child, BottleneckSite):
            raise CompositionError(f"{path} already has a '{location}' attribute ({type(child).__name__}); cannot place a bottleneck site there")
    return BottleneckPlan(name, config, family, grouped)


def install_bottleneck(model: nn.Module, plan: BottleneckPlan, owner: str) -> None:
    """Install a checked adapter; `owner` is the method it belongs to ('bottleneck', or 'mam' for MAM's adapter)."""
    reg = registry(model, create=True)
    for (path, location), tensors in plan.tensors.items():
        layer = model.get_submodule(path)
        site = getattr(layer, location, None)
        if site is None:
            parameter = next(layer.parameters())
            site = BottleneckSite(plan.family.post_ln, torch.float64 if parameter.dtype == torch.float64 else torch.float32)
            layer.add_module(location, site)
            site.handles = _hook(layer, plan.family, location, site)
        site.adapters[plan.name] = Bottleneck(plan.config, tensors, site.dtype).to(execution_device(layer))
    reg["adapters"][plan.name] = (plan.config, owner)
    set_active_bottlenecks(model, reg["active"] + [plan.name])


def detach_bottleneck(model: nn.Module, name: str | None = None) -> nn.Module:
    """
    Take bottleneck adapter `name` (None: all bottleneck adapters, not MAM's) off `model` and return it. A fusion
    over it goes too; sites left empty go with their hooks, so the model is exactly as before.

    Raises:
        [`CompositionError`]: `name` is not attached, or belongs to a MAM adapter (use `detach_mam`).
    """
    adapters = registry(model)["adapters"]
    if name is not None and name not in adapters:
        raise CompositionError(f"bottleneck adapter '{name}' is not attached; attached: {list(adapters)}")
    if name is not None and adapters[name][1] != "bottleneck":
        raise CompositionError(f"adapter '{name}' is the parallel adapter of a {adapters[name][1]} adapter; detach it with detach_{adapters[name][1]}")
    remove_bottlenecks(model, [n for n, (_, owner) in adapters.items() if owner == "bottleneck" and name in (None, n)])
    return model


def remove_bottlenecks(model: nn.Module, names: list[str]) -> None:
    """Take adapters `names` (any owner) off every site; empty sites and registries go."""
    reg = registry(model)
    for path, site in sites(model):
        for n in names:
            if n in site.adapters:
                del site.adapters[n]
                if n in site.fused:
                    site.set_fusion(None)
        site.active = tuple(n for n in site.active if n in site.adapters)
        if not len(site.adapters):
            for handle in site.handles:
                handle.remove()
            layer_path, _, location = path.rpartition(".")
            delattr(model.get_submodule(layer_path), location)
    for n in names:
        reg["adapters"].pop(n, None)
    reg["active"] = [n for n in reg["active"] if n in reg["adapters"]]
    if not reg["adapters"] and hasattr(model, "_compose_bottleneck"):
        del model._compose_bottleneck


def set_active_bottlenecks(model: nn.Module, names: list[str]) -> None:
    """Run the bottleneck adapters `names`, in that order, at every site that has them (AdapterHub's Stack).

    Raises:
        [`CompositionError`]: a name is not attached, or is listed twice.
    """
    reg = registry(model)
    unknown = [n for n in names if n not in reg["adapters"]]
    if unknown or len(set(names)) != len(names):
        raise CompositionError(f"active bottleneck adapters {names} must be distinct attached ones; attached: {list(reg['adapters'])}")
    reg["active"] = list(names)
    for _, site in sites(model):
        site.active = tuple(n for n in names if n in site.adapters)


def attached_bottlenecks(model: nn.Module) -> dict[str, BottleneckConfig]:
    """{name: config} of the bottleneck adapters attached (MAM's included), in attach order."""
    return {n: config for n, (config, _) in registry(model)["adapters"].items()}


def bottleneck_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors keyed as `attach_bottleneck` takes them.

    Raises:
        [`CompositionError`]: `name` is not attached.
    """
    if name not in attached_bottlenecks(model):
        raise CompositionError(f"bottleneck adapter '{name}' is not attached; attached: {list(attached_bottlenecks(model))}")
    return {f"{path}.{k}": t.detach().clone() for path, site in sites(model) if name in site.adapters for k, t in site.adapters[name].state_dict().items()}


def sites(model: nn.Module) -> list[tuple[str, BottleneckSite]]:
    """Every bottleneck site of `model` with its path (`<layer>.<location>`)."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, BottleneckSite)]


def registry(model: nn.Module, create: bool = False) -> dict:
    """{"adapters": {name: (config, owner)}, "active": [names]}; an empty one
    (not stored on the model unless `create`) when nothing is attached."""
    reg = getattr(model, "_compose_bottleneck", None)
    if reg is None:
        reg = {"adapters": {}, "active": []}
        if create:
            model._compose_bottleneck = reg
    return reg


def _hook(layer: nn.Module, family: Family, location: str, site: BottleneckSite) -> list:
    """Feed `site` from `layer`'s own modules; returns the hook handles."""
    spot = family.sites[location]
    module = layer.get_submodule(spot.module)
    if family.post_ln:
        norm = layer.get_submodule(spot.norm)
        x_name = list(inspect.signature(module.forward).parameters)[1]  # `input_tensor` in BERT

        def keep_h(_, args, output):
            site.captured["h"] = output

        def replace(_, args, kwargs, output):
            h = site.captured.pop("h", None)
            if h is None or not site.runs():
                return None
            return site(h, args[1] if len(args) > 1 else kwargs[x_name], norm)

        return [layer.get_submodule(spot.hidden).register_forward_hook(keep_h), module.register_forward_hook(replace, with_kwargs=True)]

    def keep_x(_, args, kwargs):
        site.captured["x"] = args[0] if args else next(iter(kwargs.values()))

    def replace_pre(_, args, output):
        x = site.captured.pop("x", None)
        if x is None or not site.runs():
            return None
        if isinstance(output, tuple):  # attention returns (output, weights)
            return (site(output[0], x, None), *output[1:])
        return site(output, x, None)

    return [layer.get_submodule(spot.residual).register_forward_pre_hook(keep_x, with_kwargs=True), module.register_forward_hook(replace_pre)]
