"""`zoo resize`: a registered LoRA at a lower rank (kohya's `resize_lora`), as a new registry entry.

Each module's s·B·A is truncated through its low-rank SVD (`compose.lora.resize`, never the dense ΔW):
to a fixed rank, or per module by singular-value ratio or Frobenius share, so the rank may vary per
module (a `rank_pattern`). The error reported per module is exact: the norm of the singular values cut.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zoo.api import PathLike
from zoo.errors import ZooError


@dataclass
class ModuleResize:
    """One module: old and new rank, ‖s·B·A‖_F and the Frobenius error of the cut."""

    module: str
    old_rank: int
    rank: int
    norm: float
    error: float

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm else 0.0


@dataclass
class ResizeReport:
    """What `resize` registered: the new entry and every module's cut."""

    ref: str
    modules: list[ModuleResize] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    def to_json(self) -> dict:
        return {**asdict(self), "modules": [{**asdict(m), "relative_error": m.relative_error} for m in self.modules]}


def resize(
    adapter: str,
    *,
    name: str,
    rank: int | None = None,
    sv_ratio: float | None = None,
    sv_fro: float | None = None,
    registry: PathLike | None = None,
) -> ResizeReport:
    """
    Register `adapter` (LoRA or AdaLoRA) truncated to a lower rank as `name`.

    Args:
        adapter: a registered NAME[@VERSION] or an adapter folder.
        name: the registry name of the result.
        rank: the new rank of every module (modules already at or below it keep theirs).
        sv_ratio: per module, keep σᵢ ≥ σ₁ / sv_ratio.
        sv_fro: per module, keep the fewest components holding this share (0, 1] of ‖ΔW‖_F.

    Returns:
        A `ResizeReport`: per module the old and new rank and the error; parameter counts.

    Raises:
        ZooError: not exactly one rule; DoRA or lora_bias (their output is not B·A alone); a non-LoRA method.

    Example:
        >>> zoo.resize("llama-sql", rank=16, name="llama-sql-r16")  # doctest: +SKIP
    """
    from compose.errors import CompositionError
    from compose.lora.config import LoraConfig
    from compose.lora.lowrank import check_rule
    from compose.lora.resize import resize_factors
    from zoo.api import open_registry, register_folder
    from zoo.check import lora_modules, non_finite_tensor, one_adapter
    from zoo.formats import peft as peft_format
    from zoo.manifest import Source, check_name

    check_name(name)
    if open_registry(registry).versions(name):
        raise ZooError(f"an adapter named {name!r} already exists", "pick another --name, or `zoo remove` it first")
    try:
        check_rule(rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro)
    except CompositionError as e:
        raise ZooError(str(e), "pass one of --rank R, --sv-ratio X, --sv-fro F") from None
    resolved = one_adapter(adapter, registry=registry)
    config = resolved.config
    if config.method not in ("lora", "adalora"):
        raise ZooError(f"{adapter} is a {config.method} adapter; only LoRA factors have a rank to cut", "resize LoRA or AdaLoRA adapters")
    if getattr(config, "init_lora_weights", None) or any(".lora_embedding_" in k for k in resolved.state):
        what = f"{config.init_lora_weights} factors (their residual base depends on the rank)" if getattr(config, "init_lora_weights", None) else "LoRA on embeddings"
        raise ZooError(f"{adapter} has {what}, which resize does not handle", "resize plain Linear LoRA adapters")
    if getattr(config, "use_dora", False) or getattr(config, "lora_bias", False):
        raise ZooError(f"{adapter} uses {'DoRA' if config.use_dora else 'lora_bias'}, whose output is not s·B·A alone", "resize plain LoRA adapters")
    if bad := non_finite_tensor(resolved):
        raise ZooError(f"{adapter}: tensor {bad} holds NaN or ±Inf", "retrain or re-download the adapter")
    report = ResizeReport(ref=name)
    state, ranks = {}, {}
    for module, (A, B, scaling) in lora_modules(resolved).items():
        try:
            got = resize_factors(A, B, scaling, rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro)
        except CompositionError as e:
            raise ZooError(f"{adapter}: module {module}: {e}", "retrain the adapter with smaller weights") from None
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = got.A.contiguous(), got.B.contiguous()
        ranks[module] = got.rank
        report.modules.append(ModuleResize(module, got.old_rank, got.rank, got.norm, got.error))
        report.params_before += A.numel() + B.numel()
        report.params_after += got.A.numel() + got.B.numel()
    from zoo.composition import as_lora

    saved = as_lora(resolved).state
    state.update((k, v) for k, v in saved.items() if not k.endswith((".lora_A.weight", ".lora_B.weight")))  # modules_to_save copies travel unchanged
    new = LoraConfig.at_scaling_one(ranks, target_modules=sorted({m.rsplit(".", 1)[-1] for m in ranks}),
                                    modules_to_save=list(getattr(config, "modules_to_save", []) or []),
                                    fan_in_fan_out=getattr(config, "fan_in_fan_out", False))
    recipe = {"resize": {"from": resolved.manifest.ref if resolved.manifest else adapter, "rank": rank, "sv_ratio": sv_ratio, "sv_fro": sv_fro}}
    with tempfile.TemporaryDirectory() as work:
        folder = peft_format.save_adapter(Path(work) / name, new, state, base_model=resolved.base_model, task_type=resolved.task_type)
        report.ref = register_folder(folder, name=name, source=Source(kind="local", recipe=recipe),
                                     base_model=resolved.manifest.base_model if resolved.manifest else None, registry=registry).ref
    return report
