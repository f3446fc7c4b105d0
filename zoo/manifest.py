"""Typed manifests: what the registry records about one adapter.

A manifest is computed from the files (sizes, ranks and hashes are measured, never trusted from input)
and validated by pydantic; `zoo schema` prints its JSON Schema. The method is a discriminated union on
`method.method`, one member per adapter method the engine implements.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from compose.adalora.config import AdaLoraConfig
from compose.bottleneck.config import BottleneckConfig
from compose.fusion.config import FusionConfig
from compose.ia3.config import IA3Config
from compose.lora.config import LoraConfig
from compose.mam.config import MamConfig
from compose.prefix.config import PrefixConfig
from compose.prompt.config import PromptConfig
from zoo.errors import ZooError

#: One member per method the engine implements (`compose.methods.METHODS`), told apart by `method`.
MethodConfig = Annotated[
    Union[LoraConfig, AdaLoraConfig, IA3Config, PromptConfig, PrefixConfig, BottleneckConfig, MamConfig],
    Field(discriminator="method"),
]

#: The weights file of each folder layout, as stored (pickles are converted on import).
WEIGHTS_FILES = {"peft": "adapter_model.safetensors", "adapterhub": "adapter.safetensors"}

#: How people write each method's name.
METHOD_TITLES = {
    "lora": "LoRA", "adalora": "AdaLoRA", "ia3": "(IA)³", "prompt": "prompt-tuning", "ptuning": "P-tuning",
    "prefix": "prefix-tuning", "bottleneck": "bottleneck", "mam": "MAM",
}


def method_summary(config: Any) -> str:
    """A few words on an adapter's shape beside its method name, for tables and cards: 'r=8 α=16', '30 tokens'."""
    m = config.method
    if m == "lora":
        ranks = "/".join(map(str, sorted({config.r, *config.rank_pattern.values()})))
        return f"r={ranks} α={config.lora_alpha:g}" + (" rsLoRA" if config.use_rslora else "") + (" DoRA" if config.use_dora else "")
    if m == "adalora":
        return f"r={config.init_r}→{config.target_r}"
    if m in ("prompt", "ptuning", "prefix"):
        return f"{config.num_virtual_tokens} tokens"
    if m == "bottleneck":
        sites = "parallel" if config.is_parallel else "houlsby" if config.mh_adapter and config.output_adapter else "pfeiffer" if config.output_adapter else "attention"
        factor = config.reduction_factor if not isinstance(config.reduction_factor, dict) else config.reduction_factor.get("default", "per-layer")
        return f"{sites} ÷{factor:g}" if isinstance(factor, float | int) else f"{sites} ÷{factor}"
    if m == "mam":
        return f"{config.prefix.num_virtual_tokens} tokens + parallel"
    return "-"


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def check_name(name: str) -> str:
    """A registry name: letters, digits, '.', '_', '-' (no path separators, no '..')."""
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise ZooError(
            f"invalid adapter name {name!r}",
            "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def check_relative_path(path: str) -> str:
    """A file path inside an adapter folder: relative, no '..', no control characters."""
    parts = path.split("/")
    if (
        not path
        or path.startswith(("/", "\\"))
        or any(p in ("", ".", "..") for p in parts)
        or any(ord(c) < 32 or c == "\\" for c in path)
    ):
        raise ZooError(f"invalid file path {path!r} in adapter", "file paths must be relative, without '..'")
    return path


def _as_value_error(check):
    """Run a ZooError-raising check as a pydantic validator (pydantic wants ValueError)."""

    def validate(value):
        try:
            return check(value)
        except ZooError as e:
            raise ValueError(e.message) from None

    return AfterValidator(validate)


AdapterName = Annotated[str, _as_value_error(check_name)]
RelativePath = Annotated[str, _as_value_error(check_relative_path)]


def _finite_json(value: Any) -> Any:
    """`value` (free-form JSON) if it holds no NaN or ±Infinity: JSON has no such numbers, so the registry
    would write them as null, and a manifest must read back as it was written. Walked with a stack, not
    recursion: the input decides how deep it nests."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"holds {item}, not a finite number")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


FiniteJson = Annotated[dict[str, Any], AfterValidator(_finite_json)]


def _check_utf8(value: Any) -> None:
    """Raise a one-line `ZooError` for a string (at any depth of a dict or list) that UTF-8 cannot encode: argv
    bytes that are not UTF-8 arrive as lone surrogates, which no JSON file can store."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ZooError(f"{value!r:.60} holds bytes that are not UTF-8", "write it in plain text (UTF-8)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_utf8(k)
            _check_utf8(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_utf8(v)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # every number of a manifest survives JSON

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data: Any) -> Any:
        _check_utf8(data)  # every string of a manifest survives JSON too (checked before pydantic's own str checks)
        return data


class BaseModelRef(_Strict):
    """The model an adapter was trained on."""

    name_or_path: str | None = Field(None, description="Hub repo id or local path of the base model.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base.")
    model_type: str | None = Field(None, description="transformers model_type, e.g. 'llama'.")
    architecture: str | None = Field(None, description="transformers class the adapter was trained on.")


class DtypeSize(_Strict):
    params: int = Field(ge=0)
    bytes: int = Field(ge=0)


class SizeInfo(_Strict):
    """Measured from the weights file's header."""

    trainable_params: int = Field(ge=0, description="Parameters stored in the adapter's weights.")
    bytes: int = Field(ge=0, description="Bytes of tensor data (excluding the file header).")
    by_dtype: dict[str, DtypeSize] = Field(default_factory=dict, description="Params and bytes per safetensors dtype.")


class FileEntry(_Strict):
    """One file of the adapter, content-addressed in the store."""

    path: RelativePath = Field(description="File name inside the adapter folder.")
    sha256: str = Field(description="Hex sha256 of the file's bytes.")
    size: int = Field(ge=0, description="Bytes.")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not SHA256_RE.fullmatch(v):
            raise ValueError("must be 64 lowercase hex digits")
        return v


#: Versions fit a 32-bit signed integer (every backend's column, every JSON reader).
MAX_VERSION = 2**31 - 1
#: Free-text labels stay labels: `zoo list` shows them and filters on them.
MAX_TASK_CHARS, MAX_TAGS, MAX_TAG_CHARS = 1000, 64, 100


class MemberRef(_Strict):
    """One adapter inside a composition, pinned by version and by its weights' sha256."""

    name: AdapterName
    version: int = Field(ge=1, le=MAX_VERSION, strict=True)
    sha256: str = Field(description="sha256 of the member's weights file when the composition was made.")


class Source(_Strict):
    """Where the files came from, so they can be fetched again (`zoo verify --repair`)."""

    kind: Literal["local", "hub", "composition"]
    path: str | None = Field(None, description="Local folder (relative paths are relative to the registry file).")
    repo_id: str | None = Field(None, description="Hub repo id.")
    revision: str | None = Field(None, description="Resolved commit sha on the Hub.")
    original_files: list[FileEntry] = Field(
        default_factory=list, description="Files as found at the source when they were converted on import (e.g. a .bin pickle)."
    )
    members: list[MemberRef] = Field(default_factory=list, description="kind=composition: the adapters this one was computed from.")
    recipe: FiniteJson = Field(default_factory=dict, description="kind=composition: how (e.g. method, weights, rank, seed).")


class _Entry(_Strict):
    """What every registry entry has: identity, base, files, provenance, labels."""

    schema_version: Literal[1] = 1
    name: AdapterName
    version: int = Field(1, ge=1, le=MAX_VERSION, strict=True)  # strict: `true` or "1" is no version
    base_model: BaseModelRef = Field(default_factory=BaseModelRef)
    size: SizeInfo
    files: list[FileEntry]
    source: Source
    task: str | None = Field(None, max_length=MAX_TASK_CHARS, description="What the adapter was trained for (free text, for `zoo list --task`).")
    tags: list[Annotated[str, Field(max_length=MAX_TAG_CHARS)]] = Field(default_factory=list, max_length=MAX_TAGS)
    license: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0))

    @property
    def ref(self) -> str:
        """`name@version`, the unambiguous handle."""
        return f"{self.name}@{self.version}"

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)


class AdapterManifest(_Entry):
    """One adapter: a method config plus its weights."""

    kind: Literal["adapter"] = "adapter"
    method: MethodConfig
    format: Literal["peft", "adapterhub"] = Field("peft", description="Which library's folder layout the stored files follow.")
    task_type: str | None = Field(None, description="PEFT task_type, e.g. CAUSAL_LM, SEQ_CLS.")
    extra_config: FiniteJson = Field(
        default_factory=dict, description="Keys of the adapter config this version does not know, kept verbatim."
    )

    @property
    def label(self) -> str:
        return self.method.method

    @property
    def weights(self) -> FileEntry | None:
        """The stored weights file (compositions pin members by its sha256)."""
        return self.file(WEIGHTS_FILES[self.format])


class CompositionManifest(_Entry):
    """Adapters that act together: `stack` (their outputs add) or `attention` (an AdapterFusion layer
    per adapted module, whose weights are this entry's files)."""

    kind: Literal["composition"] = "composition"
    fusion: Literal["stack", "attention"]
    members: list[MemberRef] = Field(min_length=1)
    fusion_config: FusionConfig | None = Field(None, description="fusion=attention: the fusion layers' settings.")
    format: Literal["zoo", "adapterhub"] = Field("zoo", description="fusion=attention: whose file layout the fusion weights follow.")

    @property
    def label(self) -> str:
        return self.fusion


#: A registry entry, told apart by `kind`.
Manifest = Annotated[Union[AdapterManifest, CompositionManifest], Field(discriminator="kind")]
_MANIFEST = TypeAdapter(Manifest)


def validation_message(error: ValidationError, what: str) -> str:
    """One line naming the first invalid field of a pydantic error."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (+{error.error_count() - 1} more)" if error.error_count() > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    return f"invalid {what}: field '{where}': {msg}{more}"


def parse_manifest(data: Any, what: str = "manifest") -> Manifest:
    """Validate a manifest dict; a `ZooError` names the offending field."""
    if isinstance(data, dict) and "kind" not in data:
        data = {**data, "kind": "adapter"}  # the only kind before compositions existed
    try:
        return _MANIFEST.validate_python(data)
    except ValidationError as e:
        raise ZooError(validation_message(e, what)) from None


def manifest_schema() -> dict:
    """The manifest's JSON Schema (what `zoo schema` prints): one of the entry kinds, told apart by `kind`."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Manifest", **_MANIFEST.json_schema()}
