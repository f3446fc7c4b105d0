"""MAM adapter (He et al., ICLR 2022, "mix-and-match"): prefix tuning in every attention layer plus a
parallel bottleneck adapter beside every feed-forward block, as AdapterHub's `MAMConfig`.
`config` is torch-free; `model` attaches the two halves with `compose.prefix` and `compose.bottleneck`.
"""

from compose.mam.config import MamConfig

__all__ = ["MamConfig"]
