"""SVDs of low-rank products and the rules that pick where to cut them.

A LoRA delta s·B·A (B (out, r), A (r, in)) has rank ≤ r, so its SVD never needs the dense out×in matrix:
with B = Q_B·R_B and Aᵀ = Q_A·R_A, B·A = Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, and the SVD of the r×r core rotated out
is the SVD of B·A, in O((out + in)·r²). Truncating it at k is the best rank-k approximation
(Eckart–Young): its Frobenius error is the norm of the singular values left out.

Rank rules (kohya's `resize_lora` names; at least 1 component is always kept):

    rank=k          the top k
    sv_ratio=x      σᵢ ≥ σ₁ / x
    sv_fro=f        the fewest components whose Frobenius norm is ≥ f·‖ΔW‖_F  (f in (0, 1])
    sv_threshold=e  σᵢ > e·σ₁  (mergekit-style adaptive rank, relative to the largest)
"""

from __future__ import annotations

import math

import torch

from compose.errors import CompositionError

RULES = ("rank", "sv_ratio", "sv_fro", "sv_threshold")


def factor_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The thin SVD of B·A from QR of the factors, without forming B·A.

    Args:
        B (`torch.Tensor`): (out, r).
        A (`torch.Tensor`): (r, in).

    Returns:
        `tuple`: (U (out, r), S (r,), Vh (r, in)) with B·A = U·diag(S)·Vh, S descending.

    Raises:
        [`CompositionError`]: the factors hold NaN or ±Inf, or B·A overflows (the SVD would not converge).
    """
    Q_B, R_B = torch.linalg.qr(B)
    Q_A, R_A = torch.linalg.qr(A.T)
    core = R_B @ R_A.T  # NaN / ±Inf in either factor reach it through the QR
    if not torch.isfinite(core).all():
        raise CompositionError(f"the LoRA factors hold NaN or ±Inf, or their product overflows {core.dtype}")
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    return Q_B @ U, S, Vh @ Q_A.T


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` components as LoRA factors (A, B) = (Vh, U·diag(S)) — PEFT's split, for scaling 1 —
    zero-padded where the SVD has fewer components."""
    k = min(rank, S.numel())
    A = Vh.new_zeros(rank, Vh.shape[1])
    B = U.new_zeros(U.shape[0], rank)
    A[:k], B[:, :k] = Vh[:k], U[:, :k] * S[:k]
    return A, B


def check_rule(**rule: float | int | None) -> tuple[str, float]:
    """The one rank rule given (name, value), checked; `CompositionError` for none, several, or a bad value."""
    given = {k: v for k, v in rule.items() if v is not None}
    if set(rule) - set(RULES) or len(given) != 1:
        raise CompositionError(f"give exactly one of {', '.join(RULES)} (got {', '.join(given) or 'none'})")
    (name, value), = given.items()
    if isinstance(value, float) and not math.isfinite(value):
        raise CompositionError(f"{name} must be a finite number, got {value!r}")
    if name == "rank" and (not isinstance(value, int) or value < 1):
        raise CompositionError(f"rank must be a positive integer, got {value!r}")
    if name == "sv_ratio" and not value >= 1:
        raise CompositionError(f"sv_ratio keeps σ ≥ σ₁/ratio, so it must be ≥ 1, got {value!r}")
    if name == "sv_fro" and not 0 < value <= 1:
        raise CompositionError(f"sv_fro is a share of the Frobenius norm in (0, 1], got {value!r}")
    if name == "sv_threshold" and not 0 <= value < 1:
        raise CompositionError(f"sv_threshold keeps σ > threshold·σ₁, so it must be in [0, 1), got {value!r}")
    return name, value


def keep_rank(S: torch.Tensor, rule: str, value: float) -> int:
    """How many of the singular values `S` (descending) the rank rule keeps (at least 1, at most len(S))."""
    n = S.numel()
    if rule == "rank":
        return max(1, min(int(value), n))
    if rule == "sv_ratio":
        kept = int((S >= S[0] / value).sum())
    elif rule == "sv_threshold":
        kept = int((S > S[0] * value).sum())
    else:  # sv_fro: the first k whose cumulative energy reaches f²
        energy = torch.cumsum(S.double() ** 2, 0)
        kept = int(torch.searchsorted(energy, (value**2) * energy[-1] * (1 - 1e-12))) + 1
    return max(1, min(kept, n))


def tail_norm(S: torch.Tensor, k: int) -> float:
    """‖ΔW − ΔW_k‖_F of the best rank-k approximation: the norm of the singular values after the first k."""
    return float(torch.linalg.vector_norm(S[k:].double())) if k < S.numel() else 0.0
