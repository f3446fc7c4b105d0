"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations, y = l ⊙ (W·x + b) at attention-like
modules and y = W·(l ⊙ x) + b at feed-forward ones. Several adapters at one module multiply their vectors.
"""

from compose.ia3.config import IA3Config

__all__ = ["IA3Config"]
