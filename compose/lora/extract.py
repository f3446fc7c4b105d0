"""A LoRA factor pair from a dense weight difference: ΔW = W_tuned − W_base ≈ B·A, truncated SVD.

mergekit's `extract-lora` takes a full `torch.linalg.svd` of every ΔW: O(out·in·min(out, in)). The rank
wanted is small, so this finds ΔW's top singular subspace by randomized range finding (Halko, Martinsson
& Tropp 2011, alg. 4.4): Y = ΔW·Ω for a Gaussian Ω (in × (k + p)), q power iterations (re-orthonormalised
by QR), Q = qr(Y), then the exact SVD of the small Qᵀ·ΔW. That costs O(out·in·(k + p)·(2q + 2)). When
ΔW has rank ≤ k (a model that is base + a rank-k LoRA) the range is found exactly, so the factors are
exact up to rounding; otherwise they are near-optimal, and the error reported is measured, not assumed.
With a threshold rule the rank is not known ahead: k doubles until the cut falls inside the computed
spectrum. Above half of min(out, in) a dense SVD is cheaper and is used instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compose.errors import CompositionError
from compose.lora.lowrank import check_rule, keep_rank, split_factors

OVERSAMPLE = 8  # p: extra random directions, so the top k are caught with high probability
POWER_ITERATIONS = 2  # q: sharpen the spectrum's decay, for deltas that are not exactly low-rank
FIRST_GUESS = 16  # threshold rules: the first rank tried


@dataclass
class ExtractedModule:
    """One module's extraction: ΔW ≈ B·A (A (rank, in), B (out, rank), for scaling 1)."""

    A: torch.Tensor
    B: torch.Tensor
    norm: float  # ‖ΔW‖_F
    error: float  # ‖ΔW − B·A‖_F, measured

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def captured(self) -> float:
        """Share of ΔW's energy the factors hold: 1 − (error / ‖ΔW‖)²."""
        return 1.0 - (self.error / self.norm) ** 2 if self.norm else 1.0


def extract_delta(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    sv_threshold: float | None = None,
    generator: torch.Generator | None = None,
) -> ExtractedModule:
    """
    LoRA factors of a dense weight difference, by truncated (randomized) SVD.

    Args:
        delta (`torch.Tensor`):
            ΔW as (out, in); computed in fp32 (fp64 when given fp64).
        rank (`int`, *optional*):
            Keep the top `rank` components (fewer when ΔW is smaller).
        sv_threshold (`float`, *optional*):
            Keep the components with σᵢ > sv_threshold·σ₁ (adaptive rank). Exactly one of `rank` / `sv_threshold`.
        generator (`torch.Generator`, *optional*):
            RNG for the random test matrix (default: a fixed seed, so results are reproducible).

    Returns:
        [`ExtractedModule`]: A (k, in) = Vhₖ, B (out, k) = Uₖ·diag(Sₖ) (PEFT's split), ‖ΔW‖ and the measured error.

    Raises:
        [`CompositionError`]: not exactly one rule, a value out of range, or ΔW holds NaN / ±Inf or overflows.
    """
    import math

    rule, value = check_rule(rank=rank, sv_threshold=sv_threshold)
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    delta = delta.to(work)
    generator = generator or torch.Generator(device=delta.device).manual_seed(0)
    norm = float(torch.linalg.matrix_norm(delta))
    if not math.isfinite(norm):  # else the SVD fails to converge
        raise CompositionError(f"ΔW holds NaN or ±Inf, or its norm overflows {work}")
    if norm == 0.0:
        k = 1 if rule != "rank" else min(int(value), *delta.shape)
        return ExtractedModule(delta.new_zeros(k, delta.shape[1]), delta.new_zeros(delta.shape[0], k), 0.0, 0.0)
    full = min(delta.shape)
    guess = int(value) if rule == "rank" else FIRST_GUESS
    while True:
        U, S, Vh = _top_svd(delta, guess, generator)
        k = keep_rank(S, rule, value)
        # a threshold cut at the last computed component may lie further out: look again with twice the rank
        if rule == "rank" or k < S.numel() or S.numel() >= full:
            break
        guess *= 2
    A, B = split_factors(U, S, Vh, k if rule != "rank" else min(int(value), full))
    error = float(torch.linalg.matrix_norm(delta - B @ A))
    return ExtractedModule(A, B, norm, error)


def _top_svd(delta: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At least the top-k singular triplets of `delta` (randomized; dense past half the full rank)."""
    out, n_in = delta.shape
    width = k + OVERSAMPLE
    if 2 * width >= min(out, n_in):
        return torch.linalg.svd(delta, full_matrices=False)
    omega = torch.randn(n_in, width, generator=generator, dtype=delta.dtype, device=delta.device)
    Q = torch.linalg.qr(delta @ omega).Q
    for _ in range(POWER_ITERATIONS):
        Q = torch.linalg.qr(delta.T @ Q).Q
        Q = torch.linalg.qr(delta @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.T @ delta, full_matrices=False)
    return Q @ U, S, Vh
