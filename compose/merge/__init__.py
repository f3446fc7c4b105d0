"""Merging LoRA deltas into base weights: streamed checkpoint-to-checkpoint (`merge_checkpoint`), in full
precision or into a bitsandbytes-quantized base, with a report of the rounding each merge adds.

    merge_checkpoint(base_dir, out_dir, {"model.layers.0.self_attn.q_proj": [LoraDelta(A, B, s)]})

Modules: `checkpoint` (the streaming merge), `shards` (safetensors layout and writer), `bnb`
(bitsandbytes quantization as transformers applies it), `report` (what a merge reports, torch-free).
In-memory merges are `compose.lora.layer.LoraLayer.merge()` / `unmerge()`. Importing this package is
cheap: torch loads on first use of `merge_checkpoint` or `LoraDelta`.
"""

from __future__ import annotations

from compose.merge.report import MergeReport, ModuleReport, QuantError

__all__ = ["LoraDelta", "MergeReport", "ModuleReport", "QuantError", "merge_checkpoint"]


def __getattr__(name: str):
    if name in ("LoraDelta", "merge_checkpoint"):
        from compose.merge import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'compose.merge' has no attribute {name!r}")
