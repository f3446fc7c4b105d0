"""Train the demo's example LoRA adapters on all-MiniLM-L6-v2 and save them in PEFT format.

    python examples/make_adapters.py      # ~1 min on 2 CPU cores; writes examples/adapters/<name>/

- minilm-sentiment: embeddings where reviews of the same sentiment are neighbours;
- minilm-topic:     embeddings where reviews of the same topic are neighbours.
Both: LoRA r=8, alpha 16 on the attention query/value projections of all 6 layers, trained with a
supervised contrastive loss on examples/data/reviews-train.jsonl. Uses adapter-zoo's own engine
(no peft); the result loads in peft as well.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compose.lora.config import LoraConfig  # noqa: E402
from compose.lora.model import attach_lora  # noqa: E402
from compose.lora.state import lora_parameters, lora_state, new_lora_state  # noqa: E402
from examples.common import ADAPTERS, BASE_ID, minilm_path, train_contrastive  # noqa: E402
from zoo.formats.peft import save_adapter  # noqa: E402

CONFIG = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
STEPS, BATCH, LR = 60, 48, 2e-3


def train(key: str, seed: int) -> dict[str, torch.Tensor]:
    """A fresh LoRA on MiniLM trained so that `key` (topic or sentiment) decides who is a neighbour."""
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).train()
    model.requires_grad_(False)
    attach_lora(model, key, CONFIG, new_lora_state(model, CONFIG, seed=seed))
    train_contrastive(model, tokenizer, lora_parameters(model, key), key, lr=LR, seed=seed, label=f"minilm-{key}", steps=STEPS, batch=BATCH)
    return lora_state(model.eval(), key)


def main() -> None:
    for seed, key in enumerate(("sentiment", "topic")):
        folder = save_adapter(ADAPTERS / f"minilm-{key}", CONFIG, train(key, seed), base_model=BASE_ID, task_type="FEATURE_EXTRACTION")
        print(f"saved {folder}")


if __name__ == "__main__":
    main()
