"""The contrastive objective for encoders without a head, against the formula written out."""

from __future__ import annotations

import math

import torch

from compose.objectives import mean_pool, supervised_contrastive_loss


def test_supcon_equals_the_formula():
    e = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = torch.tensor([0, 0, 1, 2])  # anchors 2 and 3 have no positive and do not count
    t = 0.1
    s = (e @ e.T / t).tolist()
    expected = 0.0
    for i, j in ((0, 1), (1, 0)):
        expected += -(s[i][j] - math.log(sum(math.exp(s[i][k]) for k in range(4) if k != i)))
    torch.testing.assert_close(supervised_contrastive_loss(e, labels, t), torch.tensor(expected / 2), atol=1e-5, rtol=1e-5)


def test_supcon_without_any_positive_is_zero_with_a_gradient():
    e = torch.randn(1, 8, requires_grad=True)
    loss = supervised_contrastive_loss(e, torch.tensor([3]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(e.grad, torch.zeros_like(e))


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    out = mean_pool(hidden, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0]]))
