"""Fit an attached AdapterFusion (over LoRA or bottleneck adapters): base model and adapters frozen,
Q/K/V of every fused module (LoRA layer or bottleneck site) trained.

    loss = objective + regularization · Σ ‖I − V‖²_F

Objectives, by what the model has:
- "causal_lm": the model's own next-token loss with `labels = input_ids` (padding, i.e. attention_mask 0, → −100).
- "classification": cross-entropy of the model's `logits` against the batch's `labels`. The head (every
  parameter outside `model.base_model`, e.g. BERT's `classifier`) trains with the fusion, as AdapterHub
  trains a head on top of a fusion.
- "contrastive": encoders without a head (sentence embedders): supervised contrastive loss on mean-pooled
  embeddings with the batch's `labels` (each batch needs two examples of some label).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from compose.drop import random_drop
from compose.errors import CompositionError
from compose.fusion.model import attached_fusion, fusion_parameters, fusion_regularization
from compose.objectives import mean_pool, supervised_contrastive_loss

Objective = Literal["causal_lm", "classification", "contrastive"]
Batches = Callable[[], Iterable[dict[str, torch.Tensor]]] | Iterable[dict[str, torch.Tensor]]


def train_fusion(
    model: nn.Module,
    batches: Batches,
    *,
    objective: Objective,
    epochs: int = 1,
    lr: float = 5e-5,
    drop_train: bool = False,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the fusion attached to `model` in place and return the loss of every step.

    Args:
        model: a model with a fusion attached (`compose.fusion.model.attach_fusion`,
            `compose.bottleneck.fusion.attach_bottleneck_fusion`, or `compose.methods.attach_fusion`).
        batches: a list of batches, or a function returning a fresh iterable of them per epoch. A batch is the
            model's keyword inputs (`input_ids`, `attention_mask`, ...) plus `labels` for "classification"
            and "contrastive"; tensors are moved to the model's device.
        objective: "causal_lm", "classification" or "contrastive" (see the module docstring).
        epochs: passes over `batches`.
        lr: AdamW learning rate (5e-5 in the AdapterFusion paper; tiny models want more). No weight decay:
            the ‖I − V‖² term is the fusion's regulariser.
        drop_train: robust AdapterDrop: each step drops the adapters of a random number of first layers.
        seed: seeds dropout and the drop draws (the global RNG is restored afterwards).
        on_step: called as `on_step(step, loss)` after every step (1-based), e.g. to drive a progress bar.

    Raises:
        CompositionError: no fusion is attached, an unknown objective, or the model lacks what the objective
            needs (a loss, `logits`, `last_hidden_state`, `labels` in the batch).
    """
    if objective not in ("causal_lm", "classification", "contrastive"):
        raise CompositionError(f"unknown fusion objective {objective!r}; use causal_lm, classification or contrastive")
    fused = attached_fusion(model)
    if fused is None:
        raise CompositionError("no fusion is attached to this model; attach_fusion(model, ...) first")
    regularization = fused[1].regularization
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    losses: list[float] = []
    try:
        model.requires_grad_(False)
        trainable = fusion_parameters(model) + (_head_parameters(model) if objective == "classification" else [])
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        device = getattr(model, "device", trainable[0].device)  # transformers: where the inputs go (first layer's device)
        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(epochs):
                for batch in batches() if callable(batches) else batches:
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    with random_drop(model, generator) if drop_train else contextlib.nullcontext():
                        loss = _objective_loss(model, batch, objective) + regularization * fusion_regularization(model)
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                    losses.append(loss.item())
                    if on_step is not None:
                        on_step(len(losses), losses[-1])
        optimizer.zero_grad()  # frees the fusion's gradients
    finally:
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return losses


def causal_lm_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`labels` for next-token training: the batch's own, else `input_ids` with padding (attention_mask 0) set to −100."""
    if "labels" in batch:
        return batch["labels"]
    mask = batch.get("attention_mask")
    return batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, -100)


def _objective_loss(model: nn.Module, batch: dict[str, torch.Tensor], objective: Objective) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if objective == "causal_lm":
        loss = getattr(model(**inputs, labels=causal_lm_labels(batch)), "loss", None)
        if loss is None:
            raise CompositionError(f"{type(model).__name__} returns no loss for labels=; causal_lm needs a ...ForCausalLM model")
        return loss
    if "labels" not in batch:
        raise CompositionError(f"objective {objective!r} needs `labels` in every batch")
    out = model(**inputs)
    if objective == "classification":
        if getattr(out, "logits", None) is None:
            raise CompositionError(f"{type(model).__name__} returns no logits; classification needs a model with a head (or use contrastive)")
        return F.cross_entropy(out.logits.float(), batch["labels"])
    if getattr(out, "last_hidden_state", None) is None:
        raise CompositionError(f"{type(model).__name__} returns no last_hidden_state; contrastive needs a bare encoder (e.g. BertModel)")
    mask = inputs.get("attention_mask", torch.ones(out.last_hidden_state.shape[:2], device=out.last_hidden_state.device))
    return supervised_contrastive_loss(mean_pool(out.last_hidden_state.float(), mask), batch["labels"])


def _head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters outside `model.base_model` (a task head), with gradients on; none for a bare model."""
    base = getattr(model, "base_model", model)
    inside = {id(p) for p in base.parameters()}
    head = [p for p in model.parameters() if id(p) not in inside]
    for p in head:
        p.requires_grad_(True)
    return head
