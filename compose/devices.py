"""Where a module computes, also on bases that accelerate spreads over devices (`device_map`).

With CPU or disk offload, accelerate keeps an offloaded module's weights outside it (in memory or in
files) and leaves meta tensors in their place; the module's `AlignDevicesHook` loads them onto its
`execution_device` for each forward and drops them again afterwards. An adapter's own tensors belong
on that execution device: placed beside the meta weight they would be meta too, with no values.

    >>> layer = model.get_submodule("model.layers.3.self_attn.q_proj")   # doctest: +SKIP
    >>> execution_device(layer), offloaded(layer)                        # doctest: +SKIP
    (device(type='cpu'), True)
"""

from __future__ import annotations

import torch
from torch import nn


def _hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of accelerate's hook on `module` itself (None without one). Read from `__dict__`:
    a wrapper that delegates look-ups (`compose.heads.Delegating`) must not report its base layer's hook."""
    hook = module.__dict__.get("_hf_hook")
    for h in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)  # an int is an accelerator index, as torch reads it
    return None


def execution_device(module: nn.Module) -> torch.device:
    """The device `module`'s forward computes on: where its first real (non-meta) tensor lives, or, when its
    weights are offloaded, the execution device of the accelerate hook on it or on a sub-module (CPU if none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    for m in module.modules():
        if (device := _hook_device(m)) is not None:
            return device
    return torch.device("cpu")


def offloaded(module: nn.Module) -> bool:
    """Whether some of `module`'s weights are offloaded (meta tensors that accelerate loads at each forward),
    so that nothing in memory can be changed in place, e.g. by a merge."""
    return any(p.device.type == "meta" for p in module.parameters())
