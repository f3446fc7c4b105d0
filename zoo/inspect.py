"""What an adapter file holds — method, ranks, targets, sizes — read from its header alone.

Only the safetensors header is read (a few kB), so inspecting a 1 GB adapter is as fast as a 1 MB
one. Each method has one analyser that claims its own tensors (LoRA: `lora_A`/`lora_B`…); whatever
no analyser claims is a module saved in full (PEFT's `modules_to_save`, or embeddings saved
alongside an embedding LoRA), reported separately because that is where big adapters come from.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from zoo.errors import ZooError
from zoo.estimate import count_base_params
from zoo.units import human_bytes
from zoo.formats.safetensors_header import TensorInfo, read_safetensors_header

if TYPE_CHECKING:
    from rich.console import Console

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."  # PEFT prefixes every saved key with it
_EMBEDDING_OR_HEAD = re.compile(r"(^|\.)(embed\w*|wte|wpe|word_embeddings|shared|lm_head|embed_out|output_layer)(\.|$)")


class DtypeTotal(BaseModel):
    dtype: str
    params: int
    bytes: int


class ModuleRow(BaseModel):
    """One adapted module: its rank, the shape it adapts, and what its adapter tensors cost."""

    module: str
    rank: int | None
    in_features: int | None
    out_features: int | None
    params: int
    bytes: int
    dtype: str


class SavedModule(BaseModel):
    """A module stored as a full trained copy rather than as adapter factors."""

    module: str
    params: int
    bytes: int
    dtype: str


class InspectReport(BaseModel):
    """Everything `zoo inspect` knows about one adapter file, JSON-able via `.model_dump(mode="json")`."""

    path: str
    method: str
    ranks: list[int] = Field(description="Distinct ranks measured from the tensors.")
    alpha: float | None = Field(description="lora_alpha from the adapter config, when given.")
    target_modules: list[str] = Field(description="Distinct last name components of the adapted modules.")
    trainable_params: int = Field(description="Every parameter in the file: adapter factors plus saved modules.")
    total_bytes: int = Field(description="Tensor data bytes (the file adds the header).")
    file_bytes: int
    adapter_params: int
    adapter_bytes: int
    saved_params: int
    saved_bytes: int
    by_dtype: list[DtypeTotal]
    modules: list[ModuleRow]
    saved_modules: list[SavedModule]
    base_params: int | None = Field(description="The base model's parameter count, when it is known locally.")
    base_share: float | None = Field(description="trainable_params / base_params.")
    warnings: list[str]
    metadata: dict[str, str]


#: (tensors) → (one row per adapted module, names of the tensors the rows account for).
Analyser = Callable[[dict[str, TensorInfo]], tuple[list[ModuleRow], set[str]]]

_LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?P<rest>\..+)?"
)


def _analyse_lora(tensors: dict[str, TensorInfo]) -> tuple[list[ModuleRow], set[str]]:
    """LoRA: A is (r, in[, k, k]) and B is (out, r[, 1, 1]); bias and DoRA magnitude count with their module."""
    parts: dict[str, list[TensorInfo]] = defaultdict(list)
    factors: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
    for name, t in tensors.items():
        if m := _LORA_KEY.fullmatch(name):
            module = m["module"]
            parts[module].append(t)
            if m["part"] != "lora_magnitude_vector" and not (m["rest"] or "").endswith("bias"):
                side = m["part"][-1]  # "A" or "B"
                if side in factors[module]:
                    raise ZooError(
                        f"module {_display(module)} has two lora_{side} tensors ({factors[module][side].name}, {name})",
                        "save one adapter per file",
                    )
                factors[module][side] = t

    rows = []
    for module, ts in parts.items():
        a, b = factors[module].get("A"), factors[module].get("B")
        if a is None or b is None:
            have, missing = ("A", "B") if a is not None else ("B", "A")
            raise ZooError(f"module {_display(module)} has lora_{have} but no lora_{missing}", "the file is incomplete; re-save it")
        if len(a.shape) < 2 or len(b.shape) < 2 or a.shape[0] != b.shape[1]:
            raise ZooError(
                f"module {_display(module)}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree on the rank",
                "expected A (r, in) and B (out, r)",
            )
        rows.append(ModuleRow(
            module=_display(module), rank=a.shape[0], in_features=a.shape[1], out_features=b.shape[0],
            params=sum(t.numel for t in ts), bytes=sum(t.nbytes for t in ts), dtype=_dtypes(ts),
        ))
    rows.sort(key=lambda row: _natural(row.module))
    return rows, {t.name for ts in parts.values() for t in ts}


#: One analyser per adapter method, keyed by PEFT's `peft_type` in lower case.
ANALYSERS: dict[str, Analyser] = {"lora": _analyse_lora}


def inspect_adapter(
    path: str | Path,
    *,
    config: dict | None = None,
    base: str | Path | None = None,
) -> InspectReport:
    """Describe an adapter from its safetensors header, without reading tensor data.

    Args:
        path: A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`) or a
            `.safetensors` file.
        config: The adapter config (PEFT's `adapter_config.json` as a dict); overrides the folder's.
            Without one the method is recognised from the tensor names.
        base: The base model (folder with `*.safetensors` and/or `config.json`, or a config.json)
            for the adapter's share of its parameters. Defaults to the config's
            `base_model_name_or_path` when that is a local folder.

    Returns:
        `InspectReport`: method, ranks, alpha, targets, params and bytes (total, by dtype, per
        module), full-copy modules counted separately, and the share of the base when known.

    Raises:
        ZooError: Missing or invalid files, an unsupported method, or inconsistent adapter tensors.

    Example:
        ```python
        report = inspect_adapter("chatglm-lora/", base="examples/chatglm-6b")
        report.ranks, report.trainable_params, report.total_bytes  # ([8], 3670016, 7340032)
        ```
    """
    path = Path(path)
    weights = path / ADAPTER_WEIGHTS if path.is_dir() else path
    if path.is_dir() and config is None and (path / ADAPTER_CONFIG).is_file():
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ZooError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e})", "re-save the adapter config") from None
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise ZooError(f"{weights}: no such file (the folder has adapter_model.bin, a pickle; zoo reads safetensors only)",
                           "re-save the adapter as safetensors (PEFT's save_pretrained does by default)")
        raise ZooError(f"{weights}: no such file", "point at an adapter folder or a .safetensors file")
    header = read_safetensors_header(weights)
    config = config or {}
    tensors = header.tensors

    method = str(config.get("peft_type", "")).lower()
    if method:
        if method not in ANALYSERS:
            raise ZooError(f"{weights}: inspect does not know method {method!r} yet", f"supported: {', '.join(ANALYSERS)}")
        modules, claimed = ANALYSERS[method](tensors)
    else:
        method, (modules, claimed) = _guess_method(tensors, weights)
    if not modules:
        raise ZooError(f"{weights}: the config says {method!r} but the file holds no {method} tensors",
                       "check that config and weights belong together")

    saved: dict[str, list[TensorInfo]] = defaultdict(list)
    for name, t in tensors.items():
        if name not in claimed:  # "x.base_layer.weight" (embedding saved with its LoRA) → module "x"
            saved[_display(name.rsplit(".", 1)[0].removesuffix(".base_layer"))].append(t)
    saved_modules = [
        SavedModule(module=m, params=sum(t.numel for t in ts), bytes=sum(t.nbytes for t in ts), dtype=_dtypes(ts))
        for m, ts in sorted(saved.items(), key=lambda kv: _natural(kv[0]))
    ]

    by_dtype: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in tensors.values():
        by_dtype[t.dtype][0] += t.numel
        by_dtype[t.dtype][1] += t.nbytes
    total_params, total_bytes = header.numel, header.nbytes

    warnings = [
        f"{s.module} is saved in full ({s.params:,} params, {human_bytes(s.bytes)}, "
        f"{s.bytes / max(total_bytes, 1):.0%} of the data): "
        "it comes from modules_to_save or save_embedding_layers; drop it if the base model's own copy will do"
        for s in saved_modules
        if _EMBEDDING_OR_HEAD.search(s.module)
    ]

    base_params = None
    if base is not None:
        base_params = count_base_params(base)
    elif (local := _local_base(config)) is not None:
        try:  # the config's own base is a convenience: if it cannot be counted, say so and go on
            base_params = count_base_params(local)
        except ZooError as e:
            warnings.append(f"share of the base unknown: {e}")
    return InspectReport(
        path=str(weights), method=method,
        ranks=sorted({m.rank for m in modules if m.rank is not None}),
        alpha=config.get("lora_alpha"),
        target_modules=sorted({m.module.rsplit(".", 1)[-1] for m in modules}),
        trainable_params=total_params, total_bytes=total_bytes, file_bytes=header.file_bytes,
        adapter_params=sum(m.params for m in modules), adapter_bytes=sum(m.bytes for m in modules),
        saved_params=sum(s.params for s in saved_modules), saved_bytes=sum(s.bytes for s in saved_modules),
        by_dtype=[DtypeTotal(dtype=d, params=p, bytes=b) for d, (p, b) in sorted(by_dtype.items())],
        modules=modules, saved_modules=saved_modules,
        base_params=base_params, base_share=total_params / base_params if base_params else None,
        warnings=warnings, metadata=header.metadata,
    )


def render_inspect(report: InspectReport, console: Console) -> None:
    """Print `report`: a summary table, the per-module table, saved full copies, and warnings."""
    from rich.table import Table

    summary = Table(title=report.path, show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("method", report.method)
    summary.add_row("rank", ", ".join(map(str, report.ranks)))
    summary.add_row("alpha", "—" if report.alpha is None else f"{report.alpha:g}")
    summary.add_row("targets", ", ".join(report.target_modules))
    summary.add_row("params", f"{report.trainable_params:,} "
                              f"({report.adapter_params:,} adapter + {report.saved_params:,} saved in full)")
    summary.add_row("size", f"{human_bytes(report.total_bytes)} of tensors, "
                            f"{human_bytes(report.file_bytes)} file ({report.file_bytes:,} bytes)")
    summary.add_row("by dtype", "; ".join(f"{d.dtype}: {d.params:,} params, {human_bytes(d.bytes)}" for d in report.by_dtype))
    if report.base_params:
        summary.add_row("of base", f"{report.base_share:.4%} of {report.base_params:,} params")
    console.print(summary)

    modules = Table(title=f"{len(report.modules)} adapted modules")
    for column in ("module", "rank", "in", "out", "params", "bytes", "dtype"):
        modules.add_column(column, justify="left" if column in ("module", "dtype") else "right")
    for m in report.modules:
        shape = (str(x) if x is not None else "—" for x in (m.rank, m.in_features, m.out_features))
        modules.add_row(m.module, *shape, f"{m.params:,}", f"{m.bytes:,}", m.dtype)
    console.print(modules)

    if report.saved_modules:
        saved = Table(title="saved in full (modules_to_save, embedding layers)")
        for column in ("module", "params", "bytes", "dtype"):
            saved.add_column(column, justify="left" if column in ("module", "dtype") else "right")
        for s in report.saved_modules:
            saved.add_row(s.module, f"{s.params:,}", f"{s.bytes:,}", s.dtype)
        console.print(saved)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def _guess_method(tensors: dict[str, TensorInfo], weights: Path) -> tuple[str, tuple[list[ModuleRow], set[str]]]:
    """The method whose analyser recognises the tensors, and its analysis (when no adapter config says)."""
    for method, analyse in ANALYSERS.items():
        if (analysis := analyse(tensors))[0]:
            return method, analysis
    raise ZooError(f"{weights}: no adapter tensors recognised (looked for: {', '.join(ANALYSERS)})",
                   "pass the adapter config, or check that this is an adapter file")


def _local_base(config: dict) -> Path | None:
    """The config's `base_model_name_or_path` if it is a folder here (a Hub id is not looked up)."""
    name = config.get("base_model_name_or_path")
    return Path(name) if name and Path(name).is_dir() else None


def _display(name: str) -> str:
    return name.removeprefix(_PEFT_PREFIX)


def _natural(name: str) -> list[tuple[int, int, str]]:
    """Sort key that puts layers.2 before layers.10 (headers store names in string order)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _dtypes(ts: list[TensorInfo]) -> str:
    return "+".join(sorted({t.dtype for t in ts}))
