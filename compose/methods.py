"""Every adapter method the engine implements, by the `method` name its config carries.

One table maps a method to its folder; `attach`/`detach` dispatch on `config.method`, so callers
(`zoo.load`, compositions) handle a LoRA, an IA3 vector set or a prefix the same way. Config classes
are torch-free and imported eagerly; the model code (torch) only when something is attached.

    >>> from compose.methods import attach
    >>> attach(model, "sql", config, state)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from compose.adalora.config import AdaLoraConfig
from compose.bottleneck.config import BottleneckConfig
from compose.errors import CompositionError
from compose.ia3.config import IA3Config
from compose.lora.config import LoraConfig
from compose.mam.config import MamConfig
from compose.prefix.config import PrefixConfig
from compose.prompt.config import PromptConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

#: method name → (config class, the folder whose model.py has attach_<stem>/detach_<stem>, stem)
METHODS: dict[str, tuple[type, str, str]] = {
    "lora": (LoraConfig, "compose.lora", "lora"),
    "adalora": (AdaLoraConfig, "compose.adalora", "adalora"),
    "ia3": (IA3Config, "compose.ia3", "ia3"),
    "prompt": (PromptConfig, "compose.prompt", "prompt"),
    "ptuning": (PromptConfig, "compose.prompt", "prompt"),
    "prefix": (PrefixConfig, "compose.prefix", "prefix"),
    "bottleneck": (BottleneckConfig, "compose.bottleneck", "bottleneck"),
    "mam": (MamConfig, "compose.mam", "mam"),
}

#: What acts where, which decides what composes with what (docs/methods.md has the table).
HOW_IT_ACTS = {
    "lora": "adds a low-rank weight delta", "adalora": "adds a low-rank weight delta (SVD form)",
    "ia3": "scales activations by learned vectors", "prompt": "prepends virtual token embeddings to the input",
    "ptuning": "prepends virtual token embeddings to the input", "prefix": "prepends virtual keys/values in every layer",
    "bottleneck": "inserts a small MLP after attention and/or the feed-forward block",
    "mam": "prepends virtual keys/values and runs a parallel MLP beside the feed-forward block",
}
#: A weight delta (or scale) can be folded into the base weights.
MERGEABLE = frozenset({"lora", "adalora", "ia3"})
#: AdapterFusion attends over per-layer adapter outputs (MAM: its parallel adapter's).
FUSABLE = frozenset({"lora", "adalora", "bottleneck", "mam"})
#: Weighted sums: one LoRA from LoRA-form adapters, or one IA3 vector set from IA3 adapters.
WEIGHTABLE = (frozenset({"lora", "adalora"}), frozenset({"ia3"}))
#: AdapterDrop needs adapters that live in a layer.
DROPPABLE = frozenset({"lora", "adalora", "ia3", "bottleneck", "mam"})


def _functions(method: str):
    if method not in METHODS:
        raise CompositionError(f"unknown adapter method {method!r}; known: {', '.join(METHODS)}")
    _, package, stem = METHODS[method]
    module = importlib.import_module(f"{package}.model")
    return getattr(module, f"attach_{stem}"), getattr(module, f"detach_{stem}")


def attach(model: nn.Module, name: str, config, state: dict[str, torch.Tensor]) -> None:
    """Attach adapter `name` of any method to `model` in place, active alongside the others.

    Raises:
        CompositionError: `name` is already attached (by any method), or the method's own checks fail.
    """
    owners = _owners(model)
    if name in owners:
        raise CompositionError(f"adapter '{name}' is already attached ({owners[name]}); detach it first or choose another name")
    attach_fn, _ = _functions(config.method)
    attach_fn(model, name, config, state)
    owners[name] = config.method


def detach(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take adapter `name` (None: every adapter of every method) off `model`; returns the model."""
    owners = _owners(model)
    if name is not None and name not in owners:
        raise CompositionError(f"adapter '{name}' is not attached; attached: {list(owners)}")
    for n, method in list(owners.items()):
        if name in (None, n):
            _functions(method)[1](model, n)
            del owners[n]
    return model


def check_composition(adapters: list[tuple[str, str]], *, fusion: str | None = None, merge: bool = False, drop: int = 0) -> None:
    """Refuse, in one line, a composition that makes no sense for the methods of `adapters` ([(name, method)]).

    >>> check_composition([("p", "prefix")], merge=True)
    Traceback (most recent call last):
    compose.errors.CompositionError: cannot merge prefix adapter 'p' into the weights: it prepends virtual keys/values in every layer, not a weight change; load it unmerged
    """
    for name, method in adapters:
        what = f"{method} adapter '{name}'"
        if merge and method not in MERGEABLE:
            raise CompositionError(f"cannot merge {what} into the weights: it {HOW_IT_ACTS[method]}, not a weight change; load it unmerged")
        if fusion == "attention" and method not in FUSABLE:
            raise CompositionError(f"cannot fuse {what} with attention: it {HOW_IT_ACTS[method]}, so it has no per-layer output to attend over; stack it instead")
        if drop and method not in DROPPABLE:
            raise CompositionError(f"AdapterDrop cannot skip {what} in the lower layers: it {HOW_IT_ACTS[method]}; load it without drop")
    if fusion == "weighted":
        methods = {method for _, method in adapters}
        if not any(methods <= group for group in WEIGHTABLE):
            raise CompositionError(
                f"a weighted sum combines LoRA/AdaLoRA adapters into one LoRA, or IA3 adapters into one IA3 vector set; got {', '.join(f'{n} ({m})' for n, m in adapters)}"
            )


def attach_fusion(model: nn.Module, name: str, config, state: dict[str, torch.Tensor] | None = None, *, seed: int = 0) -> None:
    """An AdapterFusion over attached adapters `config.members`: over LoRA-form adapters per adapted
    module (`compose.fusion`), over bottleneck adapters per adapter site (`compose.bottleneck.fusion`).

    Raises:
        CompositionError: a member is not attached through `attach`, or the members mix the two kinds.
    """
    owners = _owners(model)
    missing = [m for m in config.members if m not in owners]
    if missing:
        raise CompositionError(f"fusion '{name}': members {missing} are not attached (attached: {list(owners)})")
    methods = {owners[m] for m in config.members}
    check_composition([(m, owners[m]) for m in config.members], fusion="attention")
    if methods <= {"lora", "adalora"}:
        from compose.fusion.model import attach_fusion as fuse
    elif methods <= {"bottleneck", "mam"}:
        from compose.bottleneck.fusion import attach_bottleneck_fusion as fuse
    else:
        raise CompositionError(f"fusion '{name}' mixes LoRA-form and bottleneck members ({', '.join(f'{m} ({owners[m]})' for m in config.members)}); fuse one kind")
    fuse(model, name, config, state, seed=seed)


def detach_fusion(model: nn.Module) -> nn.Module:
    """Take any AdapterFusion (LoRA-form or bottleneck) off `model`."""
    from compose.fusion.model import detach_fusion as detach_any_fusion

    return detach_any_fusion(model)


def merge(model: nn.Module) -> dict:
    """Fold every attached LoRA-form and IA3 adapter into the base weights, in place. Returns, per
    bitsandbytes module, the extra error of requantizing (`compose.merge.report.QuantError`).

    Raises:
        CompositionError: an adapted module's weights are offloaded by accelerate (`device_map` with CPU or
            disk offload): they are not in memory to change, so nothing is merged.
    """
    from compose.devices import offloaded
    from compose.ia3.layer import IA3Layer
    from compose.ia3.model import merge_ia3
    from compose.lora.layer import LoraLayer

    stuck = [path for path, m in model.named_modules() if isinstance(m, (LoraLayer, IA3Layer)) and offloaded(m.base_layer)]
    if stuck:
        raise CompositionError(
            f"cannot merge into '{stuck[0]}' ({len(stuck)} adapted module(s) in all): accelerate offloaded its weights "
            "(device_map with CPU/disk offload), so they are not in memory to change; load the base without offloading "
            "to merge, or keep the adapters unmerged (they run on offloaded modules as on loaded ones)"
        )
    errors = {path: err for path, m in model.named_modules() if isinstance(m, LoraLayer) and (err := m.merge()) is not None}
    merge_ia3(model)
    return errors


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`: subtract the LoRA deltas and divide the IA3 scales out again."""
    from compose.ia3.model import unmerge_ia3
    from compose.lora.layer import LoraLayer

    unmerge_ia3(model)
    for m in model.modules():
        if isinstance(m, LoraLayer) and m.merged:
            m.unmerge()
    return model


def attached(model: nn.Module) -> dict[str, str]:
    """{adapter name: method} of the adapters attached through `attach`, in attach order."""
    return dict(_owners(model))


def _owners(model: nn.Module) -> dict[str, str]:
    if getattr(model, "_compose_methods", None) is None:
        model._compose_methods = {}
    return model._compose_methods
