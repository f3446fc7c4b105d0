"""AdapterDrop (Rücklé et al., EMNLP 2021): no adapters in the first k transformer layers.

At inference the lower layers then run the base model alone (faster; with several tasks on one
input they could be shared). Trained with a random k per step ("robust AdapterDrop"), one set of
adapters works for every k. A module's layer is the integer after the model's layer list in its path
(`model.layers.3.…`, `transformer.h.3.…`, `bert.encoder.layer.3.…`, `….blocks.3.…`); modules outside
it (heads, embeddings) are never dropped. Fused layers drop their fusion too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from compose.bottleneck.layer import BottleneckSite
from compose.errors import CompositionError
from compose.families import layer_list
from compose.ia3.layer import IA3Layer
from compose.lora.layer import LoraLayer

#: The per-layer adapter modules AdapterDrop switches off (each has a `skip` flag its forward obeys).
DROPPABLE_LAYERS: tuple[type[nn.Module], ...] = (LoraLayer, IA3Layer, BottleneckSite)

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)(?:\.|$)")


def layer_index(path: str) -> int | None:
    """The transformer layer a module path lies in (`model.layers.3.mlp.up_proj` → 3), or None.

    >>> layer_index("transformer.h.1.attn.c_attn"), layer_index("lm_head")
    (1, None)
    """
    match = _LAYER.search(path)
    return None if match is None else int(match.group(1))


def num_layers(model: nn.Module) -> int:
    """L: the length of the model's layer list (`compose.families.layer_list`).

    Raises:
        CompositionError: the model has no `layers` / `h` / `layer` / `blocks` module list.
    """
    return len(layer_list(model, "AdapterDrop cannot tell its layers apart"))


def set_drop(model: nn.Module, k: int) -> None:
    """Run no adapter (and no fusion) in the first `k` layers; `k = 0` runs them everywhere again.

    Applies to the adapter layers (LoRA, IA3, bottleneck) attached now: call it after attaching.

    Raises:
        CompositionError: `k` is outside [0, L], or `k > 0` with a merged layer (its adapters live in the weights).
    """
    total = num_layers(model)
    if not 0 <= k <= total:
        raise CompositionError(f"drop k={k} is outside [0, {total}] for this {total}-layer model")
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, DROPPABLE_LAYERS)]
    merged = [path for path, m in layers if _is_merged(m)]
    if k and merged:
        raise CompositionError(f"adapter layer '{merged[0]}' is merged; unmerge() it before dropping adapters")
    for path, m in layers:
        index = layer_index(path)
        m.skip = index is not None and index < k
    model._compose_drop = k


def _is_merged(layer: nn.Module) -> bool:
    """LoRA layers keep a list of merged adapters, IA3 layers the merged product (None when unmerged)."""
    merged = getattr(layer, "merged", None)
    return merged is not None and not (isinstance(merged, list) and not merged)


def current_drop(model: nn.Module) -> int:
    """The k of the last `set_drop` (0 if none)."""
    return getattr(model, "_compose_drop", 0)


@contextmanager
def random_drop(model: nn.Module, generator: torch.Generator | None = None) -> Iterator[int]:
    """For one training step: drop the adapters of the first k layers, k uniform in [0, L − 1]; restore on exit.

    Yields k. With `generator` the draws are reproducible.

    >>> with random_drop(model, generator) as k:  # doctest: +SKIP
    ...     loss = model(**batch).loss; loss.backward()
    """
    previous = current_drop(model)
    k = int(torch.randint(num_layers(model), (), generator=generator))
    set_drop(model, k)
    try:
        yield k
    finally:
        set_drop(model, previous)
