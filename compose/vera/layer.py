"""The VeRA adapter at one module, and the shared random projections.

With A (r, in) and B (out, r) the module's slices of the shared projections (`A[:, :in]`, `B[:out, :]`, as PEFT
slices them) and the trained vectors λ_d (r,), λ_b (out,):

    forward   y += λ_b ⊙ (B·(λ_d ⊙ (A·x)))
    ΔW        = (λ_b ⊙ B)·(λ_d ⊙ A)          (out, in), for merging and conversion to LoRA
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compose.delta import DeltaAdapter


class VeraAdapter(DeltaAdapter):
    """`tensors`: vera_lambda_b (out,), vera_lambda_d (r,); `vera_A` (r, in), `vera_B` (out, r): this module's slices
    of the shared projections (views, kept out of the state dict: the adapter stores them once)."""

    def __init__(self, tensors: dict[str, torch.Tensor], vera_A: torch.Tensor, vera_B: torch.Tensor):
        super().__init__(tensors)
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)

    def delta_weight(self) -> torch.Tensor:
        t = self.tensors
        return (t["vera_lambda_b"].unsqueeze(-1) * self.vera_B) @ (t["vera_lambda_d"].unsqueeze(-1) * self.vera_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        return t["vera_lambda_b"] * F.linear(t["vera_lambda_d"] * F.linear(x, self.vera_A), self.vera_B)


def random_projections(r: int, n_in: int, n_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The projections (A (r, n_in), B (n_out, r)) PEFT draws for a VeRA adapter saved without them: Kaiming-uniform
    (gain √2, fan-in), A then B from one CPU generator seeded with `projection_prng_key`."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def kaiming_uniform(rows: int, fan_in: int) -> torch.Tensor:
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in))  # PEFT's sequence of roundings
        return torch.empty(rows, fan_in).uniform_(-bound, bound, generator=generator)

    return kaiming_uniform(r, n_in), kaiming_uniform(n_out, r)
