"""Read a .safetensors file's header — names, dtypes, shapes, offsets — without touching tensor data.

A safetensors file is `u64 little-endian header length N` + `N bytes of JSON` + a flat data buffer.
Reading the 8 + N bytes tells us every tensor's size, so inspecting a 10 GB file costs the same as a
10 kB one. The checks mirror what the `safetensors` library itself refuses (contiguous, in-range
offsets; sizes that agree with shape × dtype), so a file that passes here also loads there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import ZooError

#: Bits per element of every dtype safetensors 0.8 defines (sub-byte floats are packed; bitsandbytes
#: stores its 4-bit weights as U8, so they count as bytes here).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}

#: The same limit safetensors enforces: a larger header is a corrupt length prefix, not a real header.
MAX_HEADER_BYTES = 100_000_000

#: The largest element count or size safetensors computes (a usize, checked on every multiplication).
MAX_COUNT = 2**64 - 1

_HINT = "the file is not a valid safetensors file (truncated download or a different format?); re-download or re-save it"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it; `data_offsets` are relative to the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    data_offsets: tuple[int, int]


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one .safetensors file.

    Attributes:
        path: The file read.
        header_bytes: Length of the JSON header (the file's overhead is `8 + header_bytes`).
        file_bytes: Size of the whole file.
        tensors: Tensor name → `TensorInfo`, in header order.
        metadata: The free-form `__metadata__` string map (empty when absent).
    """

    path: Path
    header_bytes: int
    file_bytes: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header of a .safetensors file, reading only its first `8 + N` bytes.

    Args:
        path: The .safetensors file.

    Returns:
        `SafetensorsHeader` with every tensor's dtype, shape, element count and byte size.

    Raises:
        ZooError: One line naming the file and the problem: missing file, a header length beyond the
            file or the 100 MB limit, invalid JSON or UTF-8, duplicate keys, an unknown dtype, a
            malformed shape or offsets, a size that disagrees with shape × dtype, or offsets that
            overlap, leave gaps or run past the end of the file.
    """
    path = Path(path)

    def fail(problem: str) -> ZooError:
        return ZooError(f"{path}: {problem}", _HINT)

    try:
        with open(path, "rb", buffering=0) as f:  # unbuffered: read exactly the bytes we ask for
            file_bytes = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise fail(f"file is {file_bytes} bytes, too short for the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES:
                raise fail(f"header length {n} exceeds the {MAX_HEADER_BYTES:,}-byte limit")
            if 8 + n > file_bytes:
                raise fail(f"header length {n} is larger than the file ({file_bytes} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise ZooError(f"{path}: cannot read ({e.strerror})", "check the path") from None

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict:
        result = dict(pairs)
        if len(result) != len(pairs):
            keys = [k for k, _ in pairs]
            raise fail(f"header repeats key {next(k for k in keys if keys.count(k) > 1)!r}")
        return result

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except UnicodeDecodeError:
        raise fail("header is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise fail(f"header is not valid JSON ({e.msg} at byte {e.pos})") from None
    except ValueError as e:  # an integer of more than 4,300 digits, which Python will not convert
        raise fail(f"header is not valid JSON ({str(e).split(';')[0]})") from None
    except RecursionError:  # "[[[[...": no real header nests more than three levels
        raise fail("header nests too deeply") from None
    if not isinstance(header, dict):
        raise fail(f"header is a JSON {type(header).__name__}, not an object")
    try:  # Python's json takes "\udcff", a lone surrogate; safetensors (Rust) refuses it, and so do we
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise fail("header escapes a lone UTF-16 surrogate, which is not Unicode") from None

    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # null is "none"; [] or "" is a malformed map, as safetensors says
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise fail("__metadata__ must map strings to strings")

    data_bytes = file_bytes - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        tensors[name] = _tensor_info(name, info, data_bytes, fail)

    # The data buffer must be tiled exactly: no tensor overlaps another, no byte is unaccounted for.
    end, previous = 0, None
    for t in sorted(tensors.values(), key=lambda t: t.data_offsets):
        begin = t.data_offsets[0]
        if begin < end:
            raise fail(f"tensor {t.name!r} overlaps {previous!r} (starts at {begin}, {previous!r} ends at {end})")
        if begin > end:
            raise fail(f"{begin - end} unused bytes before tensor {t.name!r} (offsets must be contiguous)")
        end, previous = t.data_offsets[1], t.name
    if end != data_bytes:
        raise fail(f"{data_bytes - end} bytes after the last tensor are not described by the header")

    return SafetensorsHeader(path=path, header_bytes=n, file_bytes=file_bytes, tensors=tensors, metadata=metadata)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _tensor_info(name: str, info: object, data_bytes: int, fail) -> TensorInfo:
    """Validate one header entry: known dtype, well-formed shape/offsets, size = numel × itemsize, in range."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise fail(f"tensor {name!r} needs 'dtype', 'shape' and 'data_offsets'")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise fail(f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise fail(f"tensor {name!r} has shape {shape!r}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise fail(f"tensor {name!r} has data_offsets {offsets!r}; expected [begin, end]")
    begin, end = offsets
    numel = 1
    for d in shape:  # as safetensors folds it: an overflow of 64 bits is an error even if a later dim is 0
        numel *= d   # (and each product stays small, so a 40,000-dim shape costs 40,000 steps, not big-number math)
        if numel > MAX_COUNT:
            raise fail(f"tensor {name!r} has shape of {len(shape)} dims whose product overflows 64 bits")
    bits = numel * DTYPE_BITS[dtype]
    if bits > MAX_COUNT:
        raise fail(f"tensor {name!r} ({dtype}, {numel} elements) overflows 64 bits of size")
    if bits % 8:
        raise fail(f"tensor {name!r} ({dtype} {shape}) does not fill a whole number of bytes")
    if end - begin != bits // 8:
        raise fail(f"tensor {name!r} ({dtype} {shape}) needs {bits // 8} bytes "
                   f"but data_offsets [{begin}, {end}] span {end - begin}")
    if end > data_bytes:
        raise fail(f"tensor {name!r} ends at data byte {end} but the file holds only {data_bytes} (truncated file?)")
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), numel=numel, nbytes=bits // 8, data_offsets=(begin, end))
