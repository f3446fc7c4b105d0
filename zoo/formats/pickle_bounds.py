"""Bounds on a `.bin` pickle before and after `torch.load(weights_only=True)`: what it costs to load stays about
the file's own size.

`weights_only` stops code from running, not memory from being claimed. Two ways a small pickle claims a lot:
an archive member compressed 1000:1 (torch's zip reader inflates it), and a tensor that is a view of a small
storage with a zero stride (`torch.zeros(1).expand(10**9)` saves as 4 bytes; the first copy of it, e.g. to
convert it to safetensors, allocates 4 GB). The first is refused by reading the zip directory before loading
(torch.save writes its members uncompressed, and memory-maps them with `mmap=True`), the second by comparing
every tensor's size with its storage's before anything copies it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from zoo.errors import ZooError

if TYPE_CHECKING:
    import torch

_RESAVE = "re-save it with torch.save (or better, as safetensors)"


def check_archive(path: Path) -> None:
    """Refuse a pickle that is not torch's zip format, or whose members are compressed or larger than the file."""
    size = path.stat().st_size
    try:
        if not zipfile.is_zipfile(path):
            raise ZooError(f"{path} is not a torch zip archive (a legacy torch pickle allocates the sizes it declares before reading)", _RESAVE)
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ZooError(f"{path} is not a readable torch archive ({e})", _RESAVE) from None
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED or m.file_size > size:
            raise ZooError(f"{path}: member {m.filename!r} inflates to {m.file_size:,} bytes from {m.compress_size:,}; "
                           "torch.save stores members uncompressed", _RESAVE)


def check_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that claim more bytes than their storage holds (zero-stride or overlapping views)."""
    for name, t in state.items():
        needed = t.numel() * t.element_size()
        held = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
        if needed > held:
            raise ZooError(f"{path}: tensor {name!r} {tuple(t.shape)} needs {needed:,} bytes but is a view of {held:,}", _RESAVE)
