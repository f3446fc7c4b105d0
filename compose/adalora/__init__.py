"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form, ΔW = B·diag(E)·A · s/(ranknum + 1e-5), with ranks pruned per module.

The engine converts a loaded AdaLoRA adapter exactly into a LoRA one (A' = E⊙A, per-module scaling) and
attaches it through `compose.lora`, so merging, stacking, fusion and weighted sums treat it as LoRA.
"""

from compose.adalora.config import AdaLoraConfig

__all__ = ["AdaLoraConfig"]
