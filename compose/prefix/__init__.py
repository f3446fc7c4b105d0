"""Prefix tuning (Li & Liang, 2021) / P-tuning v2 (Liu et al., 2022): learned keys and values prepended
in every attention layer, so each real token also attends to T virtual ones:

    attn(q, [P_k; K], [P_v; V])

`config` is torch-free; `model` installs the prefix as a pre-filled KV cache on a transformers model.
"""

from compose.prefix.config import PrefixConfig

__all__ = ["PrefixConfig"]
