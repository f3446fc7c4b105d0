"""Adapter folders written byte by byte, without torch: cheap enough to make by the thousand in tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj."


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    """A safetensors file: u64 header length, the JSON header (space-padded to 8 bytes), the data."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def write_adapter(folder: Path, seed: int) -> Path:
    """A valid PEFT LoRA folder (r=1 on one 4-wide q_proj) whose weights hold `seed`: distinct bytes per seed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    header = {
        PREFIX + "lora_A.weight": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]},
        PREFIX + "lora_B.weight": {"dtype": "F32", "shape": [4, 1], "data_offsets": [16, 32]},
    }
    (folder / "adapter_model.safetensors").write_bytes(safetensors_bytes(header, struct.pack("<8f", seed, 1, 2, 3, 4, 5, 6, -seed)))
    return folder
