"""VeRA (Kopiczko et al., 2024): one pair of frozen random projections A (r, in), B (out, r) shared by every adapted
module, and per module two trained vectors: ΔW = diag(λ_b)·B·diag(λ_d)·A.
"""

from compose.vera.config import VeraConfig

__all__ = ["VeraConfig"]
