"""Loading: registry names, folders and compositions onto a base model loaded by transformers.

    >>> model = zoo.load("path/or/hub-id", adapters="sql+chat", fusion="stack")        # doctest: +SKIP
    >>> model = zoo.load(base, adapters=["a", "b"], fusion="weighted", weights=[0.7, 0.3], method="svd", rank=16)  # doctest: +SKIP
    >>> zoo.detach(model)                                                              # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from compose.fusion.config import FusionConfig
from zoo.api import PathLike, adapter_folder, open_registry, split_adapters
from zoo.errors import ZooError
from zoo.formats.folder import load_adapter_state, read_adapter_folder
from zoo.manifest import AdapterManifest, CompositionManifest, MethodConfig

if TYPE_CHECKING:
    import torch

FUSION_WEIGHTS = "adapter_fusion.safetensors"

_AUTO_CLASS_FOR_TASK = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


@dataclass
class ResolvedAdapter:
    """An adapter ready for the engine: its name, config, tensors (paths relative to the model)."""

    name: str
    config: MethodConfig
    state: dict[str, torch.Tensor]
    task_type: str | None = None
    architecture: str | None = None
    base_model: str | None = None
    manifest: AdapterManifest | None = None


@dataclass
class Resolved:
    """What a list of references expands to: adapters, and at most one fusion over them."""

    adapters: list[ResolvedAdapter] = field(default_factory=list)
    fusion: tuple[str, FusionConfig, dict[str, torch.Tensor]] | None = None


def _from_manifest(manifest: AdapterManifest, registry: PathLike | None) -> ResolvedAdapter:
    state = load_adapter_state(adapter_folder(manifest, registry=registry), manifest.method, manifest.format)
    return ResolvedAdapter(
        manifest.name, manifest.method, state, manifest.task_type,
        manifest.base_model.architecture, manifest.base_model.name_or_path, manifest,
    )


def resolve(items: str | Iterable[str], *, registry: PathLike | None = None, allow_pickle: bool = False) -> Resolved:
    """Registry references ('name', 'name@2'), adapter folders, or compositions → adapters (+ fusion)."""
    out = Resolved()
    for item in split_adapters(items):
        if Path(item).is_dir():
            with tempfile.TemporaryDirectory() as work:
                adapter = read_adapter_folder(Path(item), allow_pickle=allow_pickle, workdir=Path(work))
            state = load_adapter_state(Path(item), adapter.config, adapter.format, allow_pickle=allow_pickle)
            out.adapters.append(ResolvedAdapter(
                Path(item).resolve().name, adapter.config, state, adapter.task_type,
                adapter.base_model.architecture, adapter.base_model.name_or_path,
            ))
            continue
        manifest = open_registry(registry).resolve(item)
        if isinstance(manifest, AdapterManifest):
            out.adapters.append(_from_manifest(manifest, registry))
            continue
        out.adapters += [_member(manifest, member, registry) for member in manifest.members]
        if manifest.fusion == "attention":
            if out.fusion:
                raise ZooError(f"{manifest.ref} is a second fusion in one load", "load one fusion at a time")
            folder = adapter_folder(manifest, registry=registry)
            if manifest.format == "adapterhub":
                from zoo.formats.adapterhub import read_adapterhub_fusion

                state = read_adapterhub_fusion(folder)[1]
            else:
                from safetensors.torch import load_file

                state = load_file(folder / FUSION_WEIGHTS)
            out.fusion = (manifest.name, manifest.fusion_config, state)
    names = [a.name for a in out.adapters]
    if len(set(names)) != len(names):
        raise ZooError(f"adapters {sorted({n for n in names if names.count(n) > 1})} are named twice", "list each adapter once")
    return out


def _member(composition: CompositionManifest, member, registry: PathLike | None) -> ResolvedAdapter:
    manifest = open_registry(registry).resolve(f"{member.name}@{member.version}")
    weights = manifest.weights if isinstance(manifest, AdapterManifest) else None
    if not isinstance(manifest, AdapterManifest) or weights is None or weights.sha256 != member.sha256:
        raise ZooError(f"{composition.ref}: member {member.name}@{member.version} is not the adapter it was composed from", "re-compose it")
    return _from_manifest(manifest, registry)


def _num_labels(adapter: ResolvedAdapter) -> int | None:
    """A classification head saved in modules_to_save fixes the label count (last Linear's out features)."""
    saved = getattr(adapter.config, "modules_to_save", None) or []
    heads = [k for k in adapter.state if k.endswith(".weight") and any(k.startswith(m + ".") or f".{m}." in k for m in saved)]
    return adapter.state[max(heads, key=lambda k: k.count("."))].shape[0] if heads else None


def quantization_config_for(quantize: str | None) -> Any:
    """'nf4' | 'fp4' | 'int8' → a transformers `BitsAndBytesConfig` (what QLoRA trains on)."""
    if quantize is None:
        return None
    from compose.merge.checkpoint import QUANT_TYPES

    if quantize not in QUANT_TYPES:
        raise ZooError(f"unknown quantization {quantize!r}", f"use one of {', '.join(QUANT_TYPES)}")
    import torch

    from compose.merge.bnb import bnb_config

    return bnb_config(quantize, torch.float32)


def load_base(
    base: PathLike, *, task_type: str | None = None, architecture: str | None = None, model_class: Any = None,
    trust_remote_code: bool = False, **kwargs: Any,
) -> torch.nn.Module:
    """`from_pretrained` with the class the adapter was trained on (task type, else its recorded architecture).
    A base that needs its own code is refused unless `trust_remote_code=True` (never implied)."""
    import transformers

    from zoo.safety import refuse_remote_code

    if Path(base).is_dir() and not (Path(base) / "config.json").is_file() and (Path(base) / "adapter_config.json").is_file():
        # transformers would load the adapter's base and the adapter (or fail on a config without a base)
        raise ZooError(f"{str(base)!r} is an adapter folder, not a base model", "pass the base model, and the adapter as --adapters / adapters=")
    refuse_remote_code(base, trust_remote_code, revision=kwargs.get("revision"))
    kwargs["trust_remote_code"] = trust_remote_code
    if model_class is None:
        name = _AUTO_CLASS_FOR_TASK.get(task_type or "") or (architecture if hasattr(transformers, architecture or "") else "AutoModel")
        model_class = getattr(transformers, name)
    try:
        return model_class.from_pretrained(base, **kwargs)
    except OSError as e:
        raise ZooError(f"cannot load base model {str(base)!r}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ZooError(f"base model {str(base)!r} needs its own (remote) code", "pass trust_remote_code=True (--trust-remote-code) if you trust it") from None
        raise ZooError(f"cannot load base model {str(base)!r}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def load(
    base: PathLike | torch.nn.Module,
    adapters: str | Iterable[str] = (),
    *,
    fusion: str | None = None,
    weights: Iterable[float] | None = None,
    method: str | None = None,
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    drop: int = 0,
    mixed: bool = False,
    quantize: str | None = None,
    merge: bool = False,
    registry: PathLike | None = None,
    model_class: Any = None,
    dtype: Any = None,
    device_map: Any = None,
    quantization_config: Any = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    **from_pretrained_kwargs: Any,
) -> torch.nn.Module:
    """Load `base` (a path, a Hub id, or a model you built) with `adapters` attached and active.

    Args:
        adapters: registry references, adapter folders or registered compositions, as a list or 'a+b'.
        fusion: how several adapters act together: 'stack' (default: their outputs add), 'weighted'
            (one LoRA computed as a weighted sum, see `weights`/`method`/`rank`/`density`/`seed`), or
            'attention' (an untrained AdapterFusion, i.e. the average of the members' outputs; a
            registered fusion brings its trained weights).
        drop: AdapterDrop — no adapter computation in the first `drop` transformer layers.
        mixed: multi-LoRA batches — `model(ids, adapter_ids=t)` / `model.generate(ids, adapter_ids=t)` runs
            row i with adapter `adapters[t[i]]` (−1: the base), one batched product per module (`compose.lora.mixed`).
        quantize: 'nf4' | 'fp4' | 'int8' loads the base quantized by bitsandbytes (QLoRA's setting).
        merge: fold the LoRA deltas into the base weights (no adapter cost at inference); refused for
            modules whose weights accelerate offloaded (CPU/disk offload in `device_map`).
        dtype, device_map, quantization_config: passed to transformers' `from_pretrained` unchanged, so a
            base sharded or offloaded by accelerate, or loaded in 4-bit, works the same way.

    Returns the transformers model in eval mode, ready for `forward`/`generate`; `zoo.detach(model)`
    takes the adapters off again.

    Example:
        >>> model = zoo.load("gpt2", adapters="poems+rhymes", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    import torch

    from compose.methods import attach, check_composition

    resolved = resolve(adapters, registry=registry, allow_pickle=allow_pickle) if adapters else Resolved()
    if fusion not in (None, "stack", "weighted", "attention"):
        raise ZooError(f"unknown fusion {fusion!r}", "use stack, weighted or attention")
    if fusion in ("weighted", "attention") and not resolved.adapters:
        raise ZooError(f"fusion {fusion!r} has no adapters to combine", "pass adapters, e.g. adapters='a+b' (--adapters a+b)")
    check_composition(
        [(a.name, a.config.method) for a in resolved.adapters],
        fusion="attention" if resolved.fusion else fusion, merge=merge, drop=drop,
    )
    if fusion == "weighted":
        from zoo.composition import combine_adapters

        resolved.adapters = [combine_adapters(resolved.adapters, weights, method=method, rank=rank, density=density, seed=seed)]
    elif weights is not None:
        raise ZooError("weights only apply to fusion='weighted'")
    if fusion == "attention" and resolved.fusion is None:
        resolved.fusion = ("fusion", FusionConfig(members=[a.name for a in resolved.adapters]), None)
    if quantize:
        if quantization_config is not None:
            raise ZooError("pass either quantize= or quantization_config=, not both")
        quantization_config = quantization_config_for(quantize)

    if isinstance(base, torch.nn.Module):
        model = base
    else:
        first = resolved.adapters[0] if resolved.adapters else None
        kwargs = {k: v for k, v in dict(dtype=dtype, device_map=device_map, quantization_config=quantization_config).items() if v is not None}
        if first and first.task_type in ("SEQ_CLS", "TOKEN_CLS") and "num_labels" not in from_pretrained_kwargs:
            if (n := _num_labels(first)) is not None:
                kwargs["num_labels"] = n
        model = load_base(
            base, task_type=first and first.task_type, architecture=first and first.architecture, model_class=model_class,
            trust_remote_code=trust_remote_code, **kwargs, **from_pretrained_kwargs,
        )
    for adapter in resolved.adapters:
        attach(model, adapter.name, adapter.config, adapter.state)
    if resolved.fusion:
        from compose.methods import attach_fusion

        attach_fusion(model, *resolved.fusion)
    if mixed:
        others = [f"{a.name} ({a.config.method})" for a in resolved.adapters if a.config.method not in ("lora", "adalora")]
        if others or resolved.fusion or fusion == "weighted":
            raise ZooError(f"mixed batches run LoRA/AdaLoRA adapters side by side; got {', '.join(others) or 'a fusion'}", "load those without mixed=True")
        from compose.lora.mixed import enable_mixed

        enable_mixed(model, [a.name for a in resolved.adapters])
    if drop:
        from compose.drop import set_drop

        set_drop(model, drop)
    if merge:
        if resolved.fusion or drop:
            raise ZooError("merge=True folds plain LoRA deltas; a fusion or AdapterDrop cannot be merged into weights")
        model.zoo_merge_errors = merge_in_memory(model)
    return model.eval()


def merge_in_memory(model: torch.nn.Module) -> dict[str, Any]:
    """Fold every active LoRA/AdaLoRA (W += Σ s·B·A) and IA3 adapter (W, b scaled by l) into the base
    weights; on bitsandbytes layers dequantize, add and requantize, returning each module's extra
    quantization error (max/mean abs) — peft only warns."""
    from compose.methods import merge

    return merge(model)


def unmerge(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `load(..., merge=True)`: exact up to float rounding on fp bases; on quantized bases the round
    trip requantizes, so the error grows with each cycle, as in peft."""
    from compose.methods import unmerge as unmerge_all

    return unmerge_all(model)


def detach(model: torch.nn.Module, name: str | None = None) -> torch.nn.Module:
    """Take adapter `name` (default: all, and any fusion) off a model returned by `load`."""
    from compose.methods import detach as detach_adapter
    from compose.methods import detach_fusion

    if name is None:
        detach_fusion(model)
    return detach_adapter(model, name)
