"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020; He et al. 2021): a small MLP after a
layer's attention and/or feed-forward block,

    u = s·up(act(down(a))),   a the sub-layer's output (sequential) or its input (parallel),

added back around the sub-layer's residual and LayerNorm exactly as AdapterHub's `seq_bn`,
`double_seq_bn` and `par_bn` do. `config` is torch-free; `layer` holds the math, `model` places it
(where: `compose.families`), `fusion` fuses several with attention.
"""

from compose.bottleneck.config import BottleneckConfig

__all__ = ["BottleneckConfig"]
