"""What an adapter file holds — method, ranks, targets, sizes — read from its header alone.

Only the safetensors header is read (a few kB), so inspecting a 1 GB adapter is as fast as a 1 MB
one. Each method has one analyser that claims its own tensors (LoRA: `lora_A`/`lora_B`; IA3:
`ia3_l`; AdapterHub bottlenecks: `….adapters.<name>.adapter_down/up`…) and says what matters for
that method (AdaLoRA's ranks after pruning, which IA3 vectors scale inputs, a prefix's tokens ×
layers × KV width, a bottleneck's sites and width); whatever no analyser claims is a module saved in
full (PEFT's `modules_to_save`, or embeddings saved alongside an embedding LoRA), reported
separately because that is where big adapters come from.

The method comes from the adapter config — PEFT's `peft_type`, or AdapterHub's `config.architecture`
— and without one from the tensor names.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from zoo.errors import ZooError
from zoo.estimate import (
    count_base_params,
    prefix_projection_params,
    ptuning_encoder_params,
)
from zoo.formats.peft import LEGACY_PROMPT_KEYS, check_legacy_config
from zoo.formats.safetensors_header import TensorInfo, read_safetensors_header
from zoo.units import human_bytes

if TYPE_CHECKING:
    from rich.console import Console

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT
ADAPTERHUB_WEIGHTS = "adapter.safetensors"  # AdapterHub (`adapters`), saved with use_safetensors=True
_PICKLES = ("adapter_model.bin", "pytorch_adapter.bin")
_PEFT_PREFIX = "base_model.model."  # PEFT prefixes every saved key with it
_EMBEDDING_OR_HEAD = re.compile(r"(^|\.)(embed\w*|wte|wpe|word_embeddings|shared|lm_head|embed_out|output_layer)(\.|$)")

#: PEFT's `peft_type` → zoo's method name.
PEFT_TYPES = {"LORA": "lora", "ADALORA": "adalora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning"}


class DtypeTotal(BaseModel):
    dtype: str
    params: int
    bytes: int


class ModuleRow(BaseModel):
    """One adapted place: a module (LoRA, IA3), a bottleneck site, or a stored prompt/prefix."""

    module: str
    rank: int | None = Field(description="LoRA / AdaLoRA rank (after pruning), or a bottleneck's width.")
    in_features: int | None
    out_features: int | None
    params: int
    bytes: int
    dtype: str
    role: str | None = Field(None, description="What it does where, e.g. 'scales its input (feed-forward)', 'after the FFN'.")


class SavedModule(BaseModel):
    """A module stored as a full trained copy rather than as adapter factors."""

    module: str
    params: int
    bytes: int
    dtype: str


class MethodSummary(BaseModel):
    """What matters for the adapter's method; fields that do not apply are None."""

    # AdaLoRA
    init_r: int | None = None
    target_r: int | None = None
    total_rank: int | None = Field(None, description="AdaLoRA: Σ per-module ranks in the file.")
    rank_budget: int | None = Field(None, description="AdaLoRA: target_r × adapted modules, what pruning ends at.")
    # IA3
    scales_outputs: list[str] | None = Field(None, description="IA3: module names whose output features are scaled.")
    scales_inputs: list[str] | None = Field(None, description="IA3: feed-forward modules whose input features are scaled.")
    # prompt tuning, P-tuning, prefix tuning (and MAM's prefix)
    num_virtual_tokens: int | None = None
    num_layers: int | None = None
    kv_width: int | None = Field(None, description="Prefix: per-layer key (= value) width.")
    token_dim: int | None = Field(None, description="Prompt / P-tuning: width of a virtual token embedding.")
    num_transformer_submodules: int | None = None
    reparameterization: str | None = Field(None, description="How the prompt was trained, and what the file keeps of it.")
    training_params: int | None = Field(None, description="Parameters trained, training-only encoders included, when they differ.")
    # bottleneck (and MAM's adapter)
    sites: list[str] | None = Field(None, description="'attention', 'cross-attention', 'ffn'.")
    bottleneck_widths: list[int] | None = None
    reduction_factors: list[float] | None = Field(None, description="hidden size / bottleneck width.")
    parallel: bool | None = Field(None, description="Bottleneck beside the block (He et al.) rather than after it.")
    hidden_size: int | None = None

    def merged(self, other: MethodSummary) -> MethodSummary:
        return self.model_copy(update=other.model_dump(exclude_none=True))


class InspectReport(BaseModel):
    """Everything `zoo inspect` knows about one adapter file, JSON-able via `.model_dump(mode="json")`."""

    path: str
    method: str
    ranks: list[int] = Field(description="Distinct LoRA/AdaLoRA ranks or bottleneck widths measured from the tensors.")
    alpha: float | None = Field(description="lora_alpha from the adapter config, when given.")
    target_modules: list[str] = Field(description="Distinct last name components of the adapted modules.")
    trainable_params: int = Field(description="Adapter parameters plus saved modules (a tensor the file holds twice counts once).")
    total_bytes: int = Field(description="Tensor data bytes (the file adds the header).")
    file_bytes: int
    adapter_params: int
    adapter_bytes: int
    saved_params: int
    saved_bytes: int
    by_dtype: list[DtypeTotal]
    modules: list[ModuleRow]
    saved_modules: list[SavedModule]
    summary: MethodSummary = Field(default_factory=MethodSummary)
    base_params: int | None = Field(description="The base model's parameter count, when it is known locally.")
    base_share: float | None = Field(description="trainable_params / base_params.")
    warnings: list[str]
    metadata: dict[str, str]


@dataclass
class Analysis:
    """What one analyser found: rows, the tensors they account for, the method's summary, notes."""

    modules: list[ModuleRow]
    claimed: set[str]
    summary: MethodSummary = field(default_factory=MethodSummary)
    warnings: list[str] = field(default_factory=list)


#: (tensors, adapter config) → analysis; no rows means the method's tensors are absent.
Analyser = Callable[[dict[str, TensorInfo], dict], Analysis]


# ---- LoRA and AdaLoRA ------------------------------------------------------------------------------

_LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?P<rest>\..+)?"
)


def _analyse_lora(tensors: dict[str, TensorInfo], config: dict) -> Analysis:
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
        _check_factors(module, a, b, "lora")
        rows.append(_row(_display(module), ts, rank=a.shape[0], in_features=a.shape[1], out_features=b.shape[0]))
    return Analysis(_sorted(rows), {t.name for ts in parts.values() for t in ts})


_ADALORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[ABE])")  # PEFT keeps AdaLoRA's factors in ParameterDicts: no ".weight"


def _analyse_adalora(tensors: dict[str, TensorInfo], config: dict) -> Analysis:
    """AdaLoRA: the SVD-form triplet P (lora_A, r×in), Λ (lora_E, r×1), Q (lora_B, out×r). PEFT saves
    each module at the rank pruning left it (rank_pattern), so the ranks differ per module."""
    factors: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
    for name, t in tensors.items():
        if m := _ADALORA_KEY.fullmatch(name):
            factors[m["module"]][m["part"]] = t
    if not any("E" in f for f in factors.values()):
        return Analysis([], set())  # lora_A/lora_B without singular values: not AdaLoRA

    rows = []
    for module, f in factors.items():
        a, b, e = f.get("A"), f.get("B"), f.get("E")
        _check_factors(module, a, b, "adalora")
        if e is None or e.shape != (a.shape[0], 1):
            found = "no lora_E" if e is None else f"lora_E {list(e.shape)}"
            raise ZooError(f"module {_display(module)}: lora_A {list(a.shape)} with {found}", f"expected lora_E [{a.shape[0]}, 1]")
        rows.append(_row(_display(module), [a, b, e], rank=a.shape[0], in_features=a.shape[1], out_features=b.shape[0]))
    rows = _sorted(rows)

    init_r, target_r = config.get("init_r"), config.get("target_r")
    warnings = []
    pattern = config.get("rank_pattern") or {}
    kept = {_display(k.split(".lora_E")[0]): sum(map(bool, v)) for k, v in pattern.items() if isinstance(v, list)}
    for row in rows:
        if row.module in kept and kept[row.module] != row.rank:
            warnings.append(f"{row.module}: rank_pattern keeps {kept[row.module]} ranks, the tensors have {row.rank}")
    if not pattern and init_r is not None and all(row.rank == init_r for row in rows):
        warnings.append(f"saved before rank pruning: every module still has init_r={init_r}")
    summary = MethodSummary(
        init_r=init_r, target_r=target_r, total_rank=sum(row.rank for row in rows),
        rank_budget=None if target_r is None else target_r * len(rows),
    )
    return Analysis(rows, {t.name for f in factors.values() for t in f.values()}, summary, warnings)


def _check_factors(module: str, a: TensorInfo | None, b: TensorInfo | None, method: str) -> None:
    if a is None or b is None:
        have, missing = ("A", "B") if a is not None else ("B", "A")
        raise ZooError(f"module {_display(module)} has lora_{have} but no lora_{missing}", "the file is incomplete; re-save it")
    if len(a.shape) < 2 or len(b.shape) < 2 or a.shape[0] != b.shape[1]:
        raise ZooError(
            f"module {_display(module)}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree on the rank",
            f"expected {method} A (r, in) and B (out, r)",
        )


# ---- IA3 -------------------------------------------------------------------------------------------

_IA3_KEY = re.compile(r"(?P<module>.+)\.ia3_l")


def _analyse_ia3(tensors: dict[str, TensorInfo], config: dict) -> Analysis:
    """IA3: one vector per module, over its output features, or for feed-forward modules over its input
    features. The config's `feedforward_modules` decides with PEFT's rule; without it the shape does
    ((out, 1) scales outputs, (1, in) scales inputs)."""
    feedforward = config.get("feedforward_modules")
    rows, claimed = [], set()
    for name, t in tensors.items():
        if not (m := _IA3_KEY.fullmatch(name)):
            continue
        module = _display(m["module"])
        if feedforward is not None:  # PEFT: a regex matches the whole name, a list entry is a plain suffix
            is_ff = re.fullmatch(feedforward, module) is not None if isinstance(feedforward, str) else any(module.endswith(f) for f in feedforward)
        elif len(t.shape) == 2 and 1 in t.shape:
            is_ff = t.shape[0] == 1 and t.shape[1] > 1
        else:
            raise ZooError(f"module {module}: ia3_l {list(t.shape)} does not say whether it scales inputs or outputs",
                           "inspect the folder with its adapter_config.json (feedforward_modules)")
        n = t.numel
        rows.append(_row(module, [t], in_features=n if is_ff else None, out_features=None if is_ff else n,
                         role="scales its input (feed-forward)" if is_ff else "scales its output"))
        claimed.add(name)
    rows = _sorted(rows)
    summary = MethodSummary(
        scales_outputs=sorted({_last(r.module) for r in rows if r.out_features is not None}),
        scales_inputs=sorted({_last(r.module) for r in rows if r.in_features is not None}),
    )
    return Analysis(rows, claimed, summary)


# ---- PEFT prompt tuning, P-tuning, prefix tuning ---------------------------------------------------

_PROMPT_KEY = "prompt_embeddings"


def _analyse_prompt_learning(method: str) -> Analyser:
    """PEFT saves every prompt-learning method as one `prompt_embeddings` tensor (T, W): prompt and
    P-tuning T = N·submodules virtual tokens of the embedding width; prefix T = N tokens of
    layers·2·KV width (a key and a value per layer). P-tuning's encoder and the prefix projection are
    trained and thrown away: the tensor is their output. peft 0.2 saved it as `prompt_encoder.embedding.weight`."""

    def analyse(tensors: dict[str, TensorInfo], config: dict) -> Analysis:
        key = next((k for k in (_PROMPT_KEY, *LEGACY_PROMPT_KEYS) if k in tensors), None)
        if key is None:
            return Analysis([], set())
        t = tensors[key]
        if len(t.shape) != 2:
            raise ZooError(f"{_PROMPT_KEY} has shape {list(t.shape)}", "expected (virtual tokens, width)")
        rows_n, width = t.shape
        n, layers, dim = config.get("num_virtual_tokens"), config.get("num_layers"), config.get("token_dim")
        stacks = config.get("num_transformer_submodules") or 1
        warnings = []
        if method == "prefix":
            if n is not None and layers is not None and dim is not None and (rows_n, width) != (n, layers * 2 * dim):
                raise ZooError(f"{_PROMPT_KEY} is {list(t.shape)}, the config says [{n}, {layers * 2 * dim}] "
                               f"({n} tokens, {layers} layers × 2 × token_dim {dim})", "check that config and weights belong together")
            kv = width // (2 * layers) if layers else None
            summary = MethodSummary(num_virtual_tokens=rows_n, num_layers=layers, kv_width=kv)
            if config.get("prefix_projection") and kv:  # PEFT's MLP: Embedding(N, kv) → kv → e → layers·2·kv
                e = config.get("encoder_hidden_size") or kv
                summary.reparameterization = f"MLP (hidden {e}) during training; the file holds its output"
                summary.training_params = prefix_projection_params(rows_n, kv, e, width)
            role = f"{rows_n} tokens × {layers or '?'} layers × 2 × {kv or '?'} (keys and values)"
        else:
            if n is not None and dim is not None and (rows_n, width) != (n * stacks, dim):
                raise ZooError(f"{_PROMPT_KEY} is {list(t.shape)}, the config says [{n * stacks}, {dim}] "
                               f"({n} tokens × {stacks} submodules, token_dim {dim})", "check that config and weights belong together")
            summary = MethodSummary(num_virtual_tokens=rows_n // stacks, token_dim=width, num_transformer_submodules=stacks,
                                    num_layers=layers)
            if method == "ptuning":
                kind = str(config.get("encoder_reparameterization_type") or "MLP").upper()
                h = config.get("encoder_hidden_size") or width
                summary.reparameterization = f"{kind} encoder (hidden {h}) during training; the file holds its output"
                summary.training_params = t.numel + ptuning_encoder_params(width, h, kind, config.get("encoder_num_layers") or 2)
            elif not config:
                warnings.append(f"{_PROMPT_KEY} alone does not tell prompt tuning, P-tuning and prefix tuning apart; "
                                "inspect the folder with its adapter_config.json (peft_type)")
            role = f"{rows_n} virtual tokens × {width}"
        return Analysis([_row(_PROMPT_KEY, [t], role=role)], {key}, summary, warnings)

    return analyse


# ---- AdapterHub bottleneck adapters and prefixes -----------------------------------------------------

_AH_ADAPTER_KEY = re.compile(r"(?P<site>.+)\.adapters\.(?P<name>[^.]+)\.(?P<param>.+)")
_AH_PREFIX_KEY = re.compile(r"(?:(?P<holder>.+)\.)?prefix_tunings\.(?P<name>[^.]+)\.(?P<location>[^.]+)\.(?P<param>.+)")
_SITE_ORDER = ("attention", "cross-attention", "ffn")


def _analyse_bottleneck(tensors: dict[str, TensorInfo], config: dict) -> Analysis:
    """AdapterHub bottleneck adapters: per site, adapter_down (Linear h→m, after an optional LayerNorm)
    and adapter_up (Linear m→h), plus optional norms, a gate and a learned scaling."""
    sites: dict[str, dict[str, TensorInfo]] = defaultdict(dict)
    names = set()
    for name, t in tensors.items():
        if m := _AH_ADAPTER_KEY.fullmatch(name):
            sites[m["site"]][m["param"]] = t
            names.add(m["name"])
    if len(names) > 1:
        raise ZooError(f"the file holds bottleneck adapters {sorted(names)}", "save one adapter per file (save_adapter(folder, name))")
    sub = _adapterhub_config(config, "bottleneck")
    parallel = sub.get("is_parallel")
    rows, claimed = [], set()
    for site, params in sites.items():
        claimed |= {t.name for t in params.values()}
        if any(p.startswith("adapter_norm_before.") for p in params):  # that LayerNorm is also adapter_down.0: one tensor, saved twice
            params = {p: t for p, t in params.items() if not p.startswith("adapter_down.0.")}
        down = next((t for p, t in params.items() if p.startswith("adapter_down.") and p.endswith(".weight") and len(t.shape) == 2), None)
        up = params.get("adapter_up.weight")
        if (down is None) != (up is None) or (down is not None and (len(up.shape) != 2 or up.shape != down.shape[::-1])):
            shapes = ", ".join(f"{p} {list(t.shape)}" for p, t in params.items() if p.startswith(("adapter_down", "adapter_up")))
            raise ZooError(f"bottleneck at {site}: {shapes} do not form h→m→h", "expected adapter_down (m, h) and adapter_up (h, m)")
        width, h = down.shape if down is not None else (None, None)  # None: PHM (Compacter) layers, no plain weight
        kind = _adapterhub_site(site)
        role = f"{'beside' if parallel else 'after'} the {'FFN' if kind == 'ffn' else kind}"
        rows.append(_row(site, list(params.values()), rank=width, in_features=h, out_features=h, role=role))
    rows = _sorted(rows)
    widths = sorted({r.rank for r in rows if r.rank})
    summary = MethodSummary(
        sites=sorted({_adapterhub_site(r.module) for r in rows}, key=_SITE_ORDER.index), bottleneck_widths=widths,
        reduction_factors=sorted({r.in_features / r.rank for r in rows if r.rank}), parallel=parallel,
        hidden_size=next((r.in_features for r in rows if r.in_features), None),
    ) if rows else MethodSummary()
    return Analysis(rows, claimed, summary)


def _adapterhub_site(module: str) -> str:
    """Where an AdapterHub bottleneck sits, from the module holding it: `attention_adapters` /
    `output_adapters` (layer-level, most models), `attention.output` / `output` (BERT family), or
    T5's sublayers `layer.0` (self-attention), `layer.1` (decoder: cross-attention), last (FFN)."""
    if "cross" in module.lower():
        return "cross-attention"
    last = _last(module)
    if last == "attention_adapters" or module.endswith("attention.output"):
        return "attention"
    if last in ("output_adapters", "output"):
        return "ffn"
    if re.search(r"(^|\.)layer\.0$", module):
        return "attention"
    if re.search(r"(^|\.)decoder\..*layer\.1$", module):
        return "cross-attention"
    return "ffn"


def _analyse_adapterhub_prefix(tensors: dict[str, TensorInfo], config: dict) -> Analysis:
    """AdapterHub prefix tuning: one PrefixTuning per attention kind (`self_prefix`, `cross_prefix`,
    `encoder_prefix`) in a pool shared by all layers. It is saved as trained: `wte` (N, h) and the
    MLP `control_trans` (h→bottleneck→layers·2·kv), or when flat (or ejected) the keys and values
    themselves, one vector of N·layers·2·kv. A `.bin` holds the pool again under every layer that uses
    it; those copies are counted once."""
    groups: dict[tuple[str, str], dict[str, TensorInfo]] = defaultdict(dict)
    holders: dict[tuple[str, str], set[str]] = defaultdict(set)
    claimed, copies = set(), 0
    for name, t in tensors.items():
        if m := _AH_PREFIX_KEY.fullmatch(name):
            key, holder = (m["name"], m["location"]), m["holder"] or ""
            claimed.add(name)
            holders[key].add(holder)
            if m["param"] in groups[key]:
                copies += t.numel
            else:
                groups[key][m["param"]] = t
    if len({name for name, _ in groups}) > 1:
        raise ZooError(f"the file holds prefixes {sorted({n for n, _ in groups})}", "save one adapter per file (save_adapter(folder, name))")

    sub = _adapterhub_config(config, "prefix_tuning")
    hidden = config.get("hidden_size")
    rows, warnings, summary = [], [], MethodSummary()
    for (name, location), params in sorted(groups.items()):
        wte, out = params.get("wte.weight"), params.get("control_trans.2.weight")
        if wte is not None and out is not None:  # the MLP as trained
            n, width = wte.shape[0], out.shape[0]
            summary.reparameterization = f"MLP (hidden {out.shape[1]}) saved as trained; it computes {n} × {width} keys/values"
        elif (flat := params.get("control_trans")) is not None and len(flat.shape) == 1:
            n = sub.get("prefix_length")
            width = flat.numel // n if n else None
        else:
            raise ZooError(f"prefix {name}.{location}: tensors {sorted(params)} are neither the MLP (wte, control_trans.0/2) nor flat",
                           "re-save the adapter with save_adapter")
        # Layers: the pool appears under each layer that uses it (when the file kept those copies and
        # there is one attention kind); else assume a KV width of hidden_size (not so under GQA).
        layer_paths = {h for h in holders[(name, location)] if h.endswith(".pool")}
        all_copies = layer_paths and layer_paths != holders[(name, location)]  # the pool itself is there too
        layers = len(layer_paths) if all_copies and len(groups) == 1 else None
        if layers is None and width and hidden and width % (2 * hidden) == 0:
            layers = width // (2 * hidden)
            warnings.append(f"prefix {location}: {layers} layers assuming the KV width equals hidden_size {hidden} "
                            "(with grouped-query attention it is smaller and the layers more)")
        kv = width // (2 * layers) if width and layers else None
        pool = min(holders[(name, location)] - layer_paths, default="") or min(holders[(name, location)])
        module = f"{pool}.prefix_tunings.{name}.{location}".lstrip(".")
        how = "MLP" if wte is not None else "flat"
        rows.append(_row(module, list(params.values()),
                         role=f"{location}: {n or '?'} tokens × {layers or '?'} layers × 2 × {kv or '?'} ({how})"))
        # One attention kind: its layers and width are the adapter's; several (encoder-decoders): see the rows.
        one = len(groups) == 1
        summary = summary.merged(MethodSummary(num_virtual_tokens=n, num_layers=layers if one else None, kv_width=kv if one else None))
    if copies:
        warnings.append(f"{copies:,} parameters are copies of the shared prefix pool, saved once per layer; counted once")
    return Analysis(rows, claimed, summary, warnings)


def _analyse_mam(tensors: dict[str, TensorInfo], config: dict) -> Analysis:
    """MAM (He et al.): a prefix plus a parallel bottleneck beside every feed-forward block."""
    prefix, bottleneck = _analyse_adapterhub_prefix(tensors, config), _analyse_bottleneck(tensors, config)
    if not prefix.modules or not bottleneck.modules:
        return Analysis([], set())
    return Analysis(prefix.modules + bottleneck.modules, prefix.claimed | bottleneck.claimed,
                    prefix.summary.merged(bottleneck.summary), prefix.warnings + bottleneck.warnings)


def _adapterhub_config(config: dict, architecture: str) -> dict:
    """The part of an AdapterHub `config` (or of a `union` of them) for `architecture` (bottleneck: None)."""
    inner = config.get("config") if isinstance(config.get("config"), dict) else {}
    for part in inner.get("configs") or [inner]:
        if (part.get("architecture") or "bottleneck") == architecture:
            return part
    return {}


def _analyse_prefix(tensors: dict[str, TensorInfo], config: dict) -> Analysis:
    """Prefix tuning as AdapterHub saves it (its config has a `config` dict), else as PEFT does."""
    return (_analyse_adapterhub_prefix if "config" in config else _analyse_prompt_learning("prefix"))(tensors, config)


#: One analyser per adapter method, keyed by zoo's method name.
ANALYSERS: dict[str, Analyser] = {
    "lora": _analyse_lora,
    "adalora": _analyse_adalora,
    "ia3": _analyse_ia3,
    "prefix": _analyse_prefix,
    "prompt": _analyse_prompt_learning("prompt"),
    "ptuning": _analyse_prompt_learning("ptuning"),
    "bottleneck": _analyse_bottleneck,
    "mam": _analyse_mam,
}
#: Without a config: the first method whose tensors are there — AdaLoRA's lora_E before plain LoRA,
#: MAM before its parts, and last `prompt_embeddings`, which only the config can disambiguate.
_GUESSES: list[tuple[str, Analyser]] = [
    ("adalora", _analyse_adalora), ("lora", _analyse_lora), ("ia3", _analyse_ia3), ("mam", _analyse_mam),
    ("prefix", _analyse_adapterhub_prefix), ("bottleneck", _analyse_bottleneck), ("prompt", ANALYSERS["prompt"]),
]


def inspect_adapter(
    path: str | Path,
    *,
    config: dict | None = None,
    base: str | Path | None = None,
) -> InspectReport:
    """Describe an adapter from its safetensors header, without reading tensor data.

    Args:
        path: An adapter folder — PEFT (`adapter_config.json` + `adapter_model.safetensors`) or
            AdapterHub (`adapter_config.json` + `adapter.safetensors`) — or a `.safetensors` file.
        config: The adapter config (PEFT's or AdapterHub's `adapter_config.json` as a dict);
            overrides the folder's. Without one the method is recognised from the tensor names.
        base: The base model (folder with `*.safetensors` and/or `config.json`, or a config.json)
            for the adapter's share of its parameters. Defaults to the config's
            `base_model_name_or_path` (AdapterHub: `model_name`) when that is a local folder.

    Returns:
        `InspectReport`: method, ranks, alpha, targets, params and bytes (total, by dtype, per
        module), full-copy modules counted separately, the method's own facts (`summary`), and the
        share of the base when known.

    Raises:
        ZooError: Missing or invalid files, an unsupported method, or inconsistent adapter tensors.

    Example:
        ```python
        report = inspect_adapter("chatglm-lora/", base="examples/chatglm-6b")
        report.ranks, report.trainable_params, report.total_bytes  # ([8], 3670016, 7340032)
        inspect_adapter("chatglm-ptuning-v2/").summary.num_layers  # 28
        ```
    """
    path = Path(path)
    weights = _weights_file(path)
    if path.is_dir() and config is None and (path / ADAPTER_CONFIG).is_file():
        try:
            config = json.loads((path / ADAPTER_CONFIG).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ZooError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e})", "re-save the adapter config") from None
    header = read_safetensors_header(weights)
    config = config or {}
    check_legacy_config(config, str(path / ADAPTER_CONFIG if path.is_dir() else weights))
    tensors = header.tensors

    method = _method_from_config(config, weights)
    if method:
        analysis = ANALYSERS[method](tensors, config)
    else:
        method, analysis = _guess_method(tensors, weights)
    modules, claimed = analysis.modules, analysis.claimed
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
    total_bytes = header.nbytes
    adapter_params, saved_params = sum(m.params for m in modules), sum(s.params for s in saved_modules)

    warnings = analysis.warnings + [
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
    trainable = adapter_params + saved_params
    return InspectReport(
        path=str(weights), method=method,
        ranks=sorted({m.rank for m in modules if m.rank is not None}),
        alpha=config.get("lora_alpha") if method in ("lora", "adalora") else None,
        target_modules=sorted({_last(m.module) for m in modules}),
        trainable_params=trainable, total_bytes=total_bytes, file_bytes=header.file_bytes,
        adapter_params=adapter_params, adapter_bytes=sum(m.bytes for m in modules),
        saved_params=saved_params, saved_bytes=sum(s.bytes for s in saved_modules),
        by_dtype=[DtypeTotal(dtype=d, params=p, bytes=b) for d, (p, b) in sorted(by_dtype.items())],
        modules=modules, saved_modules=saved_modules, summary=analysis.summary,
        base_params=base_params, base_share=trainable / base_params if base_params else None,
        warnings=warnings, metadata=header.metadata,
    )


def render_inspect(report: InspectReport, console: Console) -> None:
    """Print `report`: a summary table, the method's facts, the per-module table, saved full copies, and warnings."""
    from rich.table import Table

    summary = Table(title=report.path, show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("method", report.method)
    if report.method in ("lora", "adalora"):
        summary.add_row("rank", ", ".join(map(str, report.ranks)))
        summary.add_row("alpha", "—" if report.alpha is None else f"{report.alpha:g}")
    summary.add_row("targets", ", ".join(report.target_modules))
    for name, value in report.summary.model_dump(exclude_none=True).items():
        if value != []:
            summary.add_row(name.replace("_", " "), ", ".join(map(_shown, value)) if isinstance(value, list) else _shown(value))
    summary.add_row("params", f"{report.trainable_params:,} "
                              f"({report.adapter_params:,} adapter + {report.saved_params:,} saved in full)")
    summary.add_row("size", f"{human_bytes(report.total_bytes)} of tensors, "
                            f"{human_bytes(report.file_bytes)} file ({report.file_bytes:,} bytes)")
    summary.add_row("by dtype", "; ".join(f"{d.dtype}: {d.params:,} params, {human_bytes(d.bytes)}" for d in report.by_dtype))
    if report.base_params:
        summary.add_row("of base", f"{report.base_share:.4%} of {report.base_params:,} params")
    console.print(summary)

    columns = ["module", "rank" if report.method in ("lora", "adalora") else "width", "in", "out", "params", "bytes", "dtype", "role"]
    if all(m.rank is None for m in report.modules):
        columns.remove(columns[1])
    if all(m.role is None for m in report.modules):
        columns.remove("role")
    modules = Table(title=f"{len(report.modules)} adapted {'module' if len(report.modules) == 1 else 'modules'}")
    for column in columns:
        modules.add_column(column, justify="left" if column in ("module", "dtype", "role") else "right")
    for m in report.modules:
        cells = {"module": m.module, "rank": m.rank, "width": m.rank, "in": m.in_features, "out": m.out_features,
                 "params": f"{m.params:,}", "bytes": f"{m.bytes:,}", "dtype": m.dtype, "role": m.role}
        modules.add_row(*("—" if cells[c] is None else str(cells[c]) for c in columns))
    console.print(modules)

    if report.saved_modules:
        saved = Table(title="saved in full (modules_to_save, embedding layers)")
        for column in ("module", "params", "bytes", "dtype"):
            saved.add_column(column, justify="left" if column in ("module", "dtype") else "right")
        for s in report.saved_modules:
            saved.add_row(s.module, f"{s.params:,}", f"{s.bytes:,}", s.dtype)
        console.print(saved)
    for warning in report.warnings:
        console.print(f"warning: {warning}", style="yellow", markup=False)  # tensor names may hold brackets


def _shown(value: Any) -> str:
    if isinstance(value, (bool, str)):
        return str(value)
    return f"{value:g}" if isinstance(value, float) else f"{value:,}"


def _weights_file(path: Path) -> Path:
    """The safetensors file of a PEFT or AdapterHub folder (or `path` itself)."""
    if not path.is_dir():
        if not path.is_file():
            raise ZooError(f"{path}: no such file", "point at an adapter folder or a .safetensors file")
        return path
    for name in (ADAPTER_WEIGHTS, ADAPTERHUB_WEIGHTS):
        if (path / name).is_file():
            return path / name
    if pickles := [p for p in _PICKLES if (path / p).is_file()]:
        raise ZooError(f"{path / ADAPTER_WEIGHTS}: no such file (the folder has {pickles[0]}, a pickle; zoo reads safetensors only)",
                       "re-save the adapter as safetensors (PEFT's save_pretrained does by default; AdapterHub: use_safetensors=True)")
    raise ZooError(f"{path / ADAPTER_WEIGHTS}: no such file", "point at an adapter folder or a .safetensors file")


def _method_from_config(config: dict, weights: Path) -> str | None:
    """The method a PEFT (`peft_type`) or AdapterHub (`config.architecture`) adapter config names."""
    if "peft_type" in config:
        peft_type = str(config["peft_type"]).upper()
        if peft_type not in PEFT_TYPES:
            raise ZooError(f"{weights}: inspect does not know method {peft_type.lower()!r} yet", f"supported: {', '.join(ANALYSERS)}")
        return PEFT_TYPES[peft_type]
    if not isinstance(config.get("config"), dict):
        return None
    inner = config["config"]
    parts = {p.get("architecture") or "bottleneck" for p in inner.get("configs") or [inner]}
    if parts == {"prefix_tuning", "bottleneck"}:
        return "mam"
    if parts in ({"prefix_tuning"}, {"bottleneck"}):
        return "prefix" if parts == {"prefix_tuning"} else "bottleneck"
    raise ZooError(f"{weights}: inspect does not know AdapterHub architecture {' + '.join(sorted(map(str, parts)))}",
                   "supported: bottleneck (seq_bn, double_seq_bn, par_bn), prefix_tuning, and their union (MAM)")


def _guess_method(tensors: dict[str, TensorInfo], weights: Path) -> tuple[str, Analysis]:
    """The method whose analyser recognises the tensors, and its analysis (when no adapter config says)."""
    for method, analyse in _GUESSES:
        if (analysis := analyse(tensors, {})).modules:
            return method, analysis
    raise ZooError(f"{weights}: no adapter tensors recognised (looked for: {', '.join(ANALYSERS)})",
                   "pass the adapter config, or check that this is an adapter file")


def _local_base(config: dict) -> Path | None:
    """The config's base model (PEFT `base_model_name_or_path`, AdapterHub `model_name`) if it is a folder here."""
    name = config.get("base_model_name_or_path") or config.get("model_name")
    return Path(name) if name and Path(name).is_dir() else None


def _row(module: str, ts: list[TensorInfo], *, rank: int | None = None, in_features: int | None = None,
         out_features: int | None = None, role: str | None = None) -> ModuleRow:
    return ModuleRow(module=module, rank=rank, in_features=in_features, out_features=out_features, role=role,
                     params=sum(t.numel for t in ts), bytes=sum(t.nbytes for t in ts), dtype=_dtypes(ts))


def _sorted(rows: list[ModuleRow]) -> list[ModuleRow]:
    return sorted(rows, key=lambda row: _natural(row.module))


def _display(name: str) -> str:
    return name.removeprefix(_PEFT_PREFIX)


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _natural(name: str) -> list[tuple[int, int, str]]:
    """Sort key that puts layers.2 before layers.10 (headers store names in string order)."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _dtypes(ts: list[TensorInfo]) -> str:
    return "+".join(sorted({t.dtype for t in ts}))
