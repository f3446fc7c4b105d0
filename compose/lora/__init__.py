"""LoRA (Hu et al., 2021): W' = W + s·B·A with A ∈ R^{r×in}, B ∈ R^{out×r}, s = alpha/r (or alpha/√r)."""

from compose.lora.config import LoraConfig

__all__ = ["LoraConfig"]
