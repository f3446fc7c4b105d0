"""How big an adapter will be, from the base model's config alone (no weights, no download).

LoRA adds A ∈ R^{r×in} and B ∈ R^{out×r} to every targeted linear layer, so its size is
Σ r·(in + out) over the targets — exact, because the adapter file holds nothing else. The layers'
shapes come from the base model built on PyTorch's meta device (shapes without memory) or, for
remote-code models zoo will not run, from a `zoo-architecture.json` that describes them
(see docs/sizes.md).
"""

from __future__ import annotations

import ast
import json
import operator
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from compose.targets import matches_target
from zoo.units import human_bytes
from zoo.errors import ZooError
from zoo.formats.safetensors_header import read_safetensors_header

if TYPE_CHECKING:
    from rich.console import Console

ARCHITECTURE_FILE = "zoo-architecture.json"
_DOCS = "see docs/sizes.md"

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

#: Bytes per parameter of the dtypes an adapter is saved in.
DTYPE_BYTES: dict[str, int] = {"fp16": 2, "bf16": 2, "fp32": 4}

#: Adapter parameters one targeted layer adds, per method: (rank, in, out) → count.
_PARAMS_PER_LAYER = {
    "lora": lambda r, n_in, n_out: r * (n_in + n_out),
}




class EstimateRow(BaseModel):
    """All targeted layers of one kind (same name after the layer index, same shape)."""

    kind: str = Field(description="Module name after the last numeric index, e.g. 'self_attn.q_proj'.")
    in_features: int
    out_features: int
    count: int
    params: int


class EstimateReport(BaseModel):
    """The exact size of an adapter computed from the base config."""

    base: str
    model_type: str | None
    source: Literal["transformers meta model", "architecture description"]
    method: str
    rank: int
    targets: list[str] | str = Field(description="The targets as given, or PEFT's default for the model type.")
    dtype: str
    rows: list[EstimateRow]
    params: int
    bytes: int
    mb: float = Field(description="Decimal megabytes (10^6 bytes), 2 decimals.")
    mib: float = Field(description="Binary mebibytes (2^20 bytes), 2 decimals.")
    base_params: int
    base_share: float = Field(description="params / base_params.")


@dataclass(frozen=True)
class _Linear:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class _Architecture:
    """What sizing needs from a base model: its linear layers and its parameter count."""

    model_type: str | None
    linears: list[_Linear]
    head: frozenset[str]  # linear layers "all-linear" leaves out (the output head)
    params: int
    source: Literal["transformers meta model", "architecture description"]
    unsupported: dict[str, str]  # non-linear module name → type, to reject targets LoRA cannot size


def estimate_adapter(
    base: str | Path,
    *,
    method: str = "lora",
    rank: int = 8,
    targets: list[str] | str | None = None,
    dtype: str = "fp16",
) -> EstimateReport:
    """The exact parameter count and file size of an adapter for `base`, from its config alone.

    Args:
        base: A `config.json`, or a folder holding one (and optionally `zoo-architecture.json`).
        method: The adapter method (`"lora"`).
        rank: LoRA rank r.
        targets: Module-name suffixes (list), a regex (str), `"all-linear"` (every Linear/Conv1D but
            the output head), or `None` for PEFT's default targets of the config's `model_type`.
        dtype: Storage dtype: `"fp16"`, `"bf16"` or `"fp32"`.

    Returns:
        `EstimateReport` with a row per targeted module kind, total params and bytes, and the share
        of the base's parameters.

    Raises:
        ZooError: Unknown method or dtype, a config zoo cannot size (remote code without a
            description), no default targets for the model type, or targets that match nothing.

    Example:
        ```python
        report = estimate_adapter("examples/chatglm-6b", rank=8)  # query_key_value, PEFT's default for chatglm
        report.params, report.bytes, report.mb  # (3670016, 7340032, 7.34)
        ```
    """
    if method not in _PARAMS_PER_LAYER:
        raise ZooError(f"estimate does not know method {method!r}", f"use one of: {', '.join(_PARAMS_PER_LAYER)}")
    if dtype not in DTYPE_BYTES:
        raise ZooError(f"unknown dtype {dtype!r}", f"use one of: {', '.join(DTYPE_BYTES)}")
    if rank < 1:
        raise ZooError(f"rank must be at least 1, got {rank}")
    config_path = _config_path(base)
    arch = _architecture(config_path)

    if targets is None:
        if arch.model_type not in DEFAULT_LORA_TARGETS:
            raise ZooError(f"no default LoRA targets known for model_type {arch.model_type!r}",
                           "pass targets explicitly, e.g. q_proj v_proj, or all-linear")
        targets = DEFAULT_LORA_TARGETS[arch.model_type]
    chosen = _select(arch, targets, config_path)

    per_layer = _PARAMS_PER_LAYER[method]
    kinds = Counter((_kind(m.name), m.in_features, m.out_features) for m in chosen)
    rows = [
        EstimateRow(kind=k, in_features=i, out_features=o, count=c, params=c * per_layer(rank, i, o))
        for (k, i, o), c in kinds.items()
    ]
    params = sum(row.params for row in rows)
    nbytes = params * DTYPE_BYTES[dtype]
    return EstimateReport(
        base=str(base), model_type=arch.model_type, source=arch.source, method=method, rank=rank,
        targets=targets, dtype=dtype, rows=rows, params=params, bytes=nbytes,
        mb=round(nbytes / 1e6, 2), mib=round(nbytes / 2**20, 2),
        base_params=arch.params, base_share=params / arch.params,
    )


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
    """Print `report` as a rich table: one row per module kind, then totals."""
    from rich.table import Table

    targets = report.targets if isinstance(report.targets, str) else ", ".join(report.targets)
    console.print(f"{report.base} (model_type {report.model_type}, from the {report.source})")
    table = Table(title=f"{report.method} r={report.rank} on {targets}")
    for column in ("module", "in", "out", "count", "params"):
        table.add_column(column, justify="left" if column == "module" else "right")
    for row in report.rows:
        table.add_row(row.kind, str(row.in_features), str(row.out_features), str(row.count), f"{row.params:,}")
    table.add_section()
    table.add_row("total", "", "", str(sum(r.count for r in report.rows)), f"{report.params:,}")
    console.print(table)
    console.print(
        f"{report.params:,} params · {report.bytes:,} bytes in {report.dtype} = {human_bytes(report.bytes)} "
        f"({report.mib:.2f} MiB) · {report.base_share:.4%} of the base's {report.base_params:,} params"
    )


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


def _select(arch: _Architecture, targets: list[str] | str, config_path: Path) -> list[_Linear]:
    """The linear layers `targets` pick, with PEFT's matching; anything else they match is an error."""
    if (targets if isinstance(targets, str) else " ".join(targets)).lower() == "all-linear":
        return [m for m in arch.linears if m.name not in arch.head]
    for name, kind in arch.unsupported.items():
        if matches_target(name, targets):
            raise ZooError(f"target {targets!r} matches {name} ({kind}); estimate sizes LoRA on Linear/Conv1D layers only",
                           "name the linear layers instead, e.g. q_proj v_proj")
    chosen = [m for m in arch.linears if matches_target(m.name, targets)]
    if not chosen:
        examples = ", ".join(sorted({_kind(m.name) for m in arch.linears})[:8])
        raise ZooError(f"targets {targets!r} match no linear layer of {config_path}", f"its linear layers are: {examples}")
    return chosen


def _architecture(config_path: Path) -> _Architecture:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooError(f"{config_path}: not a readable JSON config ({e})") from None
    description = config_path.parent / ARCHITECTURE_FILE
    if description.is_file():
        return _from_description(config, description)
    return _from_meta_model(config, config_path)


def _from_meta_model(config: dict, config_path: Path) -> _Architecture:
    """Build the model on the meta device (shapes only, no memory) and list its Linear/Conv1D layers."""
    import torch
    import transformers
    from transformers import CONFIG_MAPPING, AutoModel
    from transformers.pytorch_utils import Conv1D

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if config.get("auto_map"):
            needs = f"needs remote code ({', '.join(sorted(set(config['auto_map'].values())))})"
        else:
            needs = f"is unknown to transformers {transformers.__version__}"
        raise ZooError(
            f"{config_path}: model_type {model_type!r} {needs}, which zoo never runs",
            f"describe its linear layers in {ARCHITECTURE_FILE} next to config.json ({_DOCS})",
        )
    hf_config = CONFIG_MAPPING[model_type].from_dict(config)
    architecture = (config.get("architectures") or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    with torch.device("meta"):
        model = model_class(hf_config) if model_class is not None else AutoModel.from_config(hf_config)

    linears, unsupported = [], {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append(_Linear(name, module.in_features, module.out_features))
        elif isinstance(module, Conv1D):  # GPT-2's Conv1D stores its weight as (in, out)
            linears.append(_Linear(name, *module.weight.shape))
        elif name:
            unsupported[name] = type(module).__name__
    # "all-linear" leaves out the output head, as PEFT does: the LM head, or (PEFT with task_type
    # SEQ_CLS) a classifier, which is trained in full through modules_to_save instead.
    head_module = model.get_output_embeddings()
    for attribute in ("score", "classifier"):  # PEFT's SEQ_CLS_HEAD_NAMES
        head_module = getattr(model, attribute, None) if head_module is None else head_module
    head = frozenset(name for name, module in model.named_modules() if module is head_module)
    return _Architecture(
        model_type=model_type, linears=linears, head=head, params=sum(p.numel() for p in model.parameters()),
        source="transformers meta model", unsupported=unsupported,
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
        source="architecture description", unsupported={},
    )
