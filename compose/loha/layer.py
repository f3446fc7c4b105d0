"""The LoHa adapter at one module: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · s, with w·a (out, r), w·b (r, in), s = alpha/r.

As in PEFT, the forward builds the dense ΔW and adds x·ΔWᵀ (`compose.delta.DeltaAdapter`); `compose.delta.DeltaLayer`
holds the adapters of a module, merges them and converts them to LoRA.
"""

from __future__ import annotations

import torch

from compose.delta import DeltaAdapter


class LoHaAdapter(DeltaAdapter):
    """`tensors`: hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b; `scaling`: alpha/r at this module."""

    def __init__(self, tensors: dict[str, torch.Tensor], scaling: float):
        super().__init__(tensors)
        self.scaling = scaling

    def delta_weight(self) -> torch.Tensor:
        t = self.tensors
        # PEFT's order of operations (LyCORIS' HadaWeight), so the rounding matches
        return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])) * self.scaling
