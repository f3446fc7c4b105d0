"""Trained full copies of modules that adapters carry (PEFT's `modules_to_save`, e.g. the classifier head saved
with a SEQ_CLS adapter), for every adapter method.

A module that adapters replace is swapped for a `SavedModule` wrapping the original (`base_layer`); it runs the
copy of its active adapter, else the original. A LoRA adapter's copies run while its active list names it
(`set_active_heads`); another method's (IA3, prompt, prefix) for as long as the adapter is attached. One module
runs one copy: two active adapters that replace it are refused. A module left without copies gets its original
object back. Attaching is two steps, `prepare_heads` (checks, copies; model untouched) then `attach_heads`, so a
method can check everything of an adapter before it changes the model.
"""

from __future__ import annotations

import copy
from collections.abc import Collection

import torch
from torch import nn

from compose.errors import CompositionError
from compose.modules import get_module, replace_module, resolve_path


class Delegating(nn.Module):
    """A wrapper of `self.base_layer` that answers the look-ups it can't (`weight`, `in_features`, ...) from
    `current_module()`, so code that reads e.g. `q_proj.weight.dtype` keeps working.

    Private names stay the wrapped module's own: accelerate marks a module it dispatched with `_hf_hook` /
    `_old_forward`, and a wrapper that answered those would look hooked (removing the hooks then fails on it).
    """

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "base_layer" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self.current_module(), name)

    def current_module(self) -> nn.Module:
        return self.base_layer


class SavedModule(Delegating):
    """A module (e.g. a classifier head) that adapters replace wholesale with trained copies (`modules_to_save`).

    Runs the copy of the `active` adapter, else the original `base_layer`. `copies` holds LoRA adapters' copies
    by name (switched by `set_active_heads`); `copy` the copy of an adapter of another method, which runs while
    that adapter, then `active`, is attached.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.copies = nn.ModuleDict()
        self.copy: nn.Module | None = None
        self.methods: dict[str, str] = {}  # adapter name → its method, for every copy here (messages, detach)
        self.active: str | None = None

    def current_module(self) -> nn.Module:
        if self.copy is not None:
            return self.copy
        return self.base_layer if self.active is None else self.copies[self.active]

    def forward(self, *args, **kwargs):
        return self.current_module()(*args, **kwargs)


def resolve_module(model: nn.Module, key: str) -> str:
    """The path in `model` of the module an adapter calls `key` (`compose.modules.resolve_path`).

    Raises:
        CompositionError: there is none.
    """
    path = resolve_path(model, key)
    if path is None:
        prefix = getattr(model, "base_model_prefix", "")
        raise CompositionError(f"module '{key}' not found in {type(model).__name__} (also tried with/without its base_model_prefix '{prefix}'); the adapter was trained for a different architecture")
    return path


def prepare_heads(model: nn.Module, name: str, method: str, tensors: dict[str, torch.Tensor]) -> list[tuple[str, nn.Module]]:
    """
    Check adapter `name`'s full module tensors against `model` and build its copies; the model is untouched.

    Args:
        model (`nn.Module`): the model the adapter is being attached to.
        name (`str`): the adapter's name.
        method (`str`): its method as messages name it ("LoRA", "IA3", "prompt", "prefix"); `detach_heads` takes it too.
        tensors (`dict[str, torch.Tensor]`): `<module>.<tensor>` keyed relative to the model (e.g. `classifier.weight`):
            per module, exactly its own parameters and persistent buffers.

    Returns:
        `list[tuple[str, nn.Module]]`: (path, copy of the original module holding the tensors, in its dtype and
        on its device) per module, for `attach_heads`.

    Raises:
        [`CompositionError`]: a module is missing, wrapped by another adapter's layer, already replaced by an active
            adapter or holds a copy of another adapter called `name`; the tensors' names or shapes do not fit it.
    """
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        owner, _, field = key.rpartition(".")
        by_module.setdefault(owner, {})[field] = tensor
    return [_make_copy(model, name, method, key, fields) for key, fields in by_module.items()]


def attach_heads(model: nn.Module, name: str, method: str, heads: list[tuple[str, nn.Module]], *, switched: bool = False) -> None:
    """
    Install the copies `prepare_heads` built for adapter `name`.

    Args:
        switched (`bool`): False: they run at once, for as long as the adapter is attached. True (LoRA): they run
            while `set_active_heads` names the adapter.
    """
    for path, module_copy in heads:
        wrapper = get_module(model, path)
        if not isinstance(wrapper, SavedModule):
            wrapper = SavedModule(wrapper)
            replace_module(model, path, wrapper)
        wrapper.methods[name] = method
        if switched:
            wrapper.copies[name] = module_copy
        else:
            wrapper.copy, wrapper.active = module_copy, name


def set_active_heads(model: nn.Module, names: list[str]) -> None:
    """
    Run the switched copies of the adapters in `names` and no other switched copy; copies that are not switched
    keep running.

    Raises:
        [`CompositionError`]: two of `names`, or one of them and an adapter whose copy is not switched, replace the
            same module (checked at every module before any changes).
    """
    wrappers = [(path, m) for path, m in model.named_modules() if isinstance(m, SavedModule)]
    for path, m in wrappers:
        switched = [n for n in names if n in m.copies]
        running = switched + ([m.active] if m.copy is not None else [])
        if len(running) > 1:
            both = " and ".join(f"{m.methods[n]} adapter '{n}'" for n in running)
            fix = f"leave {switched} out of the active adapters or detach '{m.active}' first" if m.copy is not None else "activate only one of them"
            raise CompositionError(f"{both} each replace module '{path}' (modules_to_save); {fix}")
    for _, m in wrappers:
        if m.copy is None:
            m.active = next((n for n in names if n in m.copies), None)


def detach_heads(model: nn.Module, names: Collection[str], method: str) -> None:
    """Remove the copies of `method`'s adapters `names`; a module left without copies gets its original object back."""
    for path, m in list(model.named_modules()):
        if not isinstance(m, SavedModule):
            continue
        for n in [n for n, owner in m.methods.items() if n in names and owner == method]:
            del m.methods[n]
            if n in m.copies:
                del m.copies[n]
            else:
                m.copy = None
            m.active = None if m.active == n else m.active
        if not m.methods:
            replace_module(model, path, m.base_layer)


def _make_copy(model: nn.Module, name: str, method: str, key: str, tensors: dict[str, torch.Tensor]) -> tuple[str, nn.Module]:
    """A copy of module `key` holding adapter `name`'s tensors, checked against the model (model untouched)."""
    path = resolve_module(model, key)
    module = get_module(model, path)
    if isinstance(module, SavedModule) and name in module.methods:
        raise CompositionError(f"module '{path}' (modules_to_save) already holds a copy of {module.methods[name]} adapter '{name}'; attach the {method} adapter under another name")
    if isinstance(module, SavedModule) and module.active is not None:
        other = module.active
        fix = f"deactivate '{other}' with set_active_adapters or detach it first" if other in module.copies else f"detach '{other}' first"
        raise CompositionError(f"module '{path}' (modules_to_save) is already replaced by {module.methods[other]} adapter '{other}', so {method} adapter '{name}' cannot replace it too; {fix}")
    if isinstance(module, Delegating) and not isinstance(module, SavedModule):
        raise CompositionError(f"module '{path}' is wrapped by {type(module).__name__} (another adapter adapts it) and cannot also be replaced (modules_to_save); detach that adapter first")
    original = module.base_layer if isinstance(module, SavedModule) else module
    own = dict(original.named_parameters(recurse=False))
    own.update((n, b) for n, b in original.named_buffers(recurse=False) if n not in original._non_persistent_buffers_set)
    if set(tensors) != set(own):
        raise CompositionError(f"module '{path}' (modules_to_save): the adapter has tensors {sorted(tensors)} but the module has {sorted(own)}")
    for n, t in tensors.items():
        if t.shape != own[n].shape:
            raise CompositionError(f"module '{path}.{n}' (modules_to_save): shape {tuple(t.shape)} does not fit the model's {tuple(own[n].shape)}; the adapter was trained with a different head (e.g. num_labels)")
    module_copy = copy.deepcopy(original)
    with torch.no_grad():
        for n, t in tensors.items():
            getattr(module_copy, n).copy_(t)  # keeps the original's dtype and device
    return path, module_copy
