"""PiSSA and OLoRA: LoRA adapters trained on the residual of their own initialisation.

Both start training from factors B₀, A₀ of the base weight W and take them out of the base, so that the
model starts where it was. PEFT loads such an adapter (saved without conversion) by computing them again
and rewriting the base weight, W_res = W − s·B₀·A₀, then adds s·B·A as usual. As PEFT's `pissa_init` /
`olora_init` compute them, in fp32:

    PiSSA:  W = V·S·Uᵀ (full SVD of W as (out, in)),  S_r ← S_r / s,  A₀ = √S_r·U_rᵀ,  B₀ = V_r·√S_r
    OLoRA:  W = Q·R (QR of the weight as stored),      A₀ = R[:r],      B₀ = Q[:, :r]

Both are deterministic, so the engine recomputes them from the base it is given; PiSSA with a randomized
SVD (`pissa_niter_K`) is not, and is refused where configs are read. The base itself is left alone: the
adapter becomes a LoRA of rank 2r, [B, −B₀]·[A; A₀] (PEFT's `convert_pissa_to_lora`), and
W + s·(B·A − B₀·A₀) = W_res + s·B·A in the forward, in every merge, in mixed batches.
"""

from __future__ import annotations

import torch

from compose.errors import CompositionError

#: `LoraConfig.init_lora_weights` values whose base is a residual.
RESIDUAL_INITS = ("pissa", "olora")


def initial_factors(weight: torch.Tensor, init: str, r: int, scaling: float, *, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ (r, in), B₀ (out, r)) in fp32: the factors PiSSA / OLoRA start from, whose s·B₀·A₀ PEFT takes
    out of the base weight.

    Args:
        weight: the base weight as stored: (out, in), or (in, out) with `transposed` (GPT-2's Conv1D).
        init: 'pissa' or 'olora'.
        r: the adapter's rank at this module.
        scaling: its s at this module.

    Raises:
        CompositionError: `init` is neither, or `r` exceeds the weight's smaller side.
    """
    if init not in RESIDUAL_INITS:
        raise CompositionError(f"unknown residual initialisation {init!r}; known: {', '.join(RESIDUAL_INITS)}")
    if r > min(weight.shape):
        raise CompositionError(f"a {init} adapter of rank {r} on a {tuple(weight.shape)} weight: the rank exceeds the weight's smaller side; the adapter was made for another model")
    stored = weight.detach().to(torch.float32)
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(stored.T if transposed else stored, full_matrices=False)
        root = torch.diag(torch.sqrt(S[:r] / scaling))
        return root @ Uh[:r], V[:, :r] @ root
    # OLoRA factors the weight as stored, so on a Conv1D its Q·R is the transposed delta
    Q, R = torch.linalg.qr(stored)
    Qr, Rr = Q[:, :r], R[:r]
    return (Qr.T.contiguous(), Rr.T.contiguous()) if transposed else (Rr.contiguous(), Qr.contiguous())


def with_residual(lora_A: torch.Tensor, lora_B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-2r factors [A; A₀], [B, −B₀]: s·B·A on the residual base, as a LoRA on the base itself."""
    return torch.cat([lora_A, A0.to(lora_A)]), torch.cat([lora_B, -B0.to(lora_B)], dim=1)
