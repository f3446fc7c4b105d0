"""Multi-task inference with a shared trunk: AdapterDrop's speed-up (Rücklé et al., EMNLP 2021, §4).

T tasks, each a LoRA adapter, run on the same input. With the adapters dropped from the first k layers
(`compose.drop`), those layers compute the same thing for every task, so they run once on the batch;
at layer k the batch is copied T times and copy t runs task t's adapter from there on (AdapterHub's
`Parallel` block). Time goes from T·L layer-batches to k + T·(L − k): the paper reports 39% faster
inference with 8 tasks when the first 5 of 12 layers are dropped.

`enable_parallel(model, names, k)` sets drop k, stacks the adapters for per-row use
(`compose.lora.mixed`) and hooks the model:

- a forward pre-hook on each layer ≥ k repeats every tensor argument whose first dimension is the
  batch size B (hidden states, attention mask, rotary cos/sin, ...) T times, as [x; x; …; x], and at
  layer k gives row t·B + b adapter t;
- with k = L the output of the last layer is repeated instead (only modules after the layers, such as a
  head, can then differ between tasks);
- a forward hook on the model reshapes every output tensor of T·B rows to (T, B, …); tensors still of
  B rows (hidden states of the shared layers) are expanded to (T, B, …) as views.

So `model(**inputs)` returns task t's outputs at index t, each equal to running that task alone with
drop k. No KV cache (`use_cache` is turned off), no `labels` (compute per-task losses from the outputs).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from compose.drop import current_drop, set_drop
from compose.errors import CompositionError
from compose.families import layer_list
from compose.lora.layer import LoraLayer
from compose.lora.mixed import disable_mixed, enable_mixed, mixed_adapters
from compose.lora.model import attached_adapters


def enable_parallel(model: nn.Module, names: list[str], k: int) -> None:
    """Run tasks `names` (LoRA adapters, one per task) on every input, sharing the first `k` layers.

    After this, `model(**inputs)` returns outputs shaped (T, B, …) for T = len(names): index t is task
    `names[t]` run alone with AdapterDrop k (`set_drop(model, k)`). Layers below k run once on the B rows.

    Args:
        model: a transformers model (eval mode) with the adapters attached by `compose.lora.model.attach_lora`.
        names: the tasks' adapters, in output order (plain LoRA: no DoRA, no `modules_to_save`).
        k: the number of leading layers without adapters, shared by all tasks; 0 ≤ k ≤ L.

    Raises:
        CompositionError: `k` is outside [0, L]; `names` is empty, repeats or names an unattached adapter;
            an adapter cannot run per row (see `compose.lora.mixed.enable_mixed`).
    """
    layers = layer_list(model, "parallel tasks need one to share the first k")
    if not 0 <= k <= len(layers):
        raise CompositionError(f"parallel k={k} is outside [0, {len(layers)}] for this {len(layers)}-layer model")
    disable_parallel(model)
    enable_mixed(model, names)  # checks the names and adapters; per-row adapters from layer k on
    previous_drop = current_drop(model)
    set_drop(model, k)
    rows = next(m.mixed.rows for m in model.modules() if isinstance(m, LoraLayer) and m.mixed is not None)
    state = {"names": list(names), "k": k, "attached": attached_adapters(model), "previous_drop": previous_drop,
             "rows": rows, "batch": None}
    forward = inspect.signature(model.forward).parameters
    hooks = [
        # before compose.lora.mixed's own pre-hook, which would take an adapter_ids= for itself
        model.register_forward_pre_hook(_start(model, state, "use_cache" in forward), with_kwargs=True, prepend=True),
        model.register_forward_hook(_finish(state), always_call=True),
    ]
    if k < len(layers):
        hooks += [layer.register_forward_pre_hook(_copy_inputs(state, first=i == k), with_kwargs=True) for i, layer in enumerate(layers) if i >= k]
    else:
        hooks.append(layers[-1].register_forward_hook(_copy_output(state)))
    state["hooks"] = hooks
    model._compose_parallel = state


def disable_parallel(model: nn.Module) -> None:
    """Undo `enable_parallel`: remove the hooks and the per-row stacks, restore the drop set before (no-op if off)."""
    state = getattr(model, "_compose_parallel", None)
    if state is None:
        return
    for handle in state["hooks"]:
        handle.remove()
    disable_mixed(model)
    set_drop(model, state["previous_drop"])
    model._compose_parallel = None


def parallel_tasks(model: nn.Module) -> tuple[list[str], int] | None:
    """(task adapters, k) of the parallel set-up on `model`, or None if it is off."""
    state = getattr(model, "_compose_parallel", None)
    return None if state is None else (list(state["names"]), state["k"])


def _start(model: nn.Module, state: dict, takes_use_cache: bool):
    """Model pre-hook: check the set-up still holds and the call fits it; no KV cache."""

    def hook(module, args, kwargs):
        if model.training:
            raise CompositionError("parallel multi-task inference is for inference; call model.eval() first")
        for key in ("labels", "adapter_ids"):
            if kwargs.get(key) is not None:
                raise CompositionError(f"parallel runs every task on every row: drop {key}= (compute per-task losses from the (tasks, batch, …) outputs)")
        if kwargs.get("use_cache") or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise CompositionError("parallel multi-task inference has no KV cache; call without use_cache / cache")
        if mixed_adapters(model) != state["names"] or attached_adapters(model) != state["attached"] or current_drop(model) != state["k"]:
            raise CompositionError("adapters, per-row stacks or the drop changed since enable_parallel; call enable_parallel again")
        if takes_use_cache:
            kwargs["use_cache"] = False
        state["batch"] = None
        return args, kwargs

    return hook


def _repeat(obj, batch: int, tasks: int):
    """`obj` with every tensor of first dimension `batch` repeated `tasks` times along it (in tuples, lists, dicts too)."""
    if isinstance(obj, torch.Tensor):
        return obj.repeat(tasks, *(1,) * (obj.dim() - 1)) if obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_repeat(x, batch, tasks) for x in obj)
    if isinstance(obj, dict):
        return {key: _repeat(x, batch, tasks) for key, x in obj.items()}
    return obj


def _begin_tasks(state: dict, batch: int) -> None:
    """From here on rows are task-major copies: row t·B + b runs task t's adapter (mixed slot t + 1; slot 0 is the base)."""
    state["batch"] = batch
    state["rows"].set(torch.arange(len(state["names"])).repeat_interleave(batch), len(state["names"]))


def _copy_inputs(state: dict, first: bool):
    """Layer pre-hook (layers ≥ k): repeat the batch-sized arguments; at layer k start the per-task rows."""
    tasks = len(state["names"])

    def hook(module, args, kwargs):
        if first:
            hidden = args[0] if args else kwargs["hidden_states"]
            _begin_tasks(state, hidden.shape[0])
        return _repeat(args, state["batch"], tasks), _repeat(kwargs, state["batch"], tasks)

    return hook


def _copy_output(state: dict):
    """Last-layer forward hook (k = L): repeat its output for the tasks."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        batch = hidden.shape[0]
        _begin_tasks(state, batch)
        return _repeat(output, batch, len(state["names"]))

    return hook


def _finish(state: dict):
    """Model forward hook (also after an error): per-row adapters off, outputs reshaped to (tasks, batch, …)."""
    tasks = len(state["names"])

    def per_task(obj, batch: int):
        if isinstance(obj, torch.Tensor) and obj.dim():
            if obj.shape[0] == tasks * batch:
                return obj.view(tasks, batch, *obj.shape[1:])
            if obj.shape[0] == batch:  # computed once, in the shared layers
                return obj.unsqueeze(0).expand(tasks, *obj.shape)
            return obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(per_task(x, batch) for x in obj)
        return obj

    def hook(module, args, output):
        state["rows"].clear()
        batch, state["batch"] = state["batch"], None
        if batch is None:  # the forward raised before layer k (always_call); nothing to reshape
            return output
        if isinstance(output, dict):  # transformers' ModelOutput (a dict that keeps attributes in step)
            for key in list(output.keys()):
                output[key] = per_task(output[key], batch)
            return output
        return per_task(output, batch)

    return hook
