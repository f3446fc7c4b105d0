"""Weight-delta adapters (LoHa, LoKr, VeRA): the layer, attach/detach, merge, and conversion to LoRA.

Each of these methods changes a Linear or GPT-2 Conv1D by a weight delta ΔW (out, in) that its own tensors
build. A method folder supplies its config (whose `tensor_shapes` says what the adapter stores, and `title`
its name in messages) and its adapter module (a `DeltaAdapter`: its tensors, `delta_weight()` and the forward
x·ΔWᵀ); the rest is here once, as PEFT's `lycoris_utils` is for LoHa and LoKr:

    forward   y = base(x) + Σ x·ΔWᵢᵀ      over the module's attached adapters, whatever their method
    merge     W ← W + Σ ΔWᵢ               (in place; unmerge subtracts them again)
    to LoRA   ΔW ≈ B·A                     by a truncated SVD, as PEFT's `convert_to_lora`

A module that already carries a LoRA layer is wrapped as it is (PEFT's mixed models nest the same way), so
the deltas add to the LoRA adapters'. Every attached delta adapter is active. The model remembers them
({name: config}, in attach order) in `model._compose_delta`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compose.devices import execution_device, offloaded
from compose.errors import CompositionError
from compose.heads import Delegating, SavedModule, attach_heads, detach_heads, prepare_heads, resolve_module
from compose.lora.config import LoraConfig
from compose.lora.layer import LoraLayer, adapter_dtype, base_features, base_kind
from compose.lora.lowrank import split_factors
from compose.modules import get_module, replace_module


class DeltaAdapter(nn.Module):
    """One adapter's tensors at one module (`tensors`, named as in PEFT's files without the module path)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.tensors = nn.ParameterDict({k: nn.Parameter(t, requires_grad=False) for k, t in tensors.items()})

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    def delta_weight(self) -> torch.Tensor:
        """ΔW as (out, in), in the adapter's dtype."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x·ΔWᵀ from the dense ΔW, as PEFT's LoHa and LoKr layers compute it."""
        return F.linear(x, self.delta_weight())


class DeltaLayer(Delegating):
    """Wraps a Linear, GPT-2 Conv1D, or a LoRA layer over one (`base_layer`), and adds its adapters' deltas."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        inner = base_layer.base_layer if isinstance(base_layer, LoraLayer) else base_layer
        self.kind = base_kind(inner)
        self.adapters = nn.ModuleDict()
        self.merged: list[str] = []  # adapters folded into the base weight, in merge order

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name, ad in self.adapters.items():
            if name not in self.merged:
                result = result + ad(x.to(ad.dtype))
        return result.to(out_dtype)

    def base_weight(self) -> torch.Tensor:
        """W as (out, in): a view of the base's weight, so writes reach it."""
        weight = self.base_layer.weight  # through a LoRA layer too: it delegates `weight` to its base
        return weight.T if self.kind == "conv1d" else weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every unmerged adapter's ΔW into the base weight, so they no longer run in the forward. In place in the
        weight's dtype, ΔW not cast first: PEFT's rounding over half-precision bases.

        Into a copy first, stored as the weight's data (tied parameters follow), as `LoraLayer.merge` does:
        writing into a weight transformers maps from the file would fault its pages in one by one.
        """
        todo = [n for n in self.adapters if n not in self.merged]
        if not todo:
            return
        weight = self.base_weight().clone()
        for name in todo:
            weight += self.adapters[name].delta_weight()
            self.merged.append(name)
        self.base_layer.weight.data = weight.T if self.kind == "conv1d" else weight

    @torch.no_grad()
    def unmerge(self, names: set[str] | None = None) -> None:
        """Subtract the merged adapters `names` (None: all) from the base weight again, in place (exact up to float rounding)."""
        weight = self.base_weight()
        for name in reversed(list(self.merged)):
            if names is None or name in names:
                weight -= self.adapters[name].delta_weight()
                self.merged.remove(name)


def split_state(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The adapter's tensors grouped by module ({module: {name: tensor}} for names starting with `prefix`, e.g.
    'hada_'; a top-level tensor such as VeRA's `vera_A` under module ''), and the others (`modules_to_save` copies)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, name = key.rpartition(".")
        if name.startswith(prefix):
            modules.setdefault(module, {})[name] = tensor
        else:
            full[key] = tensor
    return modules, full


def find_targets(model: nn.Module, keys: list[str], title: str) -> dict[str, tuple[str, nn.Module]]:
    """{module key as the adapter names it: (its path in `model`, the Linear/Conv1D it adapts)}; model untouched.

    Raises:
        CompositionError: a module is missing, or is not a Linear / GPT-2 Conv1D (a LoRA layer over one may be),
            or a merged delta layer.
    """
    targets = {}
    for key in keys:
        path = resolve_module(model, key)
        module = get_module(model, path)
        if isinstance(module, DeltaLayer):
            if module.merged:
                raise CompositionError(f"module '{path}' has merged adapters; unmerge_deltas(model) before attaching {title} adapters")
            module = module.base_layer
        inner = module.base_layer if isinstance(module, LoraLayer) else module
        if base_kind(inner) not in ("linear", "conv1d"):
            raise CompositionError(f"module '{path}' is a {type(inner).__name__}; {title} supports Linear and GPT-2 Conv1D targets")
        targets[key] = (path, inner)
    return targets


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    """Refuse `tensors` unless their names and shapes are exactly `expected` (from the config's `tensor_shapes`).

    Raises:
        CompositionError: one line naming the first missing, unexpected or misshapen tensor, and `what` it is for.
    """
    shape = lambda k: tuple(tensors[k].shape)  # noqa: E731
    missing = sorted(expected.keys() - tensors.keys())
    if missing:
        raise CompositionError(f"tensor '{missing[0]}' {expected[missing[0]]} of {what} is missing; the adapter file is incomplete, or its config does not belong to it")
    extra = sorted(tensors.keys() - expected.keys())
    if extra:
        raise CompositionError(f"tensor '{extra[0]}' {shape(extra[0])} is not one {what} stores by its config; the tensors and adapter_config.json do not belong together")
    for key, want in expected.items():
        if shape(key) != want:
            raise CompositionError(
                f"tensor '{key}' of {what} has shape {shape(key)} but its config makes it {want}; the tensors and adapter_config.json "
                "do not belong together, or the adapter was trained for a different model"
            )


def cast_for(base: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as an adapter on `base` holds it: fp32 (fp64 over fp64 bases), on the device the base computes on
    (`compose.devices.execution_device`: an offloaded base's weight is on meta)."""
    return tensor.to(device=execution_device(base), dtype=adapter_dtype(base))


def attach_delta(
    model: nn.Module,
    name: str,
    config,
    state: dict[str, torch.Tensor],
    prefix: str,
    build: Callable[[dict[str, tuple[str, nn.Module]], dict[str, dict[str, torch.Tensor]]], dict[str, DeltaAdapter]],
) -> None:
    """
    Attach adapter `name` of a weight-delta method to `model` in place; a method's `attach_<method>` calls this.

    Args:
        model (`nn.Module`): any transformers model (Linear or GPT-2 Conv1D targets; a LoRA layer over one too).
        name (`str`): the adapter's name, unique among the model's delta adapters.
        config: the method's config; its `tensor_shapes` says which tensors the adapter must hold.
        state (`dict[str, torch.Tensor]`): tensors keyed relative to the model (PEFT keys minus `base_model.model.`).
        prefix (`str`): what the method's tensor names start with ('hada_', 'lokr_', 'vera_').
        build: ({key: (path, base)} of the adapted modules, the checked tensors grouped by module key, top-level
            ones under '') → {path: adapter}.

    Raises:
        [`CompositionError`]: `name` is taken; no tensors; a target or a `modules_to_save` tensor does not fit
            the model; a tensor is missing, extra or misshapen for the config. The model is untouched then.
    """
    title = config.title
    registry = _registry(model)
    if name in registry:
        raise CompositionError(f"adapter '{name}' is already attached ({registry[name].title}); detach it first or choose another name")
    modules, full = split_state(state, prefix)
    if not modules:
        raise CompositionError(f"{title} adapter '{name}' has no '{prefix}*' tensors; check that its state dict was loaded")
    targets = find_targets(model, [k for k in modules if k], title)
    check_tensors(
        {f"{k}.{n}" if k else n: t for k, tensors in modules.items() for n, t in tensors.items()},
        config.tensor_shapes({k: base_features(base) for k, (_, base) in targets.items()}),
        f"{title} adapter '{name}' (r={config.r})",
    )
    adapters = build(targets, modules)
    heads = prepare_heads(model, name, title, full)

    for path, adapter in adapters.items():
        layer = get_module(model, path)
        if not isinstance(layer, DeltaLayer):
            layer = DeltaLayer(layer)
            replace_module(model, path, layer)
        layer.adapters[name] = adapter
    attach_heads(model, name, title, heads)
    registry[name] = config


def detach_delta(model: nn.Module, config_class: type, name: str | None = None) -> nn.Module:
    """
    Take adapter `name` of the method `config_class` configures (None: all of its adapters) off `model` and
    return the model; a method's `detach_<method>` calls this. Merged adapters are unmerged first; modules
    left without adapters get their original objects back.

    Raises:
        [`CompositionError`]: `name` is not an attached adapter of that method.
    """
    registry = _registry(model)
    title = config_class.title
    mine = [n for n, c in registry.items() if isinstance(c, config_class)]
    if name is not None and name not in mine:
        raise CompositionError(f"{title} adapter '{name}' is not attached; attached {title} adapters: {mine}")
    names = set(mine) if name is None else {name}
    for path, m in list(model.named_modules()):
        if isinstance(m, DeltaLayer):
            m.unmerge(names)
            for n in names & set(m.adapters):
                del m.adapters[n]
            if not m.adapters:
                replace_module(model, path, m.base_layer)
    detach_heads(model, names, title)
    for n in names:
        del registry[n]
    return model


def attached_deltas(model: nn.Module) -> dict[str, str]:
    """{adapter name: method} of the delta adapters attached to `model`, in attach order."""
    return {n: c.method for n, c in _registry(model).items()}


def merge_deltas(model: nn.Module) -> None:
    """Fold every attached delta adapter into its base weight, in place, so the model runs as the base alone:
    the weights PEFT's `merge_and_unload` leaves.

    Raises:
        [`CompositionError`]: an adapted module's weights are offloaded by accelerate, so not in memory to change
            (nothing is merged then).
    """
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, DeltaLayer)]
    stuck = [path for path, m in layers if offloaded(m.base_layer)]
    if stuck:
        raise CompositionError(
            f"cannot merge into '{stuck[0]}': accelerate offloaded its weights (device_map with CPU/disk offload); "
            "load the base without offloading to merge, or keep the adapters unmerged"
        )
    for _, m in layers:
        m.merge()


def unmerge_deltas(model: nn.Module) -> None:
    """Undo `merge_deltas`: subtract the deltas again (exact up to float rounding)."""
    for m in model.modules():
        if isinstance(m, DeltaLayer):
            m.unmerge()


def delta_to_lora(delta: torch.Tensor, rank: int | float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """
    LoRA factors of a weight delta by truncated SVD, as PEFT's `convert_to_lora` makes them: B = U·diag(S), A = Vh.

    Args:
        delta (`torch.Tensor`): ΔW (out, in).
        rank (`int` or `float`): the rank kept; a float in (0, 1] keeps the fewest singular values whose squares
            hold that share of the total (PEFT's threshold). An int above min(out, in) pads with zeros.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, float]`: A (rank, in), B (out, rank) with ΔW ≈ B·A, in fp32 at least,
        and the truncation error ‖ΔW − B·A‖_F / ‖ΔW‖_F = √(Σ_{i≥rank} sᵢ² / Σ sᵢ²) (0 for ΔW = 0).
    """
    U, S, Vh = torch.linalg.svd(delta.to(torch.promote_types(delta.dtype, torch.float32)), full_matrices=False)
    energy = S.square()
    if isinstance(rank, float):
        # the smallest k with Σ_{i<k} sᵢ² ≥ rank·Σ sᵢ² (PEFT's _find_cutoff_index)
        rank = int(torch.searchsorted(energy.cumsum(0), rank * energy.sum()).item()) + 1
    A, B = split_factors(U, S, Vh, rank)
    total = energy.sum().item()
    return A, B, (energy[rank:].sum().item() / total) ** 0.5 if total > 0 else 0.0


def convert_to_lora(model: nn.Module, name: str, rank: int | float) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, float]]:
    """
    Attached delta adapter `name` as a LoRA adapter, module by module (`delta_to_lora`), as PEFT's `convert_to_lora`.

    Args:
        model (`nn.Module`): the model the adapter is attached to.
        name (`str`): the adapter.
        rank (`int` or `float`): the LoRA rank, or a float threshold (per-module ranks; see `delta_to_lora`).

    Returns:
        `tuple[LoraConfig, dict[str, torch.Tensor], dict[str, float]]`: a config with scaling 1 at every module
        (lora_alpha = r; per-module ranks as escaped `rank_pattern`/`alpha_pattern` keys), the tensors
        `<module>.lora_A.weight` / `.lora_B.weight` plus the adapter's `modules_to_save` copies (keyed as
        `attach_lora` takes them), and each module's truncation error ‖ΔW − B·A‖_F / ‖ΔW‖_F.

    Raises:
        [`CompositionError`]: `name` is not an attached delta adapter; `rank` is not positive, or a float above 1.
    """
    if name not in _registry(model):
        raise CompositionError(f"'{name}' is not an attached LoHa/LoKr/VeRA adapter; attached: {list(_registry(model))}")
    if rank <= 0 or (isinstance(rank, float) and rank > 1):
        raise CompositionError(f"rank {rank!r} makes no LoRA; give a positive int, or a float in (0, 1] to keep that share of each ΔW's energy")
    state, ranks, errors, saved = {}, {}, {}, []
    for path, m in model.named_modules():
        if isinstance(m, DeltaLayer) and name in m.adapters:
            A, B, errors[path] = delta_to_lora(m.adapters[name].delta_weight(), rank)
            state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = A, B
            ranks[path] = A.shape[0]
        elif isinstance(m, SavedModule) and m.copy is not None and m.active == name:
            state |= {f"{path}.{n}": t.detach().clone() for n, t in m.copy.state_dict().items()}
            saved.append(path)
    r = rank if isinstance(rank, int) else max(ranks.values())
    other = {re.escape(p): k for p, k in ranks.items() if k != r}
    config = LoraConfig(r=r, lora_alpha=r, rank_pattern=other, alpha_pattern=dict(other), target_modules=sorted(ranks), modules_to_save=saved)
    return config, state, errors


def _registry(model: nn.Module) -> dict:
    if getattr(model, "_compose_delta", None) is None:
        model._compose_delta = {}
    return model._compose_delta
