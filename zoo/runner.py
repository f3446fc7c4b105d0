"""`zoo run`: load a base with adapters and run prompts through it — generation for causal LMs,
sentence-embedding similarities (mean pooling) for encoders."""

from __future__ import annotations

import time
from typing import Any

from zoo.api import PathLike


def run_prompts(base: str, prompts: list[str], *, max_new_tokens: int = 32, registry: PathLike | None = None, **load_kwargs: Any) -> dict[str, Any]:
    """Run `prompts` through `zoo.load(base, **load_kwargs)`; returns what was generated or the similarity matrix."""
    import torch

    from compose.objectives import mean_pool
    from zoo.bases import check_base, load_tokenizer
    from zoo.loading import load
    from zoo.safety import refuse_remote_code

    adapters = load_kwargs.pop("adapters", None) or ()
    trust_remote_code = load_kwargs.pop("trust_remote_code", False)
    check_base(base, revision=load_kwargs.get("revision"))
    refuse_remote_code(base, trust_remote_code, files=("config.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(base, trust_remote_code=trust_remote_code)  # first: it is quicker to miss than the model
    model = load(base, adapters, registry=registry, trust_remote_code=trust_remote_code, **load_kwargs)
    start = time.perf_counter()
    with torch.no_grad():
        if hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM"):
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            batch = tokenizer(prompts, return_tensors="pt", padding=True)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            return {"generated": texts, "seconds": time.perf_counter() - start}
        batch = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # a bare encoder or one with a head
        embeddings = mean_pool(hidden, batch["attention_mask"])
        return {"similarity": (embeddings @ embeddings.T).tolist(), "seconds": time.perf_counter() - start}
