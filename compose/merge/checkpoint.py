"""Merging LoRA deltas into a checkpoint folder, streaming, out of core (mergekit's approach).

    W' = W + Σᵢ sᵢ·Bᵢ·Aᵢ                         (fp32, then cast to the output dtype)
    W' = deq(Q(W)) + Σᵢ sᵢ·Bᵢ·Aᵢ                 (quantize=: the base QLoRA trained against)

W is the adapter's own copy where it carries one (PEFT's saved embedding layers); a PiSSA/OLoRA adapter
adds s·(B·A − B₀·A₀) with B₀, A₀ from W (`compose.lora.residual`). When a module whose weight is tied to
another's (an LM head tied to the input embeddings, stored once) is adapted, each gets a tensor of its own
and config.json says `tie_word_embeddings: false`, so the merge computes what the unmerged model does.

One tensor at a time is read, merged (its ΔW built from the factors just then) and written, into
shards with the base's names and sharding: peak memory is a few copies of the largest tensor plus the
adapters' factors — less than one shard, never the whole model. Tensors are read with plain file
reads rather than `safe_open`, whose memory map keeps every page of the open shard resident and whose
`get_tensor` copies it once more. The folder is written under a temporary name and renamed at the
end, after every file and the folder were fsynced, so a failed merge leaves nothing behind and a
finished one survives a power cut. The temp folder is locked while the merge runs; one that a killed merge
left (`.<out>.partial-*`) is removed by the next merge into the same place (`compose.durable`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from compose.durable import fsync_dir, fsync_file, held_temp_dir, sweep
from compose.errors import CompositionError
from compose.merge.report import MergeReport, ModuleReport, QuantError
from compose.merge.shards import INDEX_NAME, Layout, ShardReader, ShardWriter, is_weight_file, read_json, read_layout, stays_inside

CONFIG_NAME = "config.json"
QUANT_TYPES = ("nf4", "fp4", "int8")
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


class LoraDelta(NamedTuple):
    """One adapter's s·B·A at one module: A (r, in), B (out, r). `fan_in_fan_out`: the base stores this
    weight as (in, out) (GPT-2's Conv1D) — only consulted when the model's structure is unknown.
    `embedding`: the module is an nn.Embedding (PEFT's lora_embedding_A/B), whose weight is stored
    (vocab, dim), i.e. (in, out). `init`: 'pissa' | 'olora', the adapter was trained on W − s·B₀·A₀."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    fan_in_fan_out: bool = False
    embedding: bool = False
    init: str | None = None


def merge_checkpoint(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    deltas: Mapping[str, Sequence[LoraDelta | tuple]],
    *,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    dequantize: bool = False,
    double_quant: bool = False,
    on_tensor: Callable[[str, int, int], None] | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> MergeReport:
    """Write `base_dir`'s model with the LoRA `deltas` merged into it to the new folder `out_dir`.

    Args:
        base_dir: a `save_pretrained` folder with `model.safetensors` or a sharded
            `model.safetensors.index.json`, and usually `config.json`, tokenizer files, ...
        out_dir: a folder that does not exist or is empty. It gets the same shard names and sharding
            (with the index's `total_size` updated), the config and every other top-level file of the
            base except weight files in other formats (`*.bin`, `*.pth`, ...); sub-folders are not copied.
        deltas: module path (as LoRA states key it, e.g. `model.layers.0.self_attn.q_proj`) → one
            `LoraDelta(A, B, scaling, fan_in_fan_out)` per adapter; ΔW = Σ sᵢ·Bᵢ·Aᵢ, in fp32, goes into the
            checkpoint tensor `<path>.weight` (tried as is, without its first component, or with a prefix
            of the checkpoint added, so adapters of `XForCausalLM` and checkpoints of `XModel` mix).
            GPT-2's Conv1D weights are stored (in, out): the delta is transposed for the modules the
            model's config says are Conv1D (else where `fan_in_fan_out` says so).
        dtype: the output dtype of floating tensors (`"bfloat16"`, `torch.float16`, ...; None: each
            tensor's own). With `quantize`, also the dtype the base is loaded in before quantization.
        quantize: `"nf4"` | `"fp4"` | `"int8"`: the adapters were trained (QLoRA) on the base as transformers
            quantizes it with `BitsAndBytesConfig` (every Linear but the output head); the merge starts
            from deq(Q(W)). The output is quantized again and loads with `from_pretrained(out_dir)` (its
            `quantization_config` is in config.json) — unless `dequantize`.
        dequantize: with `quantize`, write the exact deq(Q(W)) + ΔW in full precision (`dtype`): the
            correct merge of a QLoRA adapter, with no second rounding.
        double_quant: with 4-bit `quantize`, the base was quantized with `bnb_4bit_use_double_quant=True`.
        on_tensor: called as `on_tensor(name, done, total)` after each tensor of the base (progress).
        weights: module path → the weight an adapter carries for it (PEFT's saved embedding layers),
            written in place of the checkpoint's (the deltas then go into it).

    Returns:
        A `MergeReport`: for each merged module, the error of the written weight against the exact
        merge (the extra quantization error when requantized), plus sizes, time and peak memory.

    Raises:
        CompositionError: `out_dir` is not empty; the base has no safetensors weights, is already
            quantized, or its model type is unknown (with `quantize`); a module of `deltas` or `weights` is not
            in the checkpoint or its delta's (weight's) shape does not fit the weight; a PiSSA/OLoRA delta
            with `quantize`.
    """
    start = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if quantize not in (None, *QUANT_TYPES):
        raise CompositionError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANT_TYPES)}")
    if dequantize and quantize is None:
        raise CompositionError("dequantizing needs the quantization the adapter was trained on (--quantize / quantize=)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CompositionError(f"{out_dir} exists and is not empty; merge into a new folder")
    if isinstance(dtype, str):
        if dtype not in FLOAT_DTYPES:
            raise CompositionError(f"unknown dtype {dtype!r}; use one of {', '.join(FLOAT_DTYPES)}")
        dtype = getattr(torch, dtype)
    layout = read_layout(base_dir)
    config = read_json(base_dir / CONFIG_NAME) if (base_dir / CONFIG_NAME).is_file() else {}
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method") if isinstance(config["quantization_config"], dict) else None
        raise CompositionError(f"{base_dir} is already quantized ({method}); merge into its full-precision base, naming the quantization (--quantize / quantize=)")
    shapes = _shapes(base_dir, layout)
    conv1d, quantized, tied = _structure(config, shapes, quantize, dtype, double_quant, base_dir)
    targets = _targets(deltas, weights or {}, shapes, conv1d, tied, quantize)
    conv1d = conv1d or set()

    report = MergeReport(out_dir=out_dir, shards=layout.shards, dtype=dtype and str(dtype).removeprefix("torch."),
                         quantize=quantize, dequantize=dequantize, start_rss_bytes=_reset_peak_rss())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = f".{out_dir.name}.partial-"
    sweep(out_dir.parent, partial)  # what killed merges into this folder left
    with held_temp_dir(out_dir.parent, partial, private=False) as held:  # the umask decides who may read the checkpoint
        tmp = held.path
        weight_map: dict[str, str] = {}
        for shard in layout.shards:
            with ShardReader(base_dir / shard) as f:
                writer = ShardWriter(tmp / shard, f.metadata)
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    target = targets.get(key)
                    if target is not None and target.carried is not None:
                        tensor = target.carried.to(tensor.dtype)
                    # the tied modules' own copies first: the stored tensor's merge consumes it
                    outputs = [(copy_key, path, terms, tensor.clone()) for copy_key, (path, terms) in (target.copies.items() if target else ())]
                    outputs.insert(0, (key, *(target[:2] if target else (None, None)), tensor))
                    for name, path, terms, weight in outputs:
                        method = quantize if name in quantized else None
                        tensors, error = _merge_tensor(name, weight, terms, dtype, name in conv1d, method, dequantize, double_quant)
                        for out_name, t in tensors.items():
                            writer.add(out_name, t)
                            weight_map[out_name] = shard
                        if path is not None and (terms or target.carried is not None):
                            report.modules[path] = ModuleReport(name, len(terms), error)
                        del weight, tensors
                    report.tensors += 1
                    report.bytes_read += tensor.nbytes
                    del tensor, outputs
                    if on_tensor is not None:
                        on_tensor(key, report.tensors, len(shapes))
            report.bytes_written += writer.close()
        untied = any(t.copies for t in targets.values())
        _write_config_and_files(base_dir, tmp, config, layout.index, weight_map, report.bytes_written, dtype, quantize, dequantize, double_quant, untied)
        held.release()  # the lock file must not travel into out_dir
        try:
            for item in tmp.iterdir():  # every byte on disk before the folder appears under its name
                fsync_file(item)
            fsync_dir(tmp)
            os.replace(tmp, out_dir)  # an empty out_dir is replaced too
            fsync_dir(out_dir.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    report.seconds, report.peak_rss_bytes = time.perf_counter() - start, _peak_rss()
    if report.start_rss_bytes is not None:
        report.extra_peak_bytes = report.peak_rss_bytes - report.start_rss_bytes
    return report


def _check_finite(key: str, tensor: torch.Tensor, cause: str) -> torch.Tensor:
    """`tensor` if it holds no NaN or ±Inf, else a `CompositionError`: a merge never writes them."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CompositionError(f"merging '{key}' gives NaN or ±Inf: {cause}; nothing was written")
    return tensor


def _merge_tensor(
    key: str, weight: torch.Tensor, terms: list | None, dtype: torch.dtype | None, conv1d: bool,
    method: str | None, dequantize: bool, double_quant: bool,
) -> tuple[dict[str, torch.Tensor], QuantError | None]:
    """The output tensors for checkpoint tensor `key` (quantized with `method`, if given) and, if adapters
    `terms` target it, the error of what is written against the exact merge.

    Full precision: W + ΔW in fp32, cast to `dtype` once. Quantized: W is cast to `dtype` first, as
    transformers loads it before quantizing. `weight` is consumed (merged in place when fp32)."""
    dtype = dtype if dtype is not None and weight.is_floating_point() else weight.dtype
    _check_finite(key, weight, "the base checkpoint holds them")
    too_narrow = f"its values do not fit {str(dtype).removeprefix('torch.')} (fp16 stops at 65504): merge to bf16 or fp32"
    overflow = "the adapters' deltas overflow fp32 (check lora_alpha and the adapter's values)"
    if method is None:
        if terms is None:
            return {key: _check_finite(key, weight.to(dtype), too_narrow)}, None
        exact = _check_finite(key, _add_deltas(weight.float(), terms), overflow)
        out = _check_finite(key, exact.to(dtype), too_narrow)
        return {key: out}, QuantError.between(out, exact)
    bnb = _bnb()
    weight = weight.to(dtype)
    oriented = (lambda t: t.T) if conv1d else (lambda t: t)  # Q works on (out, in); Conv1D stores (in, out)
    data, state = bnb.quantize(oriented(weight), method, double_quant)
    module = key.removesuffix(".weight")
    if terms is None and not dequantize:
        return bnb.serialized(module, data, state), None
    exact = _check_finite(key, _add_deltas(oriented(bnb.dequantize(data, state)).float(), terms or []), overflow)
    if dequantize:
        out = _check_finite(key, exact.to(weight.dtype), too_narrow)
        return {key: out}, None if terms is None else QuantError.between(out, exact)
    data, state = bnb.quantize(oriented(exact.to(weight.dtype)), method, double_quant)
    return bnb.serialized(module, data, state), QuantError.between(oriented(bnb.dequantize(data, state)), exact)


def _add_deltas(exact: torch.Tensor, terms: list) -> torch.Tensor:
    """exact += sᵢ·Bᵢ·Aᵢ for one adapter after the other, in fp32 and in place, oriented like the stored
    weight. One `addmm_` each: the GEMM scales its product and adds it to the weight as it writes, so no
    (out, in) ΔW is ever allocated (2× faster than building it; the tests hold the result bit for bit to
    PEFT's ΔW = (B·A)·s, W += ΔW). The adapters stay factored in memory. PiSSA/OLoRA factors come from W
    before any delta, as PEFT computes them on the base it loads."""
    from compose.lora.residual import initial_factors, with_residual

    initial = [None if init is None else initial_factors(exact, init, a.shape[0], s, transposed=t) for a, _, s, t, init in terms]
    for (a, b, scaling, transposed, _), factors in zip(terms, initial):
        a, b = a.float(), b.float()
        if factors is not None:
            a, b = with_residual(a, b, *factors)
        (exact.T if transposed else exact).addmm_(b, a, alpha=scaling)
    return exact


def _bnb():
    from compose.merge import bnb  # bitsandbytes loads only when a merge needs it

    return bnb


def _shapes(base_dir: Path, layout: Layout) -> dict[str, list[int]]:
    """Every tensor's shape, from the shards' headers. Each tensor must be in one shard, the one the index maps it
    to: a second copy would overwrite the first's merge in the output."""
    shapes: dict[str, list[int]] = {}
    home: dict[str, str] = {}
    weight_map = layout.index["weight_map"] if layout.index is not None else None
    for shard in layout.shards:
        if not (base_dir / shard).is_file():
            raise CompositionError(f"{base_dir / shard} is missing; the index names it — download the whole checkpoint")
        with ShardReader(base_dir / shard) as f:
            for k in f.keys():
                if k in home:
                    raise CompositionError(f"{base_dir}: tensor {k!r} is in both {home[k]} and {shard}; re-download the checkpoint")
                if weight_map is not None and weight_map.get(k) != shard:
                    raise CompositionError(f"{base_dir / INDEX_NAME} maps tensor {k!r} to {weight_map.get(k)!r}, but it is in {shard}; re-download the checkpoint")
                shapes[k], home[k] = f.shape(k), shard
    return shapes


def find_key(path: str, keys: Collection[str]) -> str | None:
    """The checkpoint key of module `path`'s weight: `<path>.weight` as is, without the first component
    (an adapter of `XForCausalLM`, a checkpoint of `XModel`), or with a top-level prefix of the
    checkpoint added (the other way round); None if none is there."""
    candidates = [path, path.partition(".")[2]] + [f"{p}.{path}" for p in sorted({k.partition(".")[0] for k in keys})]
    return next((f"{c}.weight" for c in candidates if c and f"{c}.weight" in keys), None)


def _structure(
    config: dict, shapes: dict, quantize: str | None, dtype: torch.dtype | None, double_quant: bool, base_dir: Path,
) -> tuple[set[str] | None, set[str], dict[str, list[str]]]:
    """Checkpoint keys of (Conv1D weights, weights transformers quantizes), and module path → the other
    modules whose weight is the same (tied) parameter, from the model built on the meta device; (None, ∅, {})
    if transformers does not know the model."""
    model = _meta_model(config)
    if model is None:
        if quantize:
            raise CompositionError(f"{base_dir / CONFIG_NAME}: model type {config.get('model_type')!r} is unknown to transformers, so which layers bitsandbytes quantizes is unknown; merge without quantizing (no --quantize / quantize=)")
        return None, set(), {}
    from transformers.pytorch_utils import Conv1D

    holders: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name.endswith(".weight"):
            holders.setdefault(id(param), []).append(name.removesuffix(".weight"))
    tied = {m: [o for o in group if o != m] for group in holders.values() if len(group) > 1 for m in group}
    keys = lambda names: {k for k in (find_key(n, shapes) for n in names) if k is not None}  # noqa: E731
    conv1d = keys(n for n, m in model.named_modules() if isinstance(m, Conv1D))
    if not quantize:
        return conv1d, set(), tied
    bnb, model_dtype = _bnb(), _model_dtype(config, dtype)
    return conv1d, keys(bnb.quantized_modules(model, bnb.bnb_config(quantize, model_dtype, double_quant), model_dtype)), tied


def _meta_model(config: dict) -> nn.Module | None:
    """The model `config` describes, on the meta device (structure, no memory); None if transformers does not know it."""
    if not config.get("model_type"):  # weights without a config.json: nothing to build (and no transformers import)
        return None
    import transformers
    from transformers import CONFIG_MAPPING, AutoModel

    if not isinstance(config["model_type"], str) or config["model_type"] not in CONFIG_MAPPING:
        return None
    architectures = config.get("architectures")
    name = architectures[0] if isinstance(architectures, list) and architectures and isinstance(architectures[0], str) else ""
    model_class = getattr(transformers, name, None)
    try:
        hf_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
        with torch.device("meta"):
            return model_class(hf_config) if model_class is not None else AutoModel.from_config(hf_config)
    except Exception as e:  # noqa: BLE001 — the config is input: transformers' checks raise TypeError, ValueError, its own dataclass errors, ...
        raise CompositionError(f"{CONFIG_NAME}: transformers cannot build the {config['model_type']} model it describes "
                               f"({type(e).__name__}: {(str(e).strip().splitlines() or ['?'])[0][:200]}); fix or re-download it") from None


class _Target(NamedTuple):
    """What is written for one checkpoint tensor: the module it belongs to, its deltas
    [(A, B, s, stored transposed?, init)], the weight an adapter carries for it (None: the checkpoint's), and
    untied copies {key: (module, deltas)} for the modules tied to it, which the checkpoint does not store."""

    path: str
    terms: list
    carried: torch.Tensor | None
    copies: dict[str, tuple[str, list]]


def _targets(
    deltas: Mapping[str, Sequence], weights: Mapping[str, torch.Tensor], shapes: dict[str, list[int]],
    conv1d: set[str] | None, tied: dict[str, list[str]], quantize: str | None,
) -> dict[str, _Target]:
    """Checkpoint key → `_Target`, all checked before anything is written. Conv1D weights (stored (in, out)) are
    known from the model's structure, else from each delta's `fan_in_fan_out`; embeddings are stored (in, out)
    too. A module tied to a stored tensor (an LM head tied to the input embeddings, stored once) gets a tensor
    of its own when either is adapted, so each merges its own deltas, as the unmerged model computes them."""
    stored_ties = {k: [o for o in others if find_key(o, shapes) is None] for m, others in tied.items() if (k := find_key(m, shapes))}
    targets: dict[str, _Target] = {}
    for path in dict.fromkeys([*deltas, *weights]):
        key = find_key(path, shapes)
        copy_of = None if key is not None else next((k for k in (find_key(o, shapes) for o in tied.get(path, ())) if k), None)
        stored = key or copy_of
        if stored is None:
            raise CompositionError(f"module '{path}' has no weight in the base checkpoint (no '{path}.weight', also tried without/with a prefix); the adapter was trained for a different model")
        if key is not None and key in targets and targets[key].path != path:
            raise CompositionError(f"modules '{targets[key].path}' and '{path}' both name checkpoint tensor '{key}'; give each module once")
        carried = weights.get(path)
        if carried is not None and list(carried.shape) != list(shapes[stored]):
            raise CompositionError(
                f"module '{path}': the adapter carries a weight of shape {tuple(carried.shape)} but '{stored}' has shape {tuple(shapes[stored])}; "
                "it was trained with a resized vocabulary (merge into a base saved after resize_token_embeddings)"
            )
        entry = targets.get(stored) or _Target(path if key else stored.removesuffix(".weight"), [], None, {})
        if carried is not None and entry.carried is not None and not torch.equal(carried, entry.carried):
            raise CompositionError(f"the adapters carry different weights for checkpoint tensor '{stored}' (tied modules share it); merge one of them at a time")
        terms = entry.terms if key else entry.copies.setdefault(f"{path}.weight", (path, []))[1]
        for delta in deltas.get(path, ()):
            a, b, scaling, fan_in_fan_out, embedding, init = LoraDelta(*delta)
            if init is not None and quantize:
                raise CompositionError(f"module '{path}': a {init} adapter was trained on the residual of the full-precision weight; merge it without quantize=")
            transposed = embedding or (fan_in_fan_out if conv1d is None else key in conv1d)
            expected = [a.shape[1], b.shape[0]] if transposed else [b.shape[0], a.shape[1]]
            if a.shape[0] != b.shape[1] or expected != list(shapes[stored]):
                raise CompositionError(
                    f"module '{path}': lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} give a {tuple(expected)} delta but '{stored}' "
                    f"has shape {tuple(shapes[stored])}{' (stored (in, out): fan_in_fan_out)' if transposed else ''}; the adapter was trained for a different model"
                )
            terms.append((a, b, scaling, transposed, init))
        targets[stored] = entry._replace(path=path if key else entry.path, carried=carried if carried is not None else entry.carried)
    for key, entry in targets.items():  # every tied module the checkpoint does not store gets its own copy
        for other in stored_ties.get(key, ()):
            entry.copies.setdefault(f"{other}.weight", (other, []))
    return targets


def _write_config_and_files(
    base_dir: Path, out: Path, config: dict, index: dict | None, weight_map: dict[str, str], total_size: int,
    dtype: torch.dtype | None, quantize: str | None, dequantize: bool, double_quant: bool, untied: bool = False,
) -> None:
    """The index (if the base is sharded), config.json (new dtype / quantization_config; `untied`: the word
    embeddings are no longer tied) and the base's other files."""
    if index is not None:
        metadata = {**index.get("metadata", {}), "total_size": total_size}
        (out / INDEX_NAME).write_text(json.dumps({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    for item in base_dir.iterdir():
        if item.is_file() and item.name != CONFIG_NAME and not is_weight_file(item.name):
            if not stays_inside(base_dir, item):  # a link to some other file of the machine is never published with the merge
                raise CompositionError(f"{item} links out of {base_dir}; copy the file itself into the base folder")
            shutil.copy2(item, out / item.name)
    if not config:
        return
    config = dict(config)
    if dtype is not None:
        for field in {"dtype", "torch_dtype"} & set(config) or {"dtype"}:
            config[field] = str(dtype).removeprefix("torch.")
    if quantize and not dequantize:
        config["quantization_config"] = _bnb().bnb_config(quantize, _model_dtype(config, dtype), double_quant).to_dict()
    if untied:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _model_dtype(config: dict, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the model is loaded in: `dtype`, else its config's, else fp32."""
    return dtype or getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")


def _reset_peak_rss() -> int | None:
    """Reset this process's peak (VmHWM) to its current resident memory and return that, so the peak at the
    end says what the merge itself added; None where Linux's /proc/self/clear_refs is not writable."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def _peak_rss() -> int:
    """This process's peak resident memory so far, in bytes: Linux's VmHWM (unlike `ru_maxrss`, it does
    not count memory a parent process held before exec), else `ru_maxrss`."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
