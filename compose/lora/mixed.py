"""Mixed-adapter batches: every batch row runs its own LoRA adapter (or none), as multi-LoRA servers do
(Punica, S-LoRA, LoRAX, vLLM; PEFT's `adapter_names=`).

`enable_mixed(model, names)` stacks, on every LoRA layer, the adapters `names` (N of them) into

    Aᵀ (N+1, in, r_max),  Bᵀ (N+1, r_max, out),  β (N+1, out)

with ranks zero-padded to the layer's largest, scaling folded into B and β, and slot 0 all zeros
(the base model; so is slot j+1 on a layer that adapter j does not target). A call
`model(..., adapter_ids=ids)` or `model.generate(..., adapter_ids=ids)` then gives row i adapter
`names[ids[i]]` (−1: the base model alone). Each layer runs its base over the whole batch and adds one
gathered batched product, with k = ids + 1:

    y_i += x_i · Aᵀ[k_i] · Bᵀ[k_i] + β[k_i]

This is the same sum as the single-adapter forward, so row i equals row i run alone with only its
adapter active. Gathering each row's Aᵀ and Bᵀ copies (in + out)·r numbers per row, which a long row
(prefill) amortises over its tokens but a decode step (one token per row) does not. So when a call has
few tokens per row (≤ `GROUPED_MAX_TOKENS`), the layer groups the rows instead (once per call, shared by
every layer): rows sorted by adapter into a grid of m rows per adapter (m: the most rows any adapter
has; the rest of the grid zero), then one batched product over the adapters, with no weight copied:

    Y[j] = X[j] · Aᵀ[j+1] · Bᵀ[j+1] + β[j+1],    X[j]: the rows of adapter j,    y_i += Y at row i's place

The stacks are a snapshot (they follow `model.to()`, but not later changes to the adapter
weights: call `enable_mixed` again after those).
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from compose.errors import CompositionError
from compose.lora.layer import LoraLayer, SavedModule
from compose.lora.model import attached_adapters


#: Calls with at most this many tokens per row group the rows by adapter (see above): at one token per row
#: 2× faster than the gathered product, about equal at 16 tokens, slower for longer rows
#: (8 adapters, batch 32, hidden 512–2048, r = 16, CPU).
GROUPED_MAX_TOKENS = 8


def grouped_path(tokens_per_row: int) -> bool:
    """Whether a mixed call with this many tokens per row groups rows by adapter instead of gathering weights."""
    return tokens_per_row <= GROUPED_MAX_TOKENS


class _Rows:
    """The running call's stack slot per batch row (None outside a mixed call), shared by a model's layers."""

    slots: torch.Tensor | None = None

    def set(self, ids: torch.Tensor, adapters: int) -> None:
        """Rows run adapters `ids` (−1: the base) of `adapters` stacked ones until `clear`."""
        self.slots, self.adapters, self._made = ids.long() + 1, adapters, {}

    def clear(self) -> None:
        self.slots, self._made = None, {}

    def slots_on(self, device: torch.device) -> torch.Tensor:
        return self._once(("slots", device), lambda: self.slots.to(device))

    def groups(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(rows, places, m): the rows that run an adapter, sorted by adapter; their places in a grid of m rows
        per adapter (adapter j's rows at j·m, j·m + 1, ...); m, the most rows any adapter has (0: none does)."""

        def make():
            slots = self.slots_on(device)
            counts = torch.bincount(slots, minlength=self.adapters + 1)
            m = int(counts[1:].max())  # the grid's size: one host sync per call, not per layer
            order = torch.argsort(slots, stable=True)
            sorted_slots = slots[order]
            within = torch.arange(len(slots), device=device) - (torch.cumsum(counts, 0) - counts)[sorted_slots]
            keep = sorted_slots > 0  # base rows (slot 0) take no adapter work
            return order[keep], ((sorted_slots - 1) * m + within)[keep], m

        return self._once(("groups", device), make)

    def _once(self, key: tuple, make):
        """What `make()` returns, made once per call: every layer of the model reads the same."""
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]


class MixedStack(nn.Module):
    """One layer's stacked adapters (non-persistent buffers: they follow `model.to()` but are never saved)."""

    def __init__(self, path: str, At: torch.Tensor | None, Bt: torch.Tensor | None, bias: torch.Tensor | None, rows: _Rows):
        super().__init__()
        self.register_buffer("At", At, persistent=False)  # None on a layer that no mixed adapter targets
        self.register_buffer("Bt", Bt, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.path, self.rows = path, rows

    def forward(self, layer: LoraLayer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (the base output for `x`) plus each row's adapter delta."""
        if layer.merged or layer.fusion is not None:
            raise CompositionError(f"LoRA layer '{self.path}' was merged or fused (AdapterFusion) after enable_mixed; unmerge() / detach_fusion and enable_mixed again")
        slots = self.rows.slots
        if x.shape[0] != slots.shape[0]:
            raise CompositionError(f"adapter_ids has {slots.shape[0]} entries but LoRA layer '{self.path}' got {x.shape[0]} rows; mixed batches need the batch as the inputs' first dimension")
        if layer.skip or self.At is None:  # AdapterDrop, or no mixed adapter here: the base alone for every row
            return result
        xs = x.reshape(x.shape[0], -1, x.shape[-1]).to(self.At.dtype)  # (b, s, in)
        (b, s), n = xs.shape[:2], self.At.shape[0] - 1
        in_place = layer.adds_in_place(result, xs.dtype)
        if grouped_path(s):
            rows, places, m = self.rows.groups(xs.device)
            if m == 0:  # every row runs the base alone
                return result
            picked = xs.reshape(b, -1).index_select(0, rows)  # (rows, s·in), sorted by adapter
            grid = picked if len(places) == n * m else picked.new_zeros(n * m, picked.shape[1]).index_copy_(0, places, picked)
            h = torch.bmm(grid.view(n, m * s, -1), self.At[1:])  # (n, m·s, r_max): one batched product over the adapters
            y = torch.bmm(h, self.Bt[1:]) if self.bias is None else torch.baddbmm(self.bias[1:].unsqueeze(1), h, self.Bt[1:])
            y = y.view(n * m, -1)
            y = y if len(places) == n * m else y.index_select(0, places)  # back to one entry per row in `rows`
            if in_place:
                result.view(b, -1).index_add_(0, rows, y)
                return result
            delta = y.new_zeros(b, y.shape[1]).index_copy_(0, rows, y).view(result.shape)
        else:  # one gathered batched matmul per factor, no loop over adapters
            slots = self.rows.slots_on(self.At.device)
            h, right = torch.bmm(xs, self.At.index_select(0, slots)), self.Bt.index_select(0, slots)  # h: (b, s, r_max)
            bias = None if self.bias is None else self.bias.index_select(0, slots).unsqueeze(1)  # (b, 1, out)
            if in_place:
                acc = result.view(b, s, -1)
                return (acc if bias is None else acc.add_(bias)).baddbmm_(h, right).view(result.shape)
            delta = (torch.bmm(h, right) if bias is None else torch.baddbmm(bias, h, right)).view(result.shape)
        out_dtype = result.dtype
        # as the single-adapter forward: bnb bases get the delta cast back before adding, others add then cast
        return (result + (delta.to(out_dtype) if layer.quantized else delta)).to(out_dtype)


def enable_mixed(model: nn.Module, names: list[str]) -> None:
    """Let each batch row run its own adapter: `model(..., adapter_ids=ids)`, `model.generate(..., adapter_ids=ids)`.

    `ids` is a 1-D integer tensor (or list) with one entry per batch row: row i runs adapter `names[ids[i]]`,
    or the base model alone for −1. Calls without `adapter_ids` run the active adapters as before. In
    `generate`, pass a tensor: transformers then repeats it for beams / `num_return_sequences` and hands it
    to every decoding step, so each row keeps its adapter across the KV-cached steps.

    Enabling again replaces the previous mixed set (and re-reads the adapters' tensors).

    Args:
        model: a model with the adapters attached by `compose.lora.model.attach_lora`, in eval mode.
        names: the adapters rows can choose from, in id order; they may target different modules
            (a module without adapter j leaves rows of j at the base output there).

    Raises:
        CompositionError: `names` is empty, repeats a name or names an adapter that is not attached; one is
            DoRA, has `modules_to_save` copies or adapts an embedding; a LoRA layer is merged or runs an AdapterFusion.
    """
    attached = attached_adapters(model)
    unknown = [n for n in names if n not in attached]
    if not names or unknown or len(set(names)) != len(names):
        raise CompositionError(f"enable_mixed needs distinct attached adapter names, got {names} (attached: {attached})")
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]
    saved = [(path, m) for path, m in model.named_modules() if isinstance(m, SavedModule)]
    for path, layer in layers:
        if layer.merged or layer.fusion is not None:
            raise CompositionError(f"LoRA layer '{path}' is {'merged' if layer.merged else 'fused (AdapterFusion)'}; unmerge() / detach_fusion before enable_mixed")
        dora = [n for n in names if n in layer.adapters and layer.adapters[n].magnitude is not None]
        if dora:
            raise CompositionError(f"adapter '{dora[0]}' is DoRA (module '{path}'); mixed batches take plain LoRA adapters only (as PEFT's adapter_names=)")
        if layer.kind == "embedding" and set(names) & set(layer.adapters):
            raise CompositionError(f"adapter '{next(n for n in names if n in layer.adapters)}' adapts the embedding '{path}'; mixed batches take LoRA on Linear/Conv1D modules only")
    for path, module in saved:
        copied = [n for n in names if n in module.copies]
        if copied:
            raise CompositionError(f"adapter '{copied[0]}' replaces module '{path}' (modules_to_save); mixed batches support LoRA modules only")
    disable_mixed(model)
    rows = _Rows()
    for path, layer in layers:
        layer.mixed = MixedStack(path, *_stack(layer, names), rows)
    model._compose_mixed = {
        "names": list(names),
        "attached": attached,  # an attach/detach afterwards leaves the stacks stale: checked at every call
        "saved": [m for _, m in saved],
        "rows": rows,
        "hooks": [
            model.register_forward_pre_hook(_take_adapter_ids, with_kwargs=True),
            model.register_forward_hook(_clear_adapter_ids, always_call=True),
        ],
    }
    if hasattr(model, "prepare_inputs_for_generation"):
        model.prepare_inputs_for_generation = types.MethodType(_with_adapter_ids(type(model).prepare_inputs_for_generation), model)


def disable_mixed(model: nn.Module) -> None:
    """Undo `enable_mixed`: drop the stacks, hooks and the `adapter_ids` argument (no-op if not enabled)."""
    state = getattr(model, "_compose_mixed", None)
    if state is None:
        return
    for handle in state["hooks"]:
        handle.remove()
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.mixed = None
    model.__dict__.pop("prepare_inputs_for_generation", None)
    model._compose_mixed = None


def mixed_adapters(model: nn.Module) -> list[str] | None:
    """The adapters `adapter_ids` index into (as given to `enable_mixed`), or None if mixed batches are off."""
    state = getattr(model, "_compose_mixed", None)
    return None if state is None else list(state["names"])


@torch.no_grad()
def _stack(layer: LoraLayer, names: list[str]) -> tuple[torch.Tensor | None, ...]:
    """(Aᵀ, Bᵀ·s, β·s) stacked over [base, *names], zero where the layer lacks an adapter; Nones if it has none."""
    present = [(j + 1, layer.adapters[n]) for j, n in enumerate(names) if n in layer.adapters]
    if not present:
        return None, None, None
    r_max = max(ad.lora_A.shape[0] for _, ad in present)
    out, n_in = present[0][1].lora_B.shape[0], present[0][1].lora_A.shape[1]
    like = present[0][1].lora_A
    At = like.new_zeros(len(names) + 1, n_in, r_max)
    Bt = like.new_zeros(len(names) + 1, r_max, out)
    has_bias = any(ad.lora_bias is not None for _, ad in present)
    bias = like.new_zeros(len(names) + 1, out) if has_bias else None
    for k, ad in present:
        r = ad.lora_A.shape[0]
        At[k, :, :r] = ad.lora_A.T
        Bt[k, :r, :] = (ad.lora_B * ad.scaling).T
        if ad.lora_bias is not None:
            bias[k] = ad.lora_bias * ad.scaling
    return At, Bt, bias


def _take_adapter_ids(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: pop `adapter_ids`, check it against the batch, and set the layers' row slots."""
    ids = kwargs.pop("adapter_ids", None)
    if ids is None:
        return None
    state = model._compose_mixed
    if model.training:
        raise CompositionError("adapter_ids (mixed-adapter batches) is for inference; call model.eval() first")
    if attached_adapters(model) != state["attached"]:
        raise CompositionError(f"adapters were attached or detached since enable_mixed (now {attached_adapters(model)}); call enable_mixed again")
    running = next((m.active for m in state["saved"] if m.active is not None), None)
    if running is not None:
        raise CompositionError(f"active adapter '{running}' replaces a module (modules_to_save) for every row; set_active_adapters without it before a mixed batch")
    ids = torch.as_tensor(ids)
    inputs = next((t for t in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")) if isinstance(t, torch.Tensor)), None)
    rows = ids.shape[0] if ids.dim() == 1 else None
    if rows is None or ids.is_floating_point() or (inputs is not None and inputs.shape[0] != rows):
        batch = "?" if inputs is None else inputs.shape[0]
        raise CompositionError(f"adapter_ids must be a 1-D integer tensor with one id per batch row ({batch} rows), got shape {tuple(ids.shape)} {ids.dtype}; in generate pass a tensor so beams can repeat it")
    n = len(state["names"])
    if rows and not -1 <= int(ids.min()) <= int(ids.max()) < n:
        raise CompositionError(f"adapter_ids must lie in [-1, {n - 1}] (−1: base model; 0..{n - 1}: {state['names']}), got values from {int(ids.min())} to {int(ids.max())}")
    state["rows"].set(ids, n)
    return args, kwargs


def _clear_adapter_ids(model: nn.Module, args: tuple, output) -> None:
    """Forward hook, run even when the forward raised: the next call without adapter_ids is a plain one."""
    model._compose_mixed["rows"].clear()


def _with_adapter_ids(prepare):
    """`prepare_inputs_for_generation` that also takes `adapter_ids` and passes it on to the forward.

    `generate` refuses model kwargs that neither this function nor the forward names; naming it here lets
    transformers expand it with the batch (beams, num_return_sequences) and hand it to every step.
    """

    def prepare_with_ids(self, *args, adapter_ids: torch.Tensor | None = None, **kwargs):
        inputs = prepare(self, *args, **kwargs)
        if adapter_ids is not None:
            inputs["adapter_ids"] = adapter_ids
        return inputs

    signature = inspect.signature(prepare)
    params = list(signature.parameters.values())
    var_kw = [p for p in params if p.kind is p.VAR_KEYWORD]
    named = [p for p in params if p.kind is not p.VAR_KEYWORD]
    ids = inspect.Parameter("adapter_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
    prepare_with_ids.__signature__ = signature.replace(parameters=[*named, ids, *var_kw])
    return prepare_with_ids
