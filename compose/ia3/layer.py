"""The (IA)³ layer: one Linear or GPT-2 Conv1D plus the vectors of every adapter attached to it.

With l the product of the vectors (PEFT multiplies those of all active adapters), the layer computes

    output scaling, vector (out, 1):   y = l ⊙ (W·x + b)     (the bias is scaled too)
    input scaling,  vector (1, in):    y = W·(l ⊙ x) + b     (feed-forward modules)

Merged, W's rows (output scaling; and b) or columns (input scaling) are multiplied by l instead. The vectors
run in their own dtype (fp32 over half-precision bases, as PEFT upcasts them).
"""

from __future__ import annotations

import torch
from torch import nn

from compose.errors import CompositionError
from compose.heads import Delegating
from compose.heads import SavedModule as SavedCopy  # noqa: F401  (IA3's heads are compose.heads' now; the old name stays)
from compose.lora.layer import base_kind


class IA3Layer(Delegating):
    """Wraps a Linear or GPT-2 Conv1D (`base_layer`) and rescales its input or output by its adapters' vectors."""

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        self.kind = base_kind(base_layer)
        if self.kind not in ("linear", "conv1d"):
            raise CompositionError(f"IA3 cannot wrap a {type(base_layer).__name__}; supported: Linear and GPT-2 Conv1D")
        self.base_layer = base_layer
        self.feedforward = feedforward  # input scaling; one per layer, as in PEFT (vector shapes depend on it)
        self.vectors = nn.ParameterDict()  # adapter name → (1, in) or (out, 1), PEFT's layout
        self.merged: torch.Tensor | None = None  # the product folded into the weight, while merged
        self.skip = False  # AdapterDrop: no adapter computation in this layer

    def add_adapter(self, name: str, vector: torch.Tensor) -> None:
        """Register adapter `name`'s vector (active at once: every vector of the layer applies)."""
        self.vectors[name] = nn.Parameter(vector, requires_grad=False)

    def remove_adapter(self, name: str) -> None:
        if self.merged is not None:
            raise CompositionError("cannot remove an adapter from a merged IA3 layer; unmerge it first")
        del self.vectors[name]

    def scale(self) -> torch.Tensor:
        """l: the product of the vectors, flattened, in attach order."""
        vectors = iter(self.vectors.values())
        product = next(vectors).flatten()
        for v in vectors:
            product = product * v.flatten()
        return product

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged is not None or self.skip or not self.vectors:
            return self.base_layer(x, *args, **kwargs)
        s = self.scale()
        if self.feedforward:
            return self.base_layer((x.to(s.dtype) * s).to(x.dtype), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return (y * s).to(y.dtype)

    def _weight(self) -> torch.Tensor:
        """W as (out, in): a view, so writes reach the base's weight."""
        return self.base_layer.weight.T if self.kind == "conv1d" else self.base_layer.weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold l into the base, in place: W's rows and b (output scaling) or W's columns (input scaling).

        Raises:
            CompositionError: l has zero entries (the merge could not be undone), or the layer is dropped.
        """
        if self.merged is not None or not self.vectors:
            return
        if self.skip:
            raise CompositionError("cannot merge an IA3 layer that is dropped (AdapterDrop); set_drop(model, 0) first")
        s = self.scale()
        if (s == 0).any():
            raise CompositionError(f"IA3 vectors {list(self.vectors)} have zero entries here, so merging could not be undone; keep them unmerged")
        self._rescale(s, torch.mul)
        self.merged = s

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` by dividing by l again (exact up to float rounding; PEFT divides by l + 1e-8)."""
        if self.merged is None:
            return
        self._rescale(self.merged, torch.div)
        self.merged = None

    def _rescale(self, s: torch.Tensor, op) -> None:
        """W ← op(W, s) along W's input (feed-forward) or output axis, and b ← op(b, s) for output scaling."""
        weight, bias = self._weight(), self.base_layer.bias
        # computed in s's precision, stored in the base's (as PEFT: torch.mul(W, l).to(W.dtype))
        weight.copy_(op(weight, s.view(1, -1) if self.feedforward else s.view(-1, 1)))
        if not self.feedforward and bias is not None:
            bias.copy_(op(bias, s))
