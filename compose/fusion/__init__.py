"""AdapterFusion (Pfeiffer et al., EACL 2021): per adapted module, attention over the adapters' outputs.

    y = y₀ + Σᵢ pᵢ·V·δᵢ,   pᵢ = softmax_i(Q(y₀)·K(δᵢ) / T)

with y₀ the module's base output (the query) and δᵢ the member adapters' outputs (keys and values).
`config` is torch-free; `layer` holds the math, `model` installs it on a model, `train` fits it.
"""

from compose.fusion.config import FusionConfig

__all__ = ["FusionConfig"]
