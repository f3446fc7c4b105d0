"""Finding and swapping sub-modules of a model by dotted path.

Adapters name modules relative to the model they were trained on. Loading an adapter trained on
`LlamaForCausalLM` onto a bare `LlamaModel` (or the other way round) shifts every path by the
model's `base_model_prefix` ("model." here), so `resolve_path` tries that shift too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def get_module(model: "nn.Module", path: str) -> "nn.Module | None":
    """The sub-module at dotted `path` (`""` is the model itself), or None if there is none."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def resolve_path(model: "nn.Module", path: str) -> str | None:
    """The path in `model` of the module an adapter calls `path`, or None if there is none.

    Tries `path` as given, then with the model's `base_model_prefix` removed (adapter trained on a
    head model, loaded onto the bare model) or added (the other way round).

    Args:
        model: the model the adapter is being attached to.
        path: the module path as the adapter's tensor names spell it, e.g. `model.layers.0.mlp.up_proj`.
    """
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [path]
    if prefix:
        head = prefix + "."
        candidates.append(path[len(head):] if path.startswith(head) else head + path)
    for candidate in candidates:
        if candidate and get_module(model, candidate) is not None:
            return candidate
    return None


def replace_module(model: "nn.Module", path: str, new: "nn.Module") -> "nn.Module":
    """Put `new` at dotted `path` in `model` and return the module that was there."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old
