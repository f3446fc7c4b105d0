"""Weighted combinations of LoRA adapters on one module, with PEFT's `add_weighted_adapter` semantics.

Adapter i contributes ΔWᵢ = sᵢ·Bᵢ·Aᵢ (A (r, in), B (out, r)) with a weight wᵢ, which may be negative.
Every method returns a new (A, B) meant for scaling 1 (written with lora_alpha = r, no rsLoRA):

    cat        A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …]: exactly Σ wᵢ·ΔWᵢ, at rank Σrᵢ.
    linear, ties, dare_linear, dare_ties, magnitude_prune
               combine the A's and the B's separately (equal ranks), the A's weighted by ±√|wᵢsᵢ| and
               the B's by √|wᵢsᵢ|. B·A then holds cross terms BᵢAⱼ: it is Σ wᵢ·ΔWᵢ only for one adapter.
    svd        the best rank-`rank` approximation of Σ wᵢ·ΔWᵢ, from QR of the stacked factors and an SVD
               of the small (Σrᵢ)² core: O((out+in)·(Σrᵢ)²), never the dense out×in matrix.
    ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
               prune / elect signs elementwise on the dense ΔWᵢ (the masks are defined on the full matrix,
               so these do build it, as PEFT does), then a truncated SVD.

SVD results use PEFT's split B = U·diag(S), A = Vh, so they equal PEFT's up to each component's sign.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compose.errors import CompositionError
from compose.lora.lowrank import factor_svd, split_factors

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat", *FACTOR_METHODS, *SVD_METHODS)
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # the methods that need `density`


@dataclass
class LoraFactors:
    """One adapter on one module: ΔW = scaling·B·A."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float  # s in W + s·B·A


def combine(
    factors: list[LoraFactors],
    weights: list[float],
    method: str,
    *,
    rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    clamp: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Combine several LoRA adapters of one module into one, as PEFT's `add_weighted_adapter` does.

    Args:
        factors (`list[LoraFactors]`):
            The adapters' (A, B, scaling) on this module; all must have the same (out, in).
        weights (`list[float]`):
            One weight per adapter; negative weights subtract.
        method (`str`):
            One of `METHODS` (see the module docstring). Unlike PEFT, a single adapter is not silently
            switched to `linear`: every method means the same for one adapter as for several.
        rank (`int`, *optional*):
            The output rank of the `*svd` methods (required for them, rejected by the others). Ranks the
            combined delta can't fill get zero components.
        density (`float`, *optional*):
            Fraction in (0, 1] of entries each adapter keeps, for the ties / dare / magnitude_prune methods
            (required for them, rejected by the others). At 1 nothing is pruned or rescaled.
        majority_sign_method (`str`, *optional*, defaults to `"total"`):
            TIES sign election: `"total"` (sign of the sum) or `"frequency"` (sign of the count).
        clamp (`float`, *optional*):
            PEFT's `svd_clamp` for the `*svd` methods: clip both factors to ±(this quantile of their
            entries). The quantile sees signed entries, so it depends on each component's SVD sign; plain
            `svd` (QR path) may pick other signs than PEFT's dense SVD and so clip slightly differently.
        generator (`torch.Generator`, *optional*):
            RNG for the DARE masks (`torch.bernoulli`), drawn in PEFT's order: factor methods draw every
            adapter's A mask, then every B mask; dense methods one (out, in) mask per adapter. `None` uses
            torch's global RNG.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: (A (r', in), B (out, r')) in the factors' dtype, for scaling 1.
        Computed in fp32 (fp64 when the inputs are fp64).

    Raises:
        [`CompositionError`]: unknown method, mismatched shapes, unequal ranks for the factor methods,
        missing or stray `rank` / `density` / `clamp`.
    """
    _check(factors, weights, method, rank, density, majority_sign_method, clamp)
    dtype = factors[0].A.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    As = [f.A.to(work) for f in factors]
    Bs = [f.B.to(work) for f in factors]
    ws = [w * f.scaling for w, f in zip(weights, factors)]

    if method == "cat":
        A = torch.cat([a * w * f.scaling for a, w, f in zip(As, weights, factors)])  # PEFT's rounding order
        B = torch.cat(Bs, dim=1)
    elif method in FACTOR_METHODS:
        # √|w·s| on both sides so B·A carries w·s; the sign goes on A only (on both it would cancel)
        root = [math.sqrt(abs(w)) for w in ws]
        signed = [r if w >= 0 else -r for r, w in zip(root, ws)]
        opts = dict(method=method, density=density, majority_sign_method=majority_sign_method, generator=generator)
        A = _merge(As, torch.tensor(signed, dtype=work, device=As[0].device), **opts)  # A masks drawn first
        B = _merge(Bs, torch.tensor(root, dtype=work, device=Bs[0].device), **opts)
    elif method == "svd":
        # Σ wᵢsᵢBᵢAᵢ = B'·A' with B' = [w₁s₁B₁ …] (out×R₀), A' = [A₁; …] (R₀×in). With B' = Q_B·R_B and
        # A'ᵀ = Q_A·R_A it is Q_B·(R_B·R_Aᵀ)·Q_Aᵀ: the SVD of the R₀×R₀ core, rotated out, is the SVD of the sum.
        A, B = split_factors(*factor_svd(torch.cat([b * w for b, w in zip(Bs, ws)], dim=1), torch.cat(As)), rank)
    else:  # elementwise masks on the dense deltas, then PEFT's dense SVD
        deltas = [(b @ a) * f.scaling for a, b, f in zip(As, Bs, factors)]
        weight = torch.tensor(weights, dtype=work, device=deltas[0].device)
        delta = _merge(deltas, weight, method.removesuffix("_svd"), density, majority_sign_method, generator)
        A, B = split_factors(*torch.linalg.svd(delta, full_matrices=False), rank)

    if clamp is not None:
        A, B = clamp_factors(A, B, clamp)
    return A.to(dtype).contiguous(), B.to(dtype).contiguous()


def clamp_factors(A: torch.Tensor, B: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """
    PEFT's `svd_clamp`: clip A and B to ±h, h = the `quantile` of all their (signed) entries together.

    Args:
        A (`torch.Tensor`): (r, in) factor.
        B (`torch.Tensor`): (out, r) factor.
        quantile (`float`): in [0, 1].

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: the clipped (A, B).
    """
    h = torch.quantile(torch.cat([B.flatten(), A.flatten()]), quantile)
    return A.clamp(-h, h), B.clamp(-h, h)


def _merge(
    tensors: list[torch.Tensor],
    weights: torch.Tensor,
    method: str,
    density: float | None,
    majority_sign_method: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """PEFT's merge_utils family on same-shape tensors: prune each, weight, sum (TIES: sign election first)."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_drop_random(t, density, generator) for t in tensors]
    T = torch.stack(tensors)
    weighted = weights.view(-1, *(1,) * (T.dim() - 1)) * T
    if method not in ("ties", "dare_ties"):
        return weighted.sum(0)
    # signs are elected on the pruned, *unweighted* tensors (as PEFT does: weights don't vote), then each
    # entry is the mean of the weighted entries that agree with the elected sign (zeros never agree)
    sign = T.sign()
    votes = T.sum(0) if majority_sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density·numel) largest-magnitude entries (TIES / magnitude pruning)."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[t.abs().flatten().topk(int(density * t.numel())).indices] = 1
    return t * keep.view_as(t)


def _drop_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1/density to keep the expectation."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def _check(factors, weights, method, rank, density, majority_sign_method, clamp) -> None:
    if method not in METHODS:
        raise CompositionError(f"unknown combination method {method!r}; use one of: {', '.join(METHODS)}")
    if not factors or len(factors) != len(weights):
        raise CompositionError(f"got {len(factors)} adapters and {len(weights)} weights; give one weight per adapter")
    for i, f in enumerate(factors):
        if f.A.dim() != 2 or f.B.dim() != 2 or f.A.shape[0] != f.B.shape[1]:
            raise CompositionError(
                f"adapter {i}: A {tuple(f.A.shape)} and B {tuple(f.B.shape)} are not (r, in) and (out, r); "
                "pass lora_A and lora_B weights as stored"
            )
    shapes = [(f.B.shape[0], f.A.shape[1]) for f in factors]
    if len(set(shapes)) > 1:
        raise CompositionError(
            f"adapters have different (out, in) shapes {shapes}; combine only adapters of the same base module"
        )
    ranks = [f.A.shape[0] for f in factors]
    if method in FACTOR_METHODS and len(set(ranks)) > 1:
        raise CompositionError(f"{method!r} needs equal ranks, found {ranks}; use 'cat' or 'svd' for mixed ranks")
    svd = method in SVD_METHODS
    if svd and (rank is None or rank < 1):
        raise CompositionError(f"{method!r} needs a positive rank, got {rank}; e.g. rank={max(ranks)}")
    if not svd and (rank is not None or clamp is not None):
        raise CompositionError(f"rank and clamp apply only to the svd methods, not {method!r}; drop them")
    pruning = method.removesuffix("_svd") in PRUNING
    if pruning and (density is None or not 0 < density <= 1):
        raise CompositionError(f"{method!r} needs a density in (0, 1], got {density}")
    if not pruning and density is not None:
        raise CompositionError(f"density applies only to {', '.join(PRUNING)} (and their _svd), not {method!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise CompositionError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
