"""Training objectives for adapters and fusion layers on encoders without a task head.

Causal LMs train with transformers' own `labels=` loss; a classifier with its head's cross-entropy.
A sentence encoder (e.g. all-MiniLM-L6-v2) has neither, so labelled sentences train it contrastively:
embeddings of the same label are pulled together, of different labels pushed apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: the mean of the token states, then L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def supervised_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SupCon (Khosla et al., 2020): for each anchor, -log of the softmax mass on its same-label partners."""
    n = embeddings.shape[0]
    logits = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits.log_softmax(dim=1).masked_fill(self_mask, 0.0)
    has_positive = positives.any(1)
    per_anchor = -(log_prob * positives).sum(1) / positives.sum(1).clamp(min=1)
    if not has_positive.any():  # e.g. a last batch of one: nothing to pull together, no gradient (not NaN)
        return embeddings.sum() * 0.0
    return per_anchor[has_positive].mean()
