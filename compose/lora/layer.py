"""The LoRA layer: one base module plus any number of named adapters.

For each active adapter, in order, the layer adds to the base output y = W·x + b

    LoRA:  s·(B·A·x + β)                                  (β only with lora_bias)
    LoRA on an embedding (ids x):  s·B·Aᵀ[x]               (A (r, vocab): a one-hot x times Aᵀ, as PEFT's Embedding)
    DoRA:  (f − 1)·(y − b) + f·s·B·A·x,   f = m / ‖W + s·B·A‖_row   (norm detached)

where y is the running output, as PEFT computes it (so a DoRA adapter also rescales the adapters
before it). The adapter runs in its own dtype (fp32 over half-precision or quantized bases, as
PEFT upcasts it): the input is cast to it and the sum cast back to the base output's dtype.

Two hooks change that. With a `fusion` installed (AdapterFusion, `compose.fusion`) the layer returns
y + fusion(y, stack(δᵢ)) over its fusion members' δᵢ = s·(B·A·x + β), whatever the active list says.
With `skip` set (AdapterDrop, `compose.drop`) it returns the base output alone. During a mixed-adapter
call (`compose.lora.mixed`) each batch row gets its own adapter's delta instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compose.errors import CompositionError
from compose.heads import Delegating, SavedModule  # noqa: F401  (SavedModule moved to compose.heads; importable here still)
from compose.merge.report import QuantError


def base_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' (GPT-2's Conv1D, weight stored (in, out)), 'embedding' (weight (vocab, dim), i.e. (in, out)
    too), 'bnb4', 'bnb8', or None if LoRA can't wrap it."""
    bnb = {c.__name__ for c in type(module).__mro__ if c.__module__.startswith("bitsandbytes")}
    if bnb:  # bnb layers subclass nn.Linear, so look at them first
        return "bnb4" if "Linear4bit" in bnb else "bnb8" if "Linear8bitLt" in bnb else None
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def base_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a module `base_kind` accepts (an embedding's: vocabulary, width)."""
    if base_kind(module) in ("conv1d", "embedding"):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def adapter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype PEFT gives an adapter on `module`: fp64 over fp64, else fp32 (half and quantized bases upcast)."""
    return torch.float64 if module.weight.dtype == torch.float64 else torch.float32


class LoraAdapter(nn.Module):
    """One adapter's tensors at one module: A (r, in), B (out, r), optional β (out,) and DoRA m (out,).

    `residual`: the second half of the rank is −B₀·A₀ of a PiSSA/OLoRA initialisation (`compose.lora.residual`),
    the first half the trained factors. `base_weights`: weights of the base module the adapter was saved with
    (PEFT's saved embedding layers), which `attach_lora` puts in place of the model's while it is attached.
    """

    def __init__(
        self,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        lora_bias: torch.Tensor | None = None,
        magnitude: torch.Tensor | None = None,
        *,
        residual: bool = False,
        base_weights: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        frozen = lambda t: None if t is None else nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.lora_A, self.lora_B = frozen(lora_A), frozen(lora_B)
        self.lora_bias, self.magnitude = frozen(lora_bias), frozen(magnitude)
        self.scaling = scaling
        self.residual = residual
        self.base_weights = base_weights or {}  # plain tensors: not the adapter's parameters, and saved with the base's

    def delta_weight(self) -> torch.Tensor:
        """s·B·A as (out, in), in fp32 at least (half-precision matmuls are slow and lossy on CPU)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling


class LoraLayer(Delegating):
    """Wraps a Linear, Conv1D, Embedding or bitsandbytes 4/8-bit Linear (`base_layer`) and adds its adapters' outputs."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.kind = base_kind(base_layer)
        if self.kind is None:
            raise CompositionError(f"LoRA cannot wrap a {type(base_layer).__name__}; supported: Linear, Conv1D, Embedding, bnb Linear4bit/Linear8bitLt")
        self.quantized = self.kind in ("bnb4", "bnb8")
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: tuple[LoraAdapter, ...] = ()  # the forward's loop, resolved once by set_active
        self.merged: list[tuple[LoraAdapter, torch.Tensor | None]] = []  # (adapter, DoRA factor f) in merge order
        self._bias0: torch.Tensor | None = None  # the bias before merging, which DoRA's bias update needs
        self.fusion: nn.Module | None = None  # AdapterFusion over `fused` (a sub-module, so its tensors save as `<path>.fusion.*`)
        self.fused: tuple[LoraAdapter, ...] = ()
        self.skip = False  # AdapterDrop: no adapter computation in this layer
        self.mixed: nn.Module | None = None  # stacked adapters for mixed-adapter batches (compose.lora.mixed)

    def add_adapter(self, name: str, adapter: LoraAdapter) -> None:
        """Register `adapter` under `name` (inactive until `set_active` names it)."""
        self.adapters[name] = adapter

    def remove_adapter(self, name: str) -> None:
        """Drop adapter `name` (and from the active ones)."""
        if self.merged:
            raise CompositionError("cannot remove an adapter from a merged LoRA layer; unmerge() it first")
        adapter = self.adapters.pop(name)
        self.active = tuple(ad for ad in self.active if ad is not adapter)
        if adapter in self.fused:  # a fusion that lost a member has nothing left to attend over here
            self.set_fusion(None)

    def set_active(self, names: list[str]) -> None:
        """Activate the adapters in `names` that this layer holds, in that order (others are skipped)."""
        if self.merged:
            raise CompositionError("cannot change the active adapters of a merged LoRA layer; unmerge() it first")
        self.active = tuple(self.adapters[n] for n in names if n in self.adapters)

    def set_fusion(self, fusion: nn.Module | None, names: tuple[str, ...] = ()) -> None:
        """Run `fusion(y, stack(δᵢ))` over adapters `names`, in that order, in place of the active adapters' sum (None: back to the sum)."""
        self.fusion, self.fused = fusion, tuple(self.adapters[n] for n in names)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.mixed is not None and self.mixed.rows.slots is not None:  # each row its own adapter
            return self.mixed(self, x, result)
        if self.merged or self.skip:
            return result
        out_dtype = result.dtype
        if self.fusion is not None:
            deltas = torch.stack([self.lora_output(ad, x) for ad in self.fused])
            return (result + self.fusion(result.to(deltas.dtype), deltas)).to(out_dtype)
        if not self.active:
            return result
        for ad in self.active:
            h = self.down(ad, x)
            # plain LoRA: s·B·(A·x) into the output in place, the scaling inside the matmul (BLAS alpha): the
            # same sums, one pass over the output instead of three
            if ad.magnitude is None and ad.lora_bias is None and self.adds_in_place(result, h.dtype) and self.embed_scale() is None:
                result.view(-1, result.shape[-1]).addmm_(h.view(-1, h.shape[-1]), ad.lora_B.T, alpha=ad.scaling)
                continue
            if ad.magnitude is None:
                delta = self.up(ad, h)
            else:
                f = (ad.magnitude / self._dora_norm(ad, h.dtype)).view(1, -1)
                bias = self.base_layer.bias
                delta = (f - 1) * (result if bias is None else result - bias) + f * F.linear(h, ad.lora_B, ad.lora_bias) * ad.scaling
            # PEFT's bnb layers cast each adapter's output back before adding; its Linear adds, then casts
            result = result + (delta.to(out_dtype) if self.quantized else delta)
        return result.to(out_dtype)

    def down(self, ad: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        """A·x in the adapter's dtype: the input cast to it, or for an embedding the rows Aᵀ[x] (PEFT's `_embed`)."""
        if self.kind != "embedding":
            return F.linear(x.to(ad.lora_A.dtype), ad.lora_A)
        emb = self.base_layer
        return F.embedding(x, ad.lora_A.T, emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq, emb.sparse)

    def up(self, ad: LoraAdapter, h: torch.Tensor) -> torch.Tensor:
        """s·(B·h + β), times the scale an embedding applies to its own output (e.g. Gemma's √d), as PEFT does."""
        delta = F.linear(h, ad.lora_B, ad.lora_bias) * ad.scaling
        scale = self.embed_scale()
        return delta if scale is None else delta * scale.to(delta.dtype)

    def lora_output(self, ad: LoraAdapter, x: torch.Tensor) -> torch.Tensor:
        """One adapter's output for input `x`: s·(B·A·x + β)."""
        return self.up(ad, self.down(ad, x))

    def embed_scale(self) -> torch.Tensor | None:
        """The scale an embedding layer multiplies its output by (`embed_scale`), which its LoRA output gets too."""
        scale = getattr(self.base_layer, "embed_scale", None) if self.kind == "embedding" else None
        return torch.as_tensor(scale) if isinstance(scale, (int, float)) else scale

    def adds_in_place(self, result: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether adapter outputs of `dtype` may be accumulated into the base output `result` in place: at
        inference (no autograd to keep), in its dtype, over a full-precision base whose output is fresh and
        contiguous (PEFT's bnb layers cast each adapter's output first, which this path would skip)."""
        return result.dtype == dtype and not torch.is_grad_enabled() and not self.quantized and result.is_contiguous()

    def _dora_norm(self, ad: LoraAdapter, dtype: torch.dtype) -> torch.Tensor:
        """‖W + s·B·A‖ per output row, in `dtype`, detached: DoRA treats it as a constant."""
        with torch.no_grad():
            weight = self.base_weight().to(dtype) + ad.scaling * (ad.lora_B @ ad.lora_A).to(dtype)
            return torch.linalg.norm(weight, dim=1).to(dtype)

    def base_weight(self) -> torch.Tensor:
        """W as (out, in): a view of the base's weight, or a dequantized copy for bitsandbytes bases."""
        weight = self.base_layer.weight
        if self.quantized:
            from compose.merge.bnb import dequantize

            scb = self.base_layer.state.SCB if self.kind == "bnb8" else None
            state = weight.quant_state if self.kind == "bnb4" else (weight.SCB if scb is None else scb)
            return dequantize(weight.data, state)
        return weight.T if self.kind in ("conv1d", "embedding") else weight

    @torch.no_grad()
    def merge(self) -> QuantError | None:
        """Fold the active adapters into the base weight (and bias), in place, so forward is the base alone.

        The same sequence the forward applies to y: LoRA adds s·B·A (and s·β); DoRA scales rows,
        W ← f·(W + s·B·A) and b − b₀ ← f·(b − b₀), with f from the unmerged W as the forward has it.

        A bitsandbytes base is dequantized, merged in fp32 and quantized again with its own settings
        (one round trip for all active adapters; PEFT makes one per adapter). That is lossy, unlike the
        full-precision merge: returns the rounding it adds, |deq(Q(W')) − W'| with W' = deq(W_q) + ΔW
        (None on other bases).
        """
        if self.merged:
            return None
        if self.fusion is not None or self.skip:
            raise CompositionError("cannot merge a LoRA layer that runs an AdapterFusion or is dropped (AdapterDrop); detach_fusion / set_drop(model, 0) first")
        weight, bias = self._weight_to_merge(), getattr(self.base_layer, "bias", None)
        factors = [None if ad.magnitude is None else (ad.magnitude / self._dora_norm(ad, ad.lora_A.dtype)) for ad in self.active]
        if any(ad.lora_bias is not None for ad in self.active) and bias is None:
            raise CompositionError("cannot merge lora_bias into a layer without a bias; keep the adapter unmerged")
        self._bias0 = None if bias is None else bias.detach().clone()
        for ad, f in zip(self.active, factors):
            if f is None:
                self._add_delta(weight, ad, 1.0)
                if ad.lora_bias is not None:
                    bias += (ad.lora_bias * ad.scaling).to(bias.dtype)
            else:
                weight.add_(ad.delta_weight().to(weight.dtype)).mul_(f.view(-1, 1))
                if bias is not None:
                    bias.copy_(self._bias0 + f * (bias - self._bias0))
            self.merged.append((ad, f))
        return self._store_merged(weight)

    @torch.no_grad()
    def unmerge(self) -> QuantError | None:
        """Undo `merge` (exact up to float rounding) so the adapters run in the forward again.

        On a bitsandbytes base this is another dequantize/requantize round trip (as in PEFT), so the
        weight does not come back exactly: every merge/unmerge cycle adds its rounding. Returns this
        round trip's (None on other bases).
        """
        if not self.merged:
            return None
        weight, bias = self._weight_to_merge(copy=False), getattr(self.base_layer, "bias", None)  # merge() stored a copy of its own
        while self.merged:
            ad, f = self.merged.pop()
            if f is None:
                self._add_delta(weight, ad, -1.0)
                if ad.lora_bias is not None:
                    bias -= (ad.lora_bias * ad.scaling).to(bias.dtype)
            else:
                weight.div_(f.view(-1, 1)).sub_(ad.delta_weight().to(weight.dtype))
                if bias is not None:
                    bias.copy_(self._bias0 + (bias - self._bias0) / f)
        return self._store_merged(weight)

    def _add_delta(self, weight: torch.Tensor, ad: LoraAdapter, sign: float) -> None:
        """weight += sign·s·B·A. Full precision: inside the matmul, with no (out, in) temporary; half-precision
        and dequantized bnb weights take the fp32 delta, cast (PEFT's rounding, which requantizing must match)."""
        if not self.quantized and weight.dtype == ad.lora_A.dtype:
            weight.addmm_(ad.lora_B, ad.lora_A, alpha=sign * ad.scaling)
        else:
            weight.add_(ad.delta_weight().to(weight.dtype), alpha=sign)

    def _weight_to_merge(self, copy: bool = True) -> torch.Tensor:
        """W as (out, in) to merge into: a copy of the base weight (without `copy`, the weight itself), or for
        bitsandbytes a dequantized fp32 copy.

        A copy by default: transformers maps safetensors weights from the file, and writing into such a
        mapping faults every page in one by one (copy-on-write), several times slower than copying it once
        into fresh memory (`_store_merged` puts the copy in place).
        """
        if self.quantized:
            return self.base_weight().float()
        return self.base_weight().clone() if copy else self.base_weight()

    def _store_merged(self, weight: torch.Tensor) -> QuantError | None:
        """Put the merged weight in the base layer: as its parameter's data (tied parameters follow: they are
        the same object), or for bitsandbytes quantized back into it, returning the rounding that adds."""
        if not self.quantized:
            self.base_layer.weight.data = weight.T if self.kind in ("conv1d", "embedding") else weight
            return None
        from compose.merge.bnb import requantize_layer

        return requantize_layer(self.base_layer, weight)
