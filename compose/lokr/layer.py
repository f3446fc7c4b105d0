"""The LoKr adapter at one module: ΔW = (w1 ⊗ w2) · s, s = alpha/r, each factor whole or a rank-r product
(w1 = w1_a·w1_b, w2 = w2_a·w2_b), as `LoKrConfig.tensor_shapes` decides.

As in PEFT, the forward builds the dense ΔW and adds x·ΔWᵀ (`compose.delta.DeltaAdapter`).
"""

from __future__ import annotations

import torch

from compose.delta import DeltaAdapter


class LoKrAdapter(DeltaAdapter):
    """`tensors`: lokr_w1 or lokr_w1_a/lokr_w1_b, and lokr_w2 or lokr_w2_a/lokr_w2_b; `scaling`: alpha/r at this module."""

    def __init__(self, tensors: dict[str, torch.Tensor], scaling: float):
        super().__init__(tensors)
        self.scaling = scaling

    def factor(self, i: str) -> torch.Tensor:
        """w1 or w2 (`i` = '1' or '2'): stored whole, or the product of its two rank-r halves."""
        t = self.tensors
        return t[f"lokr_w{i}"] if f"lokr_w{i}" in t else t[f"lokr_w{i}_a"] @ t[f"lokr_w{i}_b"]

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self.factor("1"), self.factor("2")) * self.scaling
