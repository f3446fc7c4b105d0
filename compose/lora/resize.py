"""Rank reduction of a LoRA module through the low-rank SVD of s·B·A (never the dense ΔW).

The truncation is the best approximation at its rank (Eckart–Young), and its Frobenius error is the
norm of the singular values cut, which is what `ResizedModule.error` reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compose.lora.lowrank import check_rule, factor_svd, keep_rank, split_factors, tail_norm


@dataclass
class ResizedModule:
    """One module after resizing: s·B·A ≈ B'·A' (A' (rank, in), B' (out, rank), for scaling 1)."""

    A: torch.Tensor
    B: torch.Tensor
    old_rank: int
    norm: float  # ‖s·B·A‖_F
    error: float  # ‖s·B·A − B'·A'‖_F = the norm of the singular values cut

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm else 0.0


def resize_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    *,
    rank: int | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
) -> ResizedModule:
    """
    The best lower-rank LoRA factors of one module's delta s·B·A.

    Args:
        A (`torch.Tensor`): (r, in).
        B (`torch.Tensor`): (out, r).
        scaling (`float`): s in W + s·B·A.
        rank (`int`, *optional*): the new rank (a module already at or below it keeps its own).
        sv_ratio (`float`, *optional*): keep σᵢ ≥ σ₁ / sv_ratio.
        sv_fro (`float`, *optional*): keep the fewest components holding this share of ‖s·B·A‖_F.
            Exactly one of `rank` / `sv_ratio` / `sv_fro`.

    Returns:
        [`ResizedModule`]: the new factors for scaling 1, in the dtype of `A`, computed in fp32 (fp64 for fp64
        input), with the error of the cut.

    Raises:
        [`CompositionError`]: not exactly one rule, or a value out of range.
    """
    rule, value = check_rule(rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro)
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    U, S, Vh = factor_svd(B.to(work) * scaling, A.to(work))
    k = keep_rank(S, rule, value)
    new_A, new_B = split_factors(U, S, Vh, k)
    norm = float(torch.linalg.vector_norm(S.double()))
    return ResizedModule(new_A.to(A.dtype), new_B.to(B.dtype), A.shape[0], norm, tail_norm(S, k))


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with zero rows / columns added up to `rank`: the same B·A at a larger rank (runtimes that take
    one rank for every module, such as vLLM, then see a uniform adapter)."""
    extra = rank - A.shape[0]
    if extra <= 0:
        return A, B
    return torch.cat([A, A.new_zeros(extra, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1)
