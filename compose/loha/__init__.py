"""LoHa (Hyeon-Woo et al., 2022, FedPara; LyCORIS): a weight delta that is the Hadamard product of two low-rank
matrices, ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r — rank up to r² from 4·r·(in+out)/2 parameters.
"""

from compose.loha.config import LoHaConfig

__all__ = ["LoHaConfig"]
