"""One AdapterFusion layer: attention of a hidden state over N adapter outputs.

    pᵢ = softmax_i(Q(h)·K(oᵢ) / T),   out = Σᵢ pᵢ·V·oᵢ

h (…, d) is the query source (for LoRA the module's base output, for a bottleneck adapter the
sub-layer's hidden state) and oᵢ (…, d) the members' outputs before any residual. It knows nothing of
where they come from. Q, K: Linear(d, d); V: Linear(d, d, bias=False), as AdapterHub's `BertFusion`.

Initialisation: V = I, K ~ N(0, 0.02), and Q = 0 (weight and bias). AdapterHub draws Q and K both
from N(0, 0.02), so an untrained fusion is some data-dependent mix; with Q = 0 every score is 0 and
pᵢ = 1/N exactly, so an untrained fusion *is* the uniform average of its members (a known starting
point, and the reference the tests check). Training still moves: ∂L/∂Q ∝ K·oᵢ ≠ 0 because K is random
(with Q = K = 0 both gradients would vanish).
"""

from __future__ import annotations

import torch
from torch import nn


class FusionLayer(nn.Module):
    """Attention over N adapter outputs, with parameters shared across members (so N may change)."""

    def __init__(self, dim: int, temperature: float = 1.0, *, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        linear = lambda bias: nn.utils.skip_init(nn.Linear, dim, dim, bias=bias, dtype=dtype, device=device or "cpu")  # noqa: E731 (draws no RNG)
        self.query, self.key, self.value = linear(True), linear(True), linear(False)
        self.temperature = temperature
        self.record = False  # when on, accumulate the attention each member receives (for pruning)
        self.attention_sum: torch.Tensor | None = None  # (N,) Σ pᵢ over every recorded position
        self.attention_count = 0
        with torch.no_grad():
            self.query.weight.zero_()
            self.query.bias.zero_()
            generator = generator if generator is not None else torch.Generator().manual_seed(0)  # never the global RNG
            self.key.weight.copy_(torch.randn(dim, dim, generator=generator) * 0.02)  # drawn on the CPU: same K on any device
            self.key.bias.zero_()
            self.value.weight.copy_(torch.eye(dim))

    def forward(self, hidden: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """Fuse `outputs` (N, …, d) under the query `hidden` (…, d); returns (…, d)."""
        # Q(h)·K(oᵢ) = (Kᵀ·Q(h))·oᵢ + Q(h)·b_k: one d×d product instead of N, and the key bias term is
        # the same for every member, so it cancels in the softmax
        query = self.query(hidden) @ self.key.weight
        probs = ((outputs * query).sum(-1) / self.temperature).softmax(0)  # (N, …)
        if self.record:
            seen = probs.detach().flatten(1)
            self.attention_sum = seen.sum(1) + (0 if self.attention_sum is None else self.attention_sum)
            self.attention_count += seen.shape[1]
        return self.value((probs.unsqueeze(-1) * outputs).sum(0))  # V has no bias: V·Σpᵢoᵢ = Σpᵢ·V·oᵢ

    def value_regularization(self) -> torch.Tensor:
        """‖I − V‖²_F: keeps V near the identity, so the fusion stays a mix of the members' outputs."""
        weight = self.value.weight
        return (torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device) - weight).square().sum()
