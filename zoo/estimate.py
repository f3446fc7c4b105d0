"""How big an adapter will be, from the base model's config alone (no weights, no download).

Every method's size is a formula over the base's shapes, written out below so it can be checked:

    lora        Σ r·(in + out)                     over the targeted linear and embedding layers (in = vocab)
                + the weights of targeted input/output embeddings, which PEFT saves with the adapter
    adalora     Σ r·(in + out + 1)                 (+1: the singular values lora_E), r = init_r
    ia3         Σ out  (+ Σ in for feed-forward targets, which scale their input)
    prefix      N · layers · 2 · kv_width          (a key and a value per virtual token and layer)
    prompt      N · submodules · hidden            (virtual input embeddings)
    ptuning     N · submodules · hidden            (its MLP/LSTM encoder is training-only)
    bottleneck  Σ sites (2·h·m + m + h), m = h // reduction_factor   (down and up projection with biases)
    mam         prefix + a parallel bottleneck beside every feed-forward block

The layers' shapes come from the base model built on PyTorch's meta device (shapes without memory)
or, for remote-code models zoo will not run, from a `zoo-architecture.json` that describes them
(see docs/sizes.md); the dimensions the prompt methods and bottlenecks need (layers, hidden size,
KV width) come from config.json itself, read the way PEFT reads them.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from compose.targets import matches_target
from zoo.errors import ZooError
from zoo.formats.safetensors_header import read_safetensors_header
from zoo.units import human_bytes

if TYPE_CHECKING:
    from rich.console import Console

ARCHITECTURE_FILE = "zoo-architecture.json"
_DOCS = "see docs/sizes.md"

#: The methods `estimate_adapter` sizes, and the keyword arguments each one takes.
METHOD_OPTIONS: dict[str, frozenset[str]] = {
    "lora": frozenset({"rank", "targets"}),
    "adalora": frozenset({"init_r", "target_r", "targets"}),
    "ia3": frozenset({"targets", "feedforward"}),
    "prefix": frozenset({"num_virtual_tokens", "prefix_projection", "encoder_hidden_size"}),
    "prompt": frozenset({"num_virtual_tokens", "num_transformer_submodules"}),
    "ptuning": frozenset({"num_virtual_tokens", "num_transformer_submodules", "encoder_hidden_size", "encoder_type", "encoder_num_layers"}),
    "bottleneck": frozenset({"variant", "reduction_factor", "sites"}),
    "mam": frozenset({"num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "reduction_factor"}),
}

#: PEFT's default LoRA `target_modules` per `model_type` (peft.utils.constants
#: TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, peft 0.21), for the common models.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"], "falcon": ["query_key_value"],
    "chatglm": ["query_key_value"], "mpt": ["Wqkv"], "codegen": ["qkv_proj"], "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta": ["in_proj"], "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}

#: PEFT's default AdaLoRA targets (TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING, peft 0.21): a
#: table of its own, wider than LoRA's for t5/bart/opt/roberta/deberta-v2, and without chatglm.
DEFAULT_ADALORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"],
    "bloom": ["query_key_value"], "gpt_neox": ["query_key_value"], "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "key", "value", "dense"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
}

#: PEFT's default IA3 targets and, among them, the feed-forward ones whose *input* is scaled
#: (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._IA3_FEEDFORWARD_MODULES_MAPPING, peft 0.21).
DEFAULT_IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]), "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]), "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]), "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]), "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]), "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]), "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]), "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]), "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]), "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
}

#: AdapterHub's bottleneck presets: variant → (sites, reduction factor). Pfeiffer is `seq_bn`
#: (after the feed-forward block), Houlsby `double_seq_bn` (after attention and after it), parallel
#: `par_bn` (beside the feed-forward block); where an adapter sits does not change its size.
BOTTLENECK_VARIANTS: dict[str, tuple[tuple[str, ...], float]] = {
    "pfeiffer": (("ffn",), 16), "houlsby": (("attention", "ffn"), 16), "parallel": (("ffn",), 2),
}
SITES = ("attention", "ffn")

#: AdapterHub's MAMConfig: a 30-token prefix trained through an 800-wide MLP (saved as that MLP),
#: and a parallel adapter with reduction factor 2.
#: The largest rank, token count or width accepted (2³¹ − 1: beyond any tensor dimension a model has).
MAX_COUNT = 2**31 - 1
MAM_DEFAULTS = {"num_virtual_tokens": 30, "prefix_projection": True, "encoder_hidden_size": 800, "reduction_factor": 2}

#: Bytes per parameter of the dtypes an adapter is saved in.
DTYPE_BYTES: dict[str, int] = {"fp16": 2, "bf16": 2, "fp32": 4}


class EstimateRow(BaseModel):
    """All adapted places of one kind: a module kind (same name after the layer index, same shape),
    a bottleneck site, or a stored embedding."""

    kind: str = Field(description="Module name after the last numeric index ('self_attn.q_proj'), a site ('ffn'), or a tensor.")
    in_features: int | None
    out_features: int | None
    count: int
    params: int
    detail: str = Field("", description="What one of them holds, e.g. 'A 8×4096 + B 12288×8'.")


class EstimateReport(BaseModel):
    """The exact size of an adapter computed from the base config; method settings that do not apply are None."""

    base: str
    model_type: str | None
    source: Literal["transformers meta model", "architecture description"]
    method: str
    dtype: str
    rows: list[EstimateRow]
    params: int = Field(description="Parameters the saved adapter file holds.")
    bytes: int
    mb: float = Field(description="Decimal megabytes (10^6 bytes), 2 decimals.")
    mib: float = Field(description="Binary mebibytes (2^20 bytes), 2 decimals.")
    training_params: int = Field(description="Parameters trained: params plus training-only encoders (P-tuning's, PEFT's prefix projection).")
    base_params: int
    base_share: float = Field(description="params / base_params.")
    # lora, adalora, ia3
    rank: int | None = Field(None, description="LoRA r; AdaLoRA init_r.")
    targets: list[str] | str | None = Field(None, description="The targets as given, or PEFT's default for the model type.")
    # adalora
    target_r: int | None = None
    rank_budget: int | None = Field(None, description="AdaLoRA: the total rank pruning ends at, target_r × adapted modules.")
    pruned_params_min: int | None = Field(None, description="AdaLoRA after pruning: the budget on the cheapest modules.")
    pruned_params_max: int | None = Field(None, description="AdaLoRA after pruning: the budget on the costliest modules.")
    # ia3
    feedforward: list[str] | str | None = None
    # prefix, prompt, ptuning, mam
    num_virtual_tokens: int | None = None
    num_layers: int | None = None
    kv_width: int | None = Field(None, description="Prefix: per-layer key (= value) width, KV heads × head_dim.")
    token_dim: int | None = Field(None, description="Prompt / P-tuning: the input-embedding width.")
    num_transformer_submodules: int | None = None
    prefix_projection: bool | None = None
    encoder_hidden_size: int | None = None
    encoder_type: str | None = None
    # bottleneck, mam
    sites: list[str] | None = None
    hidden_size: int | None = None
    reduction_factor: float | None = None
    bottleneck_width: int | None = None


@dataclass(frozen=True)
class _Linear:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class _Architecture:
    """What sizing needs from a base model: its linear layers, its parameter count, its config."""

    model_type: str | None
    linears: list[_Linear]
    head: frozenset[str]  # linear layers "all-linear" leaves out (the output head)
    params: int
    source: Literal["transformers meta model", "architecture description"]
    unsupported: dict[str, str]  # non-linear module name → type, to reject targets LoRA cannot size
    config: dict[str, Any] = field(default_factory=dict)  # the config as PEFT sees it (defaults filled in)
    embeddings: list[_Linear] = field(default_factory=list)  # nn.Embedding (in: vocabulary, out: width): LoRA can target them
    saved_embeddings: dict[str, int] = field(default_factory=dict)  # input/output embedding module → its parameters, saved when targeted


def estimate_adapter(
    base: str | Path,
    *,
    method: str = "lora",
    dtype: str = "fp16",
    rank: int | None = None,
    targets: list[str] | str | None = None,
    init_r: int | None = None,
    target_r: int | None = None,
    feedforward: list[str] | str | None = None,
    num_virtual_tokens: int | None = None,
    prefix_projection: bool | None = None,
    encoder_hidden_size: int | None = None,
    encoder_type: str | None = None,
    encoder_num_layers: int | None = None,
    num_transformer_submodules: int | None = None,
    variant: str | None = None,
    reduction_factor: float | None = None,
    sites: list[str] | None = None,
) -> EstimateReport:
    """The exact parameter count and file size of an adapter for `base`, from its config alone.

    Each method takes its own settings (`METHOD_OPTIONS`); giving one to a method that has no use for
    it is an error, so a typo cannot silently size something else. Defaults are PEFT's (AdapterHub's
    for bottleneck and MAM).

    Args:
        base: A `config.json`, or a folder holding one (and optionally `zoo-architecture.json`).
        method: `lora`, `adalora`, `ia3`, `prefix`, `prompt`, `ptuning`, `bottleneck` or `mam`.
        dtype: Storage dtype: `"fp16"`, `"bf16"` or `"fp32"`.
        rank: LoRA rank r (default 8).
        targets: lora/adalora/ia3: module-name suffixes (list), a regex (str), `"all-linear"` (every
            Linear/Conv1D but the output head), or `None` for PEFT's default targets of the `model_type`.
        init_r: AdaLoRA's starting rank of every module (default 12).
        target_r: AdaLoRA's average rank after pruning (default 8).
        feedforward: IA3's feed-forward targets, which scale their input instead of their output
            (suffixes or a regex; default: PEFT's for the model type).
        num_virtual_tokens: prefix/prompt/ptuning/mam: virtual tokens N (required, but 30 for mam).
        prefix_projection: prefix/mam: trained through an MLP. PEFT saves its output (the file size
            does not change, `training_params` does); AdapterHub saves the MLP itself (default for mam).
        encoder_hidden_size: Width of that MLP (PEFT's default: the KV width; mam: 800), or of
            P-tuning's encoder (default: the hidden size).
        encoder_type: P-tuning's encoder, `"MLP"` (default) or `"LSTM"`; training-only either way.
        encoder_num_layers: P-tuning's LSTM layers (default 2; the MLP always has 3 linear layers).
        num_transformer_submodules: prompt/ptuning: 2 for encoder-decoders (a prompt per stack),
            the default when the config says `is_encoder_decoder`.
        variant: bottleneck: `pfeiffer` (default: after the feed-forward block, reduction 16),
            `houlsby` (after attention and feed-forward, 16) or `parallel` (beside feed-forward, 2).
        reduction_factor: bottleneck/mam: hidden size ÷ bottleneck width (overrides the variant's).
        sites: bottleneck: where adapters sit, a subset of `["attention", "ffn"]` (overrides the variant's).

    Returns:
        `EstimateReport` with a row per adapted kind, params and bytes of the saved file, the
        parameters trained, the share of the base's parameters, and the method's settings.

    Raises:
        ZooError: Unknown method or dtype, a setting the method does not take, a config zoo cannot
            size (remote code without a description), no default targets, or targets that match nothing.

    Example:
        ```python
        report = estimate_adapter("examples/chatglm-6b", rank=8)  # query_key_value, PEFT's default for chatglm
        report.params, report.bytes, report.mb  # (3670016, 7340032, 7.34)
        estimate_adapter("examples/chatglm-6b", method="prefix", num_virtual_tokens=128).params  # 29360128 (P-tuning v2)
        ```
    """
    if method not in METHOD_OPTIONS:
        raise ZooError(f"estimate does not know method {method!r}", f"use one of: {', '.join(METHOD_OPTIONS)}")
    if dtype not in DTYPE_BYTES:
        raise ZooError(f"unknown dtype {dtype!r}", f"use one of: {', '.join(DTYPE_BYTES)}")
    options = {
        "rank": rank, "targets": targets, "init_r": init_r, "target_r": target_r, "feedforward": feedforward,
        "num_virtual_tokens": num_virtual_tokens, "prefix_projection": prefix_projection,
        "encoder_hidden_size": encoder_hidden_size, "encoder_type": encoder_type, "encoder_num_layers": encoder_num_layers,
        "num_transformer_submodules": num_transformer_submodules, "variant": variant,
        "reduction_factor": reduction_factor, "sites": sites,
    }
    stray = sorted(k for k, v in options.items() if v is not None and k not in METHOD_OPTIONS[method])
    if stray:
        raise ZooError(f"{method} takes no {', '.join(stray)}",
                       f"{method} takes: {', '.join(sorted(METHOD_OPTIONS[method]))}")
    for name in ("rank", "init_r", "num_virtual_tokens", "encoder_hidden_size", "encoder_num_layers", "num_transformer_submodules"):
        if options[name] is not None and options[name] < 1:
            raise ZooError(f"{name} must be at least 1, got {options[name]}")
        if options[name] is not None and options[name] > MAX_COUNT:  # no tensor is that wide: a typo, and sizes beyond any float
            raise ZooError(f"{name} {options[name]} is out of range", f"use at most {MAX_COUNT:,}")
    if reduction_factor is not None and not (math.isfinite(reduction_factor) and reduction_factor > 0):
        raise ZooError(f"reduction_factor must be a positive finite number, got {reduction_factor}")
    config_path = _config_path(base)
    arch = _architecture(config_path)
    given = {k: v for k, v in options.items() if k in METHOD_OPTIONS[method]}
    fields = _SIZERS[method](arch, config_path, **given)

    rows = fields.pop("rows")
    params = sum(row.params for row in rows)
    nbytes = params * DTYPE_BYTES[dtype]
    return EstimateReport(
        base=str(base), model_type=arch.model_type, source=arch.source, method=method, dtype=dtype, rows=rows,
        params=params, bytes=nbytes, mb=round(nbytes / 1e6, 2), mib=round(nbytes / 2**20, 2),
        training_params=fields.pop("training_params", params), base_params=arch.params, base_share=params / arch.params,
        **fields,
    )


# ---- one sizer per method: (architecture, config path, its settings) → rows and settings ---------


def _size_lora(arch: _Architecture, config_path: Path, rank: int | None, targets) -> dict:
    r = 8 if rank is None else rank
    targets = _default_targets(arch, targets, DEFAULT_LORA_TARGETS, "LoRA")
    chosen = _select(arch, targets, config_path, "lora")
    rows = [
        EstimateRow(kind=k, in_features=i, out_features=o, count=c, params=c * r * (i + o), detail=f"A {r}×{i} + B {o}×{r}")
        for (k, i, o), c in _kinds(chosen).items()
    ]
    if _embedding_targeted(arch, targets):  # PEFT's save_embedding_layers="auto"
        rows += [
            EstimateRow(kind=f"{_kind(m.name)} (saved weights)", in_features=None, out_features=None, count=1, params=arch.saved_embeddings[m.name],
                        detail="the base layer, saved with the adapter (embedding layers in target_modules)")
            for m in chosen if m.name in arch.saved_embeddings
        ]
    return {"rows": rows, "rank": r, "targets": targets}


#: PEFT's EMBEDDING_LAYER_NAMES: targeting one of these makes it save the targeted embedding layers' weights.
_EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _embedding_targeted(arch: _Architecture, targets) -> bool:
    """Whether PEFT saves the targeted embedding layers with the adapter: `targets` names embed_tokens or
    lm_head (a list), or a regex matches a module so named (peft.utils.save_and_load)."""
    if not isinstance(targets, str):
        return any(name in targets for name in _EMBEDDING_LAYER_NAMES)
    if targets.lower() == "all-linear":
        return False
    names = [m.name for m in arch.linears + arch.embeddings]
    return any(re.match(rf"(.*\.)?{e}$", n) and matches_target(n, targets) for n in names for e in _EMBEDDING_LAYER_NAMES)


def _size_adalora(arch: _Architecture, config_path: Path, init_r: int | None, target_r: int | None, targets) -> dict:
    init_r = 12 if init_r is None else init_r
    target_r = 8 if target_r is None else target_r
    if not 0 <= target_r <= init_r:
        raise ZooError(f"target_r {target_r} must lie between 0 and init_r {init_r}",
                       "AdaLoRA prunes from init_r (default 12) down to target_r (default 8): pass both")
    targets = _default_targets(arch, targets, DEFAULT_ADALORA_TARGETS, "AdaLoRA")
    chosen = _select(arch, targets, config_path, "adalora")
    # An SVD-form triplet per module: P (lora_A, r×in), Λ (lora_E, r×1), Q (lora_B, out×r).
    rows = [
        EstimateRow(kind=k, in_features=i, out_features=o, count=c, params=c * init_r * (i + o + 1),
                    detail=f"A {init_r}×{i} + E {init_r} + B {o}×{init_r}")
        for (k, i, o), c in _kinds(chosen).items()
    ]
    # Pruning keeps target_r × modules singular triplets in all, at most init_r per module; which
    # modules keep them is learned, so the saved size lies between the cheapest and costliest fill.
    budget = target_r * len(chosen)
    costs = sorted(m.in_features + m.out_features + 1 for m in chosen)
    return {
        "rows": rows, "rank": init_r, "targets": targets, "target_r": target_r, "rank_budget": budget,
        "pruned_params_min": _fill(costs, budget, init_r), "pruned_params_max": _fill(costs[::-1], budget, init_r),
    }


def _fill(costs: list[int], budget: int, cap: int) -> int:
    """Parameters of `budget` rank units given out in `costs` order, at most `cap` per module."""
    total = 0
    for cost in costs:
        take = min(cap, budget)
        total, budget = total + take * cost, budget - take
    return total


def _size_ia3(arch: _Architecture, config_path: Path, targets, feedforward) -> dict:
    defaults = DEFAULT_IA3_TARGETS.get(arch.model_type)
    if defaults is None and (targets is None or feedforward is None):
        raise ZooError(f"no default IA3 targets and feed-forward modules known for model_type {arch.model_type!r}",
                       "pass both explicitly, e.g. targets k_proj,v_proj,down_proj and feedforward down_proj")
    targets = defaults[0] if targets is None else targets
    feedforward = defaults[1] if feedforward is None else feedforward
    if not isinstance(targets, str) and not isinstance(feedforward, str) and not set(feedforward) <= set(targets):
        raise ZooError(f"feedforward {sorted(feedforward)} is not a subset of targets {sorted(targets)}",
                       "every feed-forward module must also be a target (PEFT refuses this too)")
    # One learned vector per target: over the output features, or for feed-forward layers over the
    # input features (IA3 rescales the inner activation before the down-projection).
    kinds = Counter((_kind(m.name), m.in_features, m.out_features, _is_feedforward(m.name, feedforward))
                    for m in _select(arch, targets, config_path, "ia3"))
    rows = [
        EstimateRow(kind=k, in_features=i, out_features=o, count=c, params=c * (i if ff else o),
                    detail=f"scales its input ({i}, feed-forward)" if ff else f"scales its output ({o})")
        for (k, i, o, ff), c in kinds.items()
    ]
    return {"rows": rows, "targets": targets, "feedforward": feedforward}


def _is_feedforward(name: str, feedforward: list[str] | str) -> bool:
    """PEFT's test: a regex must match the whole name; a list entry is a plain suffix (no dot needed)."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(f) for f in feedforward)


def _size_prefix(arch: _Architecture, config_path: Path, num_virtual_tokens, prefix_projection, encoder_hidden_size) -> dict:
    n = _need_tokens(num_virtual_tokens, "prefix")
    layers, kv = _prefix_dims(arch.config, config_path)
    stored = n * layers * 2 * kv
    hidden = kv if encoder_hidden_size is None else encoder_hidden_size
    row = EstimateRow(kind="prompt_embeddings", in_features=None, out_features=None, count=1, params=stored,
                      detail=f"{n} tokens × {layers} layers × 2 (key, value) × {kv}")
    # PEFT trains the projection Embedding(N, kv) → MLP and saves only its output: the file is the same size either way.
    training = prefix_projection_params(n, kv, hidden, layers * 2 * kv) if prefix_projection else stored
    return {"rows": [row], "training_params": training, "num_virtual_tokens": n, "num_layers": layers, "kv_width": kv,
            "prefix_projection": bool(prefix_projection), "encoder_hidden_size": hidden if prefix_projection else None}


def _size_prompt(arch: _Architecture, config_path: Path, num_virtual_tokens, num_transformer_submodules,
                 encoder_hidden_size=None, encoder_type=None, encoder_num_layers=None, *, ptuning: bool = False) -> dict:
    method = "ptuning" if ptuning else "prompt"
    n = _need_tokens(num_virtual_tokens, method)
    d = _dim(arch.config, config_path, "hidden size", "hidden_size", "n_embd", "d_model")
    stacks = num_transformer_submodules or (2 if arch.config.get("is_encoder_decoder") else 1)
    stored = n * stacks * d
    row = EstimateRow(kind="prompt_embeddings", in_features=None, out_features=None, count=1, params=stored,
                      detail=f"{n} tokens × {stacks} stack{'s' if stacks > 1 else ''} × {d}")
    fields = {"rows": [row], "num_virtual_tokens": n, "token_dim": d, "num_transformer_submodules": stacks}
    if ptuning:
        kind = (encoder_type or "MLP").upper()
        if kind not in ("MLP", "LSTM"):
            raise ZooError(f"unknown P-tuning encoder {encoder_type!r}", "use MLP or LSTM")
        if kind == "MLP" and encoder_num_layers is not None:
            raise ZooError("the P-tuning MLP encoder has a fixed depth; encoder_num_layers is for LSTM", "drop it, or use the LSTM encoder")
        h = d if encoder_hidden_size is None else encoder_hidden_size
        fields |= {"training_params": stored + ptuning_encoder_params(d, h, kind, encoder_num_layers or 2),
                   "encoder_type": kind, "encoder_hidden_size": h}
    return fields


def prefix_projection_params(n: int, d: int, e: int, out: int) -> int:
    """A prefix trained through an MLP: Embedding(n, d) → Linear(d, e) → tanh → Linear(e, out = layers·2·kv)."""
    return n * d + _linear(d, e) + _linear(e, out)


def ptuning_encoder_params(d: int, h: int, kind: str, lstm_layers: int = 2) -> int:
    """Parameters of PEFT's P-tuning encoder (`kind` "MLP" or "LSTM", width `h`, for embeddings of width
    `d`), trained and then thrown away: the file holds its output."""
    if kind == "MLP":  # Linear(d, h) → ReLU → Linear(h, h) → ReLU → Linear(h, d)
        return _linear(d, h) + _linear(h, h) + _linear(h, d)
    # A bidirectional LSTM (4 gates, two bias vectors per layer and direction; later layers read both
    # directions, 2h), then Linear(2h, 2h) → ReLU → Linear(2h, d).
    lstm = sum(2 * (4 * h * ((d if i == 0 else 2 * h) + h) + 2 * 4 * h) for i in range(lstm_layers))
    return lstm + _linear(2 * h, 2 * h) + _linear(2 * h, d)


def _size_bottleneck(arch: _Architecture, config_path: Path, variant, reduction_factor, sites) -> dict:
    variant = variant or "pfeiffer"
    if variant not in BOTTLENECK_VARIANTS:
        raise ZooError(f"unknown bottleneck variant {variant!r}", f"use one of: {', '.join(BOTTLENECK_VARIANTS)}")
    default_sites, default_factor = BOTTLENECK_VARIANTS[variant]
    sites = list(default_sites if sites is None else sites)
    if not sites or set(sites) - set(SITES) or len(set(sites)) < len(sites):
        raise ZooError(f"sites {sites} are not distinct names from {', '.join(SITES)}", "e.g. attention,ffn (Houlsby) or ffn (Pfeiffer)")
    h, layers, width, factor, rows = _bottlenecks(arch, config_path, default_factor if reduction_factor is None else reduction_factor, sites)
    return {"rows": rows, "sites": sites, "hidden_size": h, "num_layers": layers, "reduction_factor": factor, "bottleneck_width": width}


def _bottlenecks(arch: _Architecture, config_path: Path, factor: float, sites: list[str], parallel: bool = False):
    """One adapter per site and layer: Linear(h, m) → act → Linear(m, h), m = h // reduction_factor (at least 1)."""
    if factor <= 0:
        raise ZooError(f"reduction_factor must be positive, got {factor}")
    h = _dim(arch.config, config_path, "hidden size", "hidden_size", "n_embd", "d_model")
    layers = _all_layers(arch.config, config_path)
    if h / factor > MAX_COUNT:
        raise ZooError(f"reduction_factor {factor:g} makes the bottleneck {h / factor:.3g} wide", f"use a factor of at least {h / MAX_COUNT:.3g}")
    m = max(1, int(h // factor))  # AdapterHub: int(hidden_size // reduction_factor)
    where = {"attention": "after attention", "ffn": "beside the feed-forward block" if parallel else "after the feed-forward block"}
    rows = [EstimateRow(kind=site, in_features=h, out_features=h, count=layers, params=layers * (_linear(h, m) + _linear(m, h)),
                        detail=f"{h}→{m}→{h} {where[site]}") for site in sites]
    return h, layers, m, factor, rows


def _size_mam(arch: _Architecture, config_path: Path, num_virtual_tokens, prefix_projection, encoder_hidden_size, reduction_factor) -> dict:
    if arch.config.get("is_encoder_decoder"):
        raise ZooError("mam estimates cover encoder-only and decoder-only models (AdapterHub adds a prefix per attention kind in encoder-decoders)",
                       "estimate prefix and bottleneck --variant parallel separately")
    n = MAM_DEFAULTS["num_virtual_tokens"] if num_virtual_tokens is None else num_virtual_tokens
    projection = MAM_DEFAULTS["prefix_projection"] if prefix_projection is None else prefix_projection
    e = MAM_DEFAULTS["encoder_hidden_size"] if encoder_hidden_size is None else encoder_hidden_size
    layers, kv = _prefix_dims(arch.config, config_path)
    h, _, m, factor, rows = _bottlenecks(arch, config_path, MAM_DEFAULTS["reduction_factor"] if reduction_factor is None else reduction_factor,
                                         ["ffn"], parallel=True)
    if projection:  # AdapterHub saves what it trains, Embedding(N, h) → MLP (its embedding is hidden-wide, PEFT's KV-wide)
        prefix = EstimateRow(kind="prefix (MLP)", in_features=h, out_features=layers * 2 * kv, count=1,
                             params=prefix_projection_params(n, h, e, layers * 2 * kv),
                             detail=f"{n} tokens × {h} → {e} → {layers} layers × 2 × {kv}")
    else:  # flat (or ejected with eject_prefix_tuning): the keys and values themselves
        prefix = EstimateRow(kind="prefix", in_features=None, out_features=None, count=1, params=n * layers * 2 * kv,
                             detail=f"{n} tokens × {layers} layers × 2 (key, value) × {kv}")
    return {"rows": [prefix, *rows], "num_virtual_tokens": n, "num_layers": layers, "kv_width": kv, "prefix_projection": projection,
            "encoder_hidden_size": e if projection else None, "sites": ["ffn"], "hidden_size": h, "reduction_factor": factor,
            "bottleneck_width": m}


_SIZERS = {
    "lora": _size_lora, "adalora": _size_adalora, "ia3": _size_ia3, "prefix": _size_prefix, "prompt": _size_prompt,
    "ptuning": partial(_size_prompt, ptuning=True), "bottleneck": _size_bottleneck, "mam": _size_mam,
}


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _need_tokens(n: int | None, method: str) -> int:
    if n is None:
        raise ZooError(f"{method} needs num_virtual_tokens", "pass --num-virtual-tokens N, e.g. 20")
    return n


def _default_targets(arch: _Architecture, targets, table: dict[str, list[str]], what: str):
    if targets is not None:
        return targets
    if arch.model_type not in table:
        raise ZooError(f"no default {what} targets known for model_type {arch.model_type!r}",
                       "pass targets explicitly, e.g. q_proj v_proj, or all-linear")
    return table[arch.model_type]


def _kinds(chosen: list[_Linear]) -> Counter:
    return Counter((_kind(m.name), m.in_features, m.out_features) for m in chosen)


# ---- model dimensions, read from the config the way PEFT reads them ------------------------------


def _dim(config: dict, config_path: Path, what: str, *keys: str) -> int:
    """The first of `keys` the config has (PEFT's order of names for the same quantity)."""
    for key in keys:
        if type(config.get(key)) is int:
            return config[key]
    raise ZooError(f"{config_path}: no {what} ({' / '.join(keys)})", "add it to config.json")


def _prefix_dims(config: dict, config_path: Path) -> tuple[int, int]:
    """(layers, KV width) of a prefix, as peft.utils.other._prepare_prompt_learning_config derives them.

    Under grouped-query attention the cache holds only the KV heads, so a prefix stores
    num_key_value_heads × head_dim per layer rather than the hidden size.
    """
    layers = _dim(config, config_path, "layer count", "num_hidden_layers", "num_layers", "n_layer")
    hidden = _dim(config, config_path, "hidden size", "hidden_size", "n_embd", "d_model")
    if config.get("num_key_value_heads") is None:
        return layers, hidden
    heads = _dim(config, config_path, "head count", "num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")
    return layers, (config.get("head_dim") or hidden // heads) * config["num_key_value_heads"]


def _all_layers(config: dict, config_path: Path) -> int:
    """Transformer layers in every stack (AdapterHub adds bottlenecks to the encoder's and the decoder's)."""
    layers = _dim(config, config_path, "layer count", "num_hidden_layers", "num_layers", "n_layer")
    if config.get("is_encoder_decoder"):
        encoder = config.get("encoder_layers", layers)  # BART names both stacks; T5 has num_layers + num_decoder_layers
        layers = encoder + _dim(config, config_path, "decoder layer count", "num_decoder_layers", "decoder_layers")
    return layers


def count_base_params(base: str | Path) -> int:
    """The base model's parameter count, without loading weights.

    A folder with `*.safetensors` files is counted from their headers (exact, reads a few kB; integer
    tensors are buffers such as BERT's `position_ids`, not parameters, and are left out); otherwise the count comes from its `config.json` (meta-device model or `zoo-architecture.json`).

    Args:
        base: A model folder, or a `config.json`.

    Raises:
        ZooError: Neither weights nor a usable config.
    """
    base = Path(base)
    shards = sorted(base.glob("*.safetensors")) if base.is_dir() else []
    if shards:
        return sum(t.numel for s in shards for t in read_safetensors_header(s).tensors.values() if t.dtype.startswith(("F", "BF")))
    return _architecture(_config_path(base)).params


def render_estimate(report: EstimateReport, console: Console) -> None:
    """Print `report` as a rich table: one row per adapted kind, then totals and the method's settings."""
    from rich.table import Table

    console.print(f"{report.base} (model_type {report.model_type}, from the {report.source})")
    table = Table(title=_headline(report))
    for column in ("module", "in", "out", "count", "params", "each"):
        table.add_column(column, justify="left" if column in ("module", "each") else "right")
    for row in report.rows:
        shape = ("—" if x is None else str(x) for x in (row.in_features, row.out_features))
        table.add_row(row.kind, *shape, str(row.count), f"{row.params:,}", row.detail)
    table.add_section()
    table.add_row("total", "", "", str(sum(r.count for r in report.rows)), f"{report.params:,}", "")
    console.print(table)
    console.print(
        f"{report.params:,} params · {report.bytes:,} bytes in {report.dtype} = {human_bytes(report.bytes)} "
        f"({report.mib:.2f} MiB) · {report.base_share:.4%} of the base's {report.base_params:,} params"
    )
    if report.training_params != report.params:
        console.print(f"training: {report.training_params:,} params (the encoder / projection is not saved)")
    if report.rank_budget is not None:
        console.print(
            f"after pruning to target_r={report.target_r}: {report.rank_budget} ranks in all, "
            f"{report.pruned_params_min:,}–{report.pruned_params_max:,} params depending on where they stay"
        )


def _headline(r: EstimateReport) -> str:
    targets = r.targets if isinstance(r.targets, str) or r.targets is None else ", ".join(r.targets)
    if r.method in ("lora", "adalora", "ia3"):
        rank = {"lora": f" r={r.rank}", "adalora": f" init_r={r.rank} → target_r={r.target_r}", "ia3": ""}[r.method]
        return f"{r.method}{rank} on {targets}"
    if r.method == "prefix":
        return f"prefix: {r.num_virtual_tokens} virtual tokens × {r.num_layers} layers × 2 × {r.kv_width}"
    if r.method in ("prompt", "ptuning"):
        encoder = f" ({r.encoder_type} encoder, training only)" if r.method == "ptuning" else ""
        return f"{r.method}: {r.num_virtual_tokens} virtual tokens × {r.token_dim}{encoder}"
    adapter = f"bottleneck {r.hidden_size}→{r.bottleneck_width} (reduction {r.reduction_factor:g})"
    if r.method == "mam":
        return f"mam: {r.num_virtual_tokens}-token prefix + parallel {adapter}"
    return f"{adapter} at {', '.join(r.sites or [])}"


def _config_path(base: str | Path) -> Path:
    path = Path(base)
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ZooError(f"{config_path}: no such config file", "pass a config.json or a folder holding one")
    return config_path


def _kind(name: str) -> str:
    """The part of a module name after its last numeric index: 'model.layers.3.mlp.up_proj' → 'mlp.up_proj'."""
    parts = name.split(".")
    last_index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[last_index + 1:])


def _select(arch: _Architecture, targets: list[str] | str, config_path: Path, method: str) -> list[_Linear]:
    """The linear layers `targets` pick, with PEFT's matching; anything else they match is an error."""
    if (targets if isinstance(targets, str) else " ".join(targets)).lower() == "all-linear":
        return [m for m in arch.linears if m.name not in arch.head]
    # LoRA adapts embeddings too (PEFT's lora_embedding_A/B); AdaLoRA and IA3 do not
    unsupported = arch.unsupported if method == "lora" else {**arch.unsupported, **{m.name: "Embedding" for m in arch.embeddings}}
    for name, kind in unsupported.items():
        if matches_target(name, targets):
            what = "Linear/Conv1D/Embedding" if method == "lora" else "Linear/Conv1D"
            raise ZooError(f"target {targets!r} matches {name} ({kind}); estimate sizes {method} on {what} layers only",
                           "name the linear layers instead, e.g. q_proj v_proj")
    chosen = [m for m in arch.linears + (arch.embeddings if method == "lora" else []) if matches_target(m.name, targets)]
    if not chosen:
        examples = ", ".join(sorted({_kind(m.name) for m in arch.linears})[:8])
        raise ZooError(f"targets {targets!r} match no linear layer of {config_path}", f"its linear layers are: {examples}")
    return chosen


def _architecture(config_path: Path) -> _Architecture:
    from zoo.formats.base_config import check_base_config
    from zoo.formats.peft import read_json_config

    config = read_json_config(config_path, "config.json")  # a JSON object of bounded size, or a one-line error
    check_base_config(config, str(config_path))
    description = config_path.parent / ARCHITECTURE_FILE
    if description.is_file():
        return _from_description(config, description)
    return _from_meta_model(config, config_path)


def _from_meta_model(config: dict, config_path: Path) -> _Architecture:
    """Build the model on the meta device (shapes only, no memory) and list its Linear/Conv1D layers."""
    import torch
    import transformers
    from huggingface_hub.errors import StrictDataclassError
    from transformers import CONFIG_MAPPING, AutoModel
    from transformers.pytorch_utils import Conv1D

    from zoo.safety import remote_code_classes

    model_type = config.get("model_type")
    remote = remote_code_classes(config)  # classes only the model's own code defines
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING or remote:
        if remote:
            needs = f"needs remote code ({', '.join(remote)})"
        else:
            needs = f"is unknown to transformers {transformers.__version__}"
        raise ZooError(
            f"{config_path}: model_type {model_type!r} {needs}, which zoo never runs",
            f"describe its linear layers in {ARCHITECTURE_FILE} next to config.json ({_DOCS})",
        )
    architecture = (config.get("architectures") or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    try:  # transformers' own checks (hidden size a multiple of the heads, field types) raise as they like
        hf_config = CONFIG_MAPPING[model_type].from_dict(config)
        with torch.device("meta"):
            model = model_class(hf_config) if model_class is not None else AutoModel.from_config(hf_config)
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError, IndexError, StrictDataclassError) as e:
        raise ZooError(f"{config_path}: transformers cannot build a {model_type} from it ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})",
                       "pass the base model's own config.json") from None

    linears, embeddings, unsupported = [], [], {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append(_Linear(name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):  # GPT-2's Conv1D stores its weight as (in, out)
            linears.append(_Linear(name, *module.weight.shape))
        elif isinstance(module, torch.nn.Embedding):
            embeddings.append(_Linear(name, module.num_embeddings, module.embedding_dim))
        elif name:
            unsupported[name] = type(module).__name__
    try:
        ends = {model.get_input_embeddings(), model.get_output_embeddings()} - {None}
    except NotImplementedError:  # a model without the accessor: nothing PEFT would save either
        ends = set()
    saved_embeddings = {name: sum(p.numel() for p in m.parameters(recurse=False)) for name, m in model.named_modules() if m in ends}
    # "all-linear" leaves out the output head, as PEFT does: the LM head, or (PEFT with task_type
    # SEQ_CLS) a classifier, which is trained in full through modules_to_save instead.
    head_module = model.get_output_embeddings()
    for attribute in ("score", "classifier"):  # PEFT's SEQ_CLS_HEAD_NAMES
        head_module = getattr(model, attribute, None) if head_module is None else head_module
    head = frozenset(name for name, module in model.named_modules() if module is head_module)
    dims = hf_config.to_dict()
    if hasattr(hf_config, "num_hidden_layers"):  # PEFT reads the attribute first (GPT-2's n_layer is an alias)
        dims["num_hidden_layers"] = hf_config.num_hidden_layers
    return _Architecture(
        model_type=model_type, linears=linears, head=head, params=sum(p.numel() for p in model.parameters()),
        source="transformers meta model", unsupported=unsupported, config=dims.get("text_config") or dims,
        embeddings=embeddings, saved_embeddings=saved_embeddings,
    )


# ---- zoo-architecture.json: shapes of a model whose code zoo does not run -----------------------

Expr = int | str  # an integer, or arithmetic over config keys: "3 * hidden_size"


class _LinearSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    in_features: Expr = Field(alias="in")
    out_features: Expr = Field(alias="out")
    bias: bool = False


class _BlockSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="Module path of the block; '{i}' stands for the repeat index.")
    repeat: Expr = 1
    linear: dict[str, _LinearSpec] = Field(default_factory=dict, description="Linear layers, by name inside the block.")
    params: dict[str, Expr] = Field(default_factory=dict, description="Parameter counts of everything else (embeddings, norms).")


class _ArchitectureSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["zoo-architecture/1"]
    description: str = ""
    blocks: list[_BlockSpec]


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _evaluate(expr: Expr, config: dict, where: str) -> int:
    """Evaluate an integer expression over config keys: numbers, names, + - * // and parentheses only."""

    def bad(problem: str) -> ZooError:
        return ZooError(f"{where}: {problem} in {expr!r}", f"use integers, config keys and + - * // ({_DOCS})")

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            value = config.get(node.id)
            if type(value) is not int:
                raise bad(f"config key {node.id!r} is {'missing' if value is None else repr(value)}, not an integer")
            return value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](ev(node.left), ev(node.right))
        raise bad(f"unsupported syntax {ast.dump(node)[:40]}")

    if type(expr) is int:
        value = expr
    else:
        try:
            value = ev(ast.parse(expr, mode="eval").body)
        except SyntaxError:
            raise bad("syntax error") from None
        except ZeroDivisionError:
            raise bad("division by zero") from None
    if value < 0:
        raise bad(f"negative value {value}")
    return value


def _from_description(config: dict, path: Path) -> _Architecture:
    """Expand a zoo-architecture.json into named linear layers and a parameter count."""
    try:
        spec = _ArchitectureSpec.model_validate_json(path.read_bytes())
    except ValueError as e:  # pydantic's ValidationError, JSON errors included
        first = str(e).splitlines()
        raise ZooError(f"{path}: {' '.join(first[:3])}", f"fix the description ({_DOCS})") from None

    linears, params = [], 0
    for b, block in enumerate(spec.blocks):
        where = f"{path.name} block {b} ({block.path})"
        repeat = _evaluate(block.repeat, config, f"{where} repeat")
        if repeat != 1 and "{i}" not in block.path:
            raise ZooError(f"{where}: repeats {repeat} times but its path has no '{{i}}'",
                           f"write the path like transformer.layers.{{i}} ({_DOCS})")
        shapes = {
            name: (_evaluate(s.in_features, config, f"{where} {name}"), _evaluate(s.out_features, config, f"{where} {name}"), s.bias)
            for name, s in block.linear.items()
        }
        per_block = sum(i * o + (o if bias else 0) for i, o, bias in shapes.values())
        per_block += sum(_evaluate(e, config, f"{where} {name}") for name, e in block.params.items())
        params += repeat * per_block
        for i in range(repeat):
            prefix = block.path.replace("{i}", str(i))
            linears += [_Linear(f"{prefix}.{name}" if prefix else name, n_in, n_out) for name, (n_in, n_out, _) in shapes.items()]
    return _Architecture(
        model_type=config.get("model_type"), linears=linears, head=frozenset(), params=params,
        source="architecture description", unsupported={}, config=config.get("text_config") or config,
    )
