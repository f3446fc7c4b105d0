"""LoKr (Edalati et al., 2022, KronA; LyCORIS): a weight delta that is a Kronecker product, ΔW = (w1 ⊗ w2) · alpha/r,
each factor stored whole or as a rank-r product, with the shapes a factorization of in and out decides.
"""

from compose.lokr.config import LoKrConfig

__all__ = ["LoKrConfig"]
