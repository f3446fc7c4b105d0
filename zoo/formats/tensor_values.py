"""Adapter weights checked value by value: floating point, and finite.

A NaN or ±Inf in an adapter poisons every output it touches (and every merge it goes into); an integer or bool
tensor is no adapter weight at all. Both are refused when an adapter is added, by streaming the file in bounded
chunks: memory stays at one chunk whatever the file's size.
"""

from __future__ import annotations

from pathlib import Path

from zoo.errors import ZooError
from zoo.formats.safetensors_header import read_safetensors_header

#: The safetensors dtypes adapter weights are stored in (every method's weights are floating point).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
CHUNK_BYTES = 16 << 20


def check_tensor_values(path: Path) -> None:
    """Raise a one-line `ZooError` if a tensor of the safetensors file `path` is not floating point or holds NaN/±Inf.

    Reads the file once, `CHUNK_BYTES` at a time (the header was validated first, so every offset is in range).
    """
    import torch

    header = read_safetensors_header(path)
    for t in header.tensors.values():
        if t.dtype not in FLOAT_DTYPES:
            raise ZooError(f"{path}: tensor {t.name!r} is {t.dtype}; adapter weights are floating point ({', '.join(FLOAT_DTYPES)})",
                           "re-save the adapter with float weights")
    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    start = 8 + header.header_bytes
    with open(path, "rb") as f:
        for t in sorted(header.tensors.values(), key=lambda t: t.data_offsets):
            dtype = dtypes[t.dtype]
            step = CHUNK_BYTES - CHUNK_BYTES % dtype.itemsize
            f.seek(start + t.data_offsets[0])
            left = t.nbytes
            while left:
                chunk = bytearray(f.read(min(step, left)))
                if not chunk:
                    raise ZooError(f"{path}: tensor {t.name!r} is cut short", "the file is truncated; re-save it")
                left -= len(chunk)
                values = torch.frombuffer(chunk, dtype=dtype)
                if not torch.isfinite(values).all():
                    bad = "NaN" if torch.isnan(values).any() else "±Inf"
                    raise ZooError(f"{path}: tensor {t.name!r} holds {bad}", "the adapter's training diverged; use an earlier checkpoint")
