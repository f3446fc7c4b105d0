"""`zoo extract`: a LoRA from a fully fine-tuned model (mergekit's `extract-lora`), registered in the zoo.

Per Linear module ΔW = W_tuned − W_base, factored by `compose.lora.extract.extract_delta` (truncated
randomized SVD). The two checkpoints are walked shard by shard and tensor by tensor (plain reads, as the
streaming merge does), so memory holds one tensor pair and its ΔW, never a shard or a model. Tensors
that did not change are skipped; changed tensors of other modules (embeddings, norms) are kept whole as
`modules_to_save` when asked, else reported as not captured.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from zoo.api import PathLike
from zoo.errors import ZooError


@dataclass
class ModuleExtraction:
    """One Linear module: its rank, ‖ΔW‖_F and the error ‖ΔW − B·A‖_F of the factors."""

    module: str
    rank: int
    norm: float
    error: float

    @property
    def captured(self) -> float:
        """Share of ΔW's energy captured, 1 − (error/‖ΔW‖)²."""
        return 1.0 - (self.error / self.norm) ** 2 if self.norm else 1.0


@dataclass
class ExtractReport:
    """What `extract` found and registered."""

    ref: str
    modules: list[ModuleExtraction] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # modules kept whole (modules_to_save)
    not_captured: list[str] = field(default_factory=list)  # changed tensors left out
    unchanged: int = 0
    tensors: int = 0
    shards: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    def to_json(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "modules": [{**asdict(m), "captured": m.captured} for m in self.modules]}


def _same_bytes(a, b) -> bool:
    """Whether two tensors of one shape hold the very same bytes (NaNs included)."""
    import torch

    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def extract(
    base: PathLike,
    tuned: PathLike,
    *,
    name: str,
    rank: int | None = None,
    sv_threshold: float | None = None,
    save_changed: bool = False,
    task: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    registry: PathLike | None = None,
) -> ExtractReport:
    """
    Extract a LoRA adapter from a fine-tuned checkpoint and register it as `name`.

    Args:
        base: the base model's folder (safetensors, one file or sharded, with config.json).
        tuned: the fine-tuned model's folder, same architecture and tensor names.
        name: the registry name of the new adapter.
        rank: keep the top `rank` singular components of every ΔW.
        sv_threshold: instead, keep σᵢ > sv_threshold·σ₁ per module (the rank varies: a rank_pattern).
        save_changed: keep changed non-Linear modules (embeddings, norms) whole, as modules_to_save.
        progress: called as progress(tensor, done, total).

    Returns:
        An `ExtractReport`: per module rank, ‖ΔW‖, error and captured energy; time and peak memory.

    Raises:
        ZooError: not exactly one of rank / sv_threshold, a missing folder or config, checkpoints that
            don't match (a tensor missing or of another shape), nothing changed, or `name` taken.

    Example:
        >>> zoo.extract("Llama-3.2-1B", "Llama-3.2-1B-sql", rank=32, name="sql-r32")  # doctest: +SKIP
    """
    import torch

    from compose.errors import CompositionError
    from compose.lora.config import LoraConfig
    from compose.lora.extract import extract_delta
    from compose.lora.lowrank import check_rule
    from compose.merge.checkpoint import _meta_model, _peak_rss
    from compose.merge.shards import ShardReader, map_large_allocations, read_layout
    from zoo.api import open_registry, register_folder
    from zoo.formats import peft as peft_format
    from zoo.manifest import BaseModelRef, Source, check_name
    from zoo.merge import check_base_headers

    start = time.perf_counter()
    check_name(name)
    if open_registry(registry).versions(name):
        raise ZooError(f"an adapter named {name!r} already exists", "pick another --name, or `zoo remove` it first")
    try:
        check_rule(rank=rank, sv_threshold=sv_threshold)
    except CompositionError as e:
        raise ZooError(str(e), "pass --rank R or --sv-threshold E") from None
    base, tuned = Path(base), Path(tuned)
    for folder in (base, tuned):
        if not folder.is_dir():
            raise ZooError(f"{folder} is not a folder", "pass save_pretrained folders (safetensors weights + config.json)")
    config_path = tuned / "config.json" if (tuned / "config.json").is_file() else base / "config.json"
    config = peft_format.read_json_config(config_path, "config.json")
    model = _meta_model(config)
    if model is None:
        raise ZooError(f"{config_path}: model_type {config.get('model_type')!r} is unknown to transformers", "extract needs the module structure from config.json")
    from transformers.pytorch_utils import Conv1D

    kinds = {n: ("conv1d" if isinstance(m, Conv1D) else "linear") for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    base_layout, tuned_layout = read_layout(base), read_layout(tuned)
    for folder in (base, tuned):  # as `zoo merge` does: every header sane before any tensor is read
        check_base_headers(folder)
    base_shard = {}
    for shard in base_layout.shards:
        with ShardReader(base / shard) as f:
            base_shard.update((k, (shard, f.shape(k))) for k in f.keys())

    map_large_allocations()  # else the heap keeps every freed tensor pair: RSS would grow module by module
    report = ExtractReport(ref=name, shards=len(tuned_layout.shards))
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    changed_other: dict[str, list[str]] = {}  # module → its changed tensors (not Linear weights)
    total = len(base_shard)
    readers: dict[str, ShardReader] = {}
    try:
        for shard in tuned_layout.shards:
            with ShardReader(tuned / shard) as f:
                for key in f.keys():
                    if key not in base_shard or list(base_shard[key][1]) != list(f.shape(key)):
                        raise ZooError(f"tensor {key} {'is not in' if key not in base_shard else 'has another shape in'} the base {base}",
                                       "extract from a fine-tune of this very base")
                    b_shard = base_shard[key][0]
                    if b_shard not in readers:
                        readers[b_shard] = ShardReader(base / b_shard)
                    w_tuned, w_base = f.get_tensor(key), readers[b_shard].get_tensor(key)
                    report.tensors += 1
                    if _same_bytes(w_tuned, w_base):  # not torch.equal: NaN != NaN would call an untouched tensor changed
                        report.unchanged += 1
                    elif key.endswith(".weight") and key.removesuffix(".weight") in kinds:
                        module = key.removesuffix(".weight")
                        for label, folder, w in (("fine-tuned", tuned, w_tuned), ("base", base, w_base)):
                            if not torch.isfinite(w).all():  # else the SVD fails to converge, a traceback
                                raise ZooError(f"tensor {key} of the {label} checkpoint {folder} holds NaN or ±Inf",
                                               "extract from a checkpoint with finite weights (re-download or retrain it)")
                        delta = w_tuned.float() - w_base.float()
                        w_tuned = w_base = None  # the SVD's workspace then takes their place, not theirs plus its own
                        got = extract_delta(delta.T if kinds[module] == "conv1d" else delta, rank=rank, sv_threshold=sv_threshold)
                        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = got.A.contiguous(), got.B.contiguous()
                        ranks[module] = got.rank
                        report.modules.append(ModuleExtraction(module, got.rank, got.norm, got.error))
                    else:
                        changed_other.setdefault(key.rpartition(".")[0], []).append(key)
                    w_tuned = w_base = delta = None  # freed before the next pair is read
                    if progress is not None:
                        progress(key, report.tensors, total)
    finally:
        for reader in readers.values():
            reader.__exit__()
    if not ranks and not changed_other:
        raise ZooError(f"{tuned} has the same weights as {base}", "nothing to extract")
    for module, keys in sorted(changed_other.items()):
        if save_changed and module not in kinds and module:
            report.saved.append(module)
        else:
            report.not_captured += keys
    for module in report.saved:  # a saved module is stored whole: every tensor it has, changed or not
        for shard in tuned_layout.shards:
            with ShardReader(tuned / shard) as f:
                for key in f.keys():
                    if key.rpartition(".")[0] == module:
                        state[key] = f.get_tensor(key)
    if not ranks:
        raise ZooError("no Linear weight changed, so there is no LoRA to extract", "pass --save-changed to keep the changed modules whole" if changed_other else None)
    lora = LoraConfig.at_scaling_one(ranks, target_modules=sorted({m.rsplit(".", 1)[-1] for m in ranks}), modules_to_save=report.saved,
                                     fan_in_fan_out=any(kinds[m] == "conv1d" for m in ranks))  # GPT-2's Conv1D, as PEFT wants it said
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architecture = (config.get("architectures") or [""])[0]  # a causal LM loads back as one (zoo.load picks the class by task type)
    task_type = "CAUSAL_LM" if architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() else None
    with tempfile.TemporaryDirectory() as work:
        # the adapter's own config names the base only by Hub id (it travels with pushes and exports); the registry
        # keeps the local folder, which `zoo merge` checks its --base against
        folder = peft_format.save_adapter(Path(work) / name, lora, state, base_model=_hub_id_of(base), task_type=task_type)
        recipe = {"extract": {"base": str(base), "tuned": str(tuned), "rank": rank, "sv_threshold": sv_threshold, "save_changed": save_changed}}
        base_model = BaseModelRef(name_or_path=str(base), model_type=config.get("model_type"), architecture=architecture or None)
        manifest = register_folder(folder, name=name, source=Source(kind="local", recipe=recipe), task=task, base_model=base_model, registry=registry)
    report.ref = manifest.ref
    report.seconds, report.peak_rss_bytes = time.perf_counter() - start, _peak_rss()
    return report


def _hub_id_of(folder: Path) -> str | None:
    """`org/name` for a snapshot of the Hugging Face cache (`…/models--org--name/snapshots/REV`), else None: a
    local path means nothing on another machine and may name the user's home."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return None
