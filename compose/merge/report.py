"""What a merge reports (torch-free, so the CLI can print it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class QuantError:
    """|stored − exact| over one weight: how far the weight a loader will see is from the exact merge
    W + ΔW (fp32). Zero for an fp32 merge; the rounding of the cast for bf16/fp16 outputs; the extra
    quantization error when a merged weight is quantized again."""

    max_abs: float
    mean_abs: float

    @classmethod
    def between(cls, stored, exact) -> QuantError:
        """max and mean of |stored − exact| over two tensors, in fp32."""
        if stored is exact:  # an fp32 merge written as computed
            return cls(max_abs=0.0, mean_abs=0.0)
        diff = (stored.float() - exact.float()).abs_()
        return cls(max_abs=diff.max().item(), mean_abs=diff.mean().item())


@dataclass(frozen=True)
class ModuleReport:
    """One merged module: the checkpoint tensor its deltas went into and the error of what was written."""

    key: str
    adapters: int
    error: QuantError


@dataclass
class MergeReport:
    """The outcome of `merge_checkpoint`.

    `peak_rss_bytes` is the process's peak resident memory during the merge (imports included); on Linux
    the peak is reset when the merge starts, `start_rss_bytes` is the resident memory then, and
    `extra_peak_bytes` their difference: the memory the merge itself added at its peak (None elsewhere).
    """

    out_dir: Path
    shards: list[str]
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    dtype: str | None = None
    quantize: str | None = None
    dequantize: bool = False
    seconds: float = 0.0
    start_rss_bytes: int | None = None
    peak_rss_bytes: int = 0
    extra_peak_bytes: int | None = None
