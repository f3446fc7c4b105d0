"""The bottleneck adapter (one per site and adapter) and the site that runs a layer's adapters.

At a site, h is the sub-layer's output, x its residual and `norm` the LayerNorm that closes it (None in
pre-LN models; see `compose.families`). AdapterHub's wiring, in eval mode (dropout off):

    pre:      parallel:     input x, residual x
              sequential:   r = h;  a = h + x, r = a if 'post_add', a = LN(a)  (with original_ln_before);
                            r = a if residual_before_ln is False
    adapter:  u = s·up(act(down(LN_b(a))));  o = u·gate;  o = LN_a(o + r) or LN_a(o) + r  (parallel: LN_a(o))
    post:     o = o + h (parallel);  LN(o + x) with original_ln_after, else o

A stack runs pre + adapter for each adapter in turn on the running o, then the last one's post.
A fusion runs the last member's pre once, each member's adapter on it, and fuses their u (see
`compose.fusion.layer`); its query is h (`query_before_ln`) or the pre's output (x for a parallel
last member), and its residual r is added to the u's before (`residual_before`) or to the result after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compose.bottleneck.config import BottleneckConfig
from compose.errors import CompositionError


def activation(name: str):
    """AdapterHub's non-linearity `name`: transformers' ACT2FN entry (lower-cased), or leaky ReLU."""
    from transformers.activations import get_activation

    name = name.lower()
    if name == "leakyrelu":
        return F.leaky_relu
    try:
        return get_activation(name)
    except KeyError:
        raise CompositionError(f"non_linearity {name!r} is not a transformers activation (relu, gelu, swish, tanh, ...); fix the adapter config") from None


def expected_shapes(config: BottleneckConfig, layer: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The tensors one adapter has at one site of `layer`, keyed as `Bottleneck.state_dict()` keys them."""
    m = config.bottleneck_size(layer, hidden)
    shapes = {"adapter_down.weight": (m, hidden), "adapter_down.bias": (m,), "adapter_up.weight": (hidden, m), "adapter_up.bias": (hidden,)}
    for norm, present in (("adapter_norm_before", config.ln_before), ("adapter_norm_after", config.ln_after)):
        if present:
            shapes |= {f"{norm}.weight": (hidden,), f"{norm}.bias": (hidden,)}
    if config.use_gating:
        shapes |= {"gate.weight": (1, hidden), "gate.bias": (1,)}
    if isinstance(config.scaling, str):
        shapes["scaling"] = (1,) if config.scaling == "learned" else (hidden,)
    return shapes


class Bottleneck(nn.Module):
    """One adapter at one site: its tensors (frozen) and AdapterHub's pre / forward / post steps."""

    def __init__(self, config: BottleneckConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.act = activation(config.non_linearity)
        hidden, m = tensors["adapter_up.weight"].shape
        linear = lambda i, o: nn.utils.skip_init(nn.Linear, i, o, dtype=dtype)  # filled below
        self.adapter_down, self.adapter_up = linear(hidden, m), linear(m, hidden)
        norm = lambda: nn.LayerNorm(hidden, dtype=dtype)  # AdapterHub's: eps 1e-5
        self.adapter_norm_before = norm() if config.ln_before else None
        self.adapter_norm_after = norm() if config.ln_after else None
        self.gate = linear(hidden, 1) if config.use_gating else None
        self.scaling = nn.Parameter(torch.empty(tensors["scaling"].shape, dtype=dtype)) if "scaling" in tensors else config.scaling
        self.load_state_dict({k: t.to(dtype) for k, t in tensors.items()})
        self.requires_grad_(False)

    def pre(self, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(adapter input, adapter residual) from the running output h and the sub-layer's residual x."""
        c = self.config
        if c.is_parallel:
            return x, x
        residual = h
        if c.original_ln_before:
            h = h + x
            if c.residual_before_ln == "post_add":
                residual = h
            if norm is not None:
                h = _norm(norm, h)
        if c.residual_before_ln is False:
            residual = h
        return h, residual

    def forward(self, a: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, u): the adapter's output and its scaled up-projection u (what a fusion attends over)."""
        z = a if self.adapter_norm_before is None else self.adapter_norm_before(a)
        up = self.adapter_up(self.act(self.adapter_down(z))) * self.scaling
        out = up if self.gate is None else up * torch.sigmoid(self.gate(a)).mean(1, keepdim=True)  # one gate per sequence
        if self.config.is_parallel:
            return (out if self.adapter_norm_after is None else self.adapter_norm_after(out)), up
        if self.config.adapter_residual_before_ln:
            out = out + residual
        if self.adapter_norm_after is not None:
            out = self.adapter_norm_after(out)
        if not self.config.adapter_residual_before_ln:
            out = out + residual
        return out, up

    def post(self, out: torch.Tensor, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None, block_adds_x: bool) -> torch.Tensor:
        """The sub-layer's result from the adapters' output; with `block_adds_x` (pre-LN) less the x the block adds."""
        if self.config.is_parallel:
            out = out + h
        if block_adds_x:
            return out if self.config.original_ln_after else out - x
        if not self.config.original_ln_after:
            return out
        return out + x if norm is None else _norm(norm, out + x)


def _norm(norm: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """The base model's norm on `t` (in the adapters' dtype), run in the norm's own dtype."""
    return norm(t.to(norm.weight.dtype)).to(t.dtype)


class BottleneckSite(nn.Module):
    """The bottleneck adapters at one site of one layer (a layer's `mh_adapter` or `output_adapter` child).

    It holds the adapters and, when a fusion covers it, the fusion (so tensors are keyed
    `<layer>.<location>.<adapter>...` and `<layer>.<location>.fusion...`). The model's own modules stay in
    place; hooks hand the site h and x and take its result (`compose.bottleneck.model`). With `skip` set
    (AdapterDrop) or nothing active, the sub-layer's output is left exactly as the base computes it.
    """

    def __init__(self, post_ln: bool, dtype: torch.dtype):
        super().__init__()
        self.post_ln = post_ln
        self.dtype = dtype  # new adapters' and fusions' (fp32, or fp64 over fp64 bases)
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()  # the stack, in order
        self.fusion: nn.Module | None = None
        self.fused: tuple[str, ...] = ()
        self.query_before_ln = False
        self.residual_before = False
        self.skip = False  # AdapterDrop
        self.handles: list = []  # the hooks feeding this site
        self.captured: dict[str, torch.Tensor] = {}  # h / x of the current forward

    def set_fusion(self, fusion: nn.Module | None, names: tuple[str, ...] = ()) -> None:
        """Fuse adapters `names` with `fusion` here instead of stacking the active ones (None: back to the stack).
        The placement (`query_before_ln`, `residual_before`) is the attach function's to set, and stays."""
        self.fusion, self.fused = fusion, tuple(names)

    def runs(self) -> bool:
        """Whether a forward now changes the sub-layer's output."""
        return not self.skip and bool(self.fused if self.fusion is not None else self.active)

    def forward(self, h: torch.Tensor, x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """The sub-layer's result (post-LN) or what the block should add to x (pre-LN), for output h and residual x."""
        stack = [self.adapters[n] for n in (self.active if self.fusion is None else self.fused)]
        out_dtype, dtype = h.dtype, stack[0].adapter_up.weight.dtype  # the adapters' (fp32 over half-precision bases)
        h, x = h.to(dtype), x.to(dtype)
        if self.fusion is None:
            out = h
            for adapter in stack:
                out, _ = adapter(*adapter.pre(out, x, norm))
        else:
            a, residual = stack[-1].pre(h, x, norm)
            query = x if stack[-1].config.is_parallel else h if self.query_before_ln else a
            ups = torch.stack([adapter(a, residual)[1] for adapter in stack])
            if self.residual_before:
                ups = ups + residual
            out = self.fusion(query, ups)
            if not self.residual_before:
                out = out + residual
        return stack[-1].post(out, h, x, norm, block_adds_x=not self.post_ln).to(out_dtype)
