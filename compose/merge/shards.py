"""Safetensors files read and written one tensor at a time, so that a merge holds one tensor, never a shard.

Format: 8 bytes (little-endian header length), a JSON header {name: {dtype, shape, data_offsets}},
then the tensors' bytes, back to back. The reader reads each tensor with plain file reads into a
fresh tensor. The writer sends each tensor's bytes straight to a spool file, one per element size,
and `close` writes the header followed by the spools, largest elements first: the order
safetensors' own writer uses so that every tensor starts aligned (the format allows no gaps).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from compose.errors import CompositionError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


@dataclass
class Layout:
    """A checkpoint's weight files: shard names in order, and its index (None for a single file)."""

    shards: list[str]
    index: dict | None


def read_layout(folder: Path) -> Layout:
    """The safetensors weights of a `save_pretrained` folder: `model.safetensors`, or the shards that
    `model.safetensors.index.json` names.

    Raises:
        CompositionError: neither file is there.
    """
    if (folder / INDEX_NAME).is_file():
        index = read_json(folder / INDEX_NAME)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CompositionError(f"{folder / INDEX_NAME}: 'weight_map' must map tensor names to shard file names; re-download the checkpoint")
        if not isinstance(index.get("metadata", {}), dict):
            raise CompositionError(f"{folder / INDEX_NAME}: 'metadata' must be an object; re-download the checkpoint")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            _check_shard_name(folder, shard)
        return Layout(shards, index)
    if (folder / WEIGHTS_NAME).is_file():
        return Layout([WEIGHTS_NAME], None)
    raise CompositionError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; save the base with save_pretrained(safe_serialization=True)")


def read_json(path: Path, max_bytes: int = 64 << 20) -> dict:
    """A checkpoint's JSON object (config.json, the shard index), with a one-line error for anything else."""
    if path.stat().st_size > max_bytes:
        raise CompositionError(f"{path} is {path.stat().st_size:,} bytes, over the {max_bytes:,} a checkpoint's JSON file may be")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CompositionError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise CompositionError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _check_shard_name(folder: Path, name: str) -> None:
    """A shard the index names must be a safetensors file of `folder` itself: an absolute path, '..' or a link out
    of the folder would make a merge read (and a merge into the base folder's neighbour rewrite) some other file,
    and a name without the weight extension would have the folder's other files copied over the merged shard."""
    path = folder / name
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or not name.endswith(".safetensors") or not stays_inside(folder, path):
        raise CompositionError(f"{folder / INDEX_NAME} names shard {name!r}, which is not a safetensors file of {folder}; a shard index names files beside it")


def stays_inside(folder: Path, path: Path) -> bool:
    """Whether `path` (in `folder`, maybe a link) resolves inside the checkpoint: `folder` itself, or for a
    snapshot of the Hugging Face cache (`models--org--name/snapshots/REV`) that repo's cache folder, whose
    `blobs/` the snapshot's files link to."""
    root = folder.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return path.resolve().is_relative_to(root.parent.parent)
    return path.resolve().parent == root


def is_weight_file(name: str) -> bool:
    """Files that hold a model's weights in some format (never copied next to merged weights)."""
    return name.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")) or name.endswith(".index.json")


def map_large_allocations() -> None:
    """Have glibc serve every allocation of 1 MiB or more by its own mmap, so a freed tensor goes back to the
    OS at once. By default glibc raises that threshold after the first large free (up to 32 MiB), and later
    tensors come from the heap, whose freed holes it keeps: a walk that reads a tensor pair per module then
    grows its RSS by about a tensor per module. A no-op where the C library has no `mallopt` (not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; setting it also turns the dynamic threshold off
    except (OSError, AttributeError, TypeError):
        pass


class ShardReader:
    """A safetensors file read one tensor at a time with plain reads, so only the tensor being read is
    resident (`safe_open` memory-maps the file: every page read stays resident until it closes, and
    `get_tensor` copies it once more)."""

    def __init__(self, path: Path):
        self.path, self._file = path, open(path, "rb", buffering=0)
        size = struct.unpack("<Q", self._file.read(8).ljust(8, b"\xff"))[0]
        if 8 + size > path.stat().st_size:
            self._file.close()
            raise CompositionError(f"{path}: header length {size} runs past the end of the file; re-download the checkpoint")
        header = json.loads(self._file.read(size))
        self.metadata: dict[str, str] | None = header.pop("__metadata__", None)
        self._entries, self._data_start = header, 8 + size

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def shape(self, key: str) -> list[int]:
        return self._entries[key]["shape"]

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        start, end = entry["data_offsets"]
        if entry["dtype"] not in _TORCH_DTYPES:
            raise CompositionError(f"{self.path}: tensor '{key}' has dtype {entry['dtype']}, which a merge does not handle")
        dtype = _TORCH_DTYPES[entry["dtype"]]
        needed = math.prod(entry["shape"]) * dtype.itemsize
        if needed != end - start:  # else the bytes not read would be written out as they were: uninitialised memory
            raise CompositionError(f"{self.path}: tensor '{key}' spans {end - start} bytes, its shape and dtype need {needed}; re-download the checkpoint")
        tensor = torch.empty(entry["shape"], dtype=dtype)
        buffer, done = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), 0
        self._file.seek(self._data_start + start)
        while done < end - start:  # raw reads may return less than asked
            n = self._file.readinto(buffer[done:])
            if not n:
                raise CompositionError(f"{self.path} is truncated (tensor '{key}'); download it again")
            done += n
        return tensor


class ShardWriter:
    """Writes the safetensors file `path` tensor by tensor (`add`), in constant memory; `close` finishes it."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path, self.metadata = path, metadata
        self._spools: dict[int, BinaryIO] = {}
        self._entries: list[tuple[int, str, str, list[int], int, int]] = []  # (element size, name, dtype, shape, start, end) in its spool

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        size = tensor.element_size()
        if size not in self._spools:
            self._spools[size] = tempfile.TemporaryFile(dir=self.path.parent)
        spool = self._spools[size]
        start = spool.tell()
        spool.write(tensor.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, no copy
        self._entries.append((size, name, _DTYPES[tensor.dtype], list(tensor.shape), start, spool.tell()))

    def close(self) -> int:
        """Write the file and return the number of tensor bytes in it."""
        order = sorted(self._spools, reverse=True)
        base, offset = {}, 0
        for size in order:
            base[size], offset = offset, offset + self._spools[size].tell()
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        for size, name, dtype, shape, start, end in sorted(self._entries, key=lambda e: (-e[0], e[4])):
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [base[size] + start, base[size] + end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-aligned, as safetensors pads it
        with open(self.path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for size in order:
                spool = self._spools.pop(size)
                spool.seek(0)
                shutil.copyfileobj(spool, f, 1 << 20)
                spool.close()
        return offset
