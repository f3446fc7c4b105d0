"""The Python API: register adapters, look them up, load them onto a base model.

    >>> import zoo
    >>> zoo.add("runs/my-lora", name="my-lora", task="sentiment")      # doctest: +SKIP
    >>> model = zoo.load("meta-llama/Llama-3.2-1B", adapters=["my-lora"])  # doctest: +SKIP
    >>> zoo.detach(model)                                              # doctest: +SKIP

Every function takes `registry=` (a path; default `$ZOO_REGISTRY` or `<ZOO_HOME>/registry.json`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from compose.lora.config import LoraConfig
from zoo.errors import ZooError
from zoo.formats import peft as peft_format
from zoo.manifest import BaseModelRef, DtypeSize, FileEntry, Manifest, SizeInfo, Source, check_name
from zoo.paths import registry_path, zoo_home
from zoo.registry import Registry
from zoo.store import Store, sha256_file

if TYPE_CHECKING:
    import torch

PathLike = str | os.PathLike


def open_registry(registry: PathLike | None = None) -> Registry:
    return Registry(registry_path(registry))


def open_store() -> Store:
    return Store(zoo_home())


def split_adapters(adapters: str | Iterable[str]) -> list[str]:
    """'a+b' or ['a', 'b'] → ['a', 'b']."""
    items = adapters.split("+") if isinstance(adapters, str) else list(adapters)
    if any(not a.strip() for a in items):
        raise ZooError(f"empty adapter name in {adapters!r}", "write a+b or a list of names")
    return [a.strip() for a in items]


# --- reading an adapter folder -------------------------------------------------------------------


@dataclass
class AdapterFolder:
    """A PEFT adapter folder as read from disk, before it is stored."""

    config: LoraConfig
    raw_config: dict[str, Any]
    unknown_keys: dict[str, Any]
    weights: Path  # a safetensors file (a converted copy when the source was a pickle)
    converted_from: FileEntry | None = None


def read_adapter_folder(folder: Path, *, allow_pickle: bool = False, workdir: Path | None = None) -> AdapterFolder:
    """Parse and check a PEFT adapter folder; a pickle is converted to safetensors in `workdir`."""
    if not folder.exists():
        raise ZooError(f"{folder} does not exist")
    if not folder.is_dir():
        raise ZooError(f"{folder} is not a folder", "point at the folder holding adapter_config.json")
    raw = peft_format.read_json_config(folder / peft_format.CONFIG_NAME)
    config, unknown = peft_format.lora_config_from_peft(raw, where=str(folder / peft_format.CONFIG_NAME))
    weights = peft_format.weights_file(folder, allow_pickle)
    converted = None
    if weights.suffix == ".bin":
        from safetensors.torch import save_file

        state = peft_format.load_pickle_state(weights)
        sha, size = sha256_file(weights)
        converted = FileEntry(path=weights.name, sha256=sha, size=size)
        weights = Path(workdir or tempfile.mkdtemp()) / peft_format.SAFETENSORS_NAME
        save_file({k: v.contiguous() for k, v in state.items()}, weights, metadata={"format": "pt"})
    return AdapterFolder(config, raw, unknown, weights, converted)


def measure_size(weights: Path, config: LoraConfig) -> SizeInfo:
    """Sizes from the safetensors header; every module's rank must be the one the config gives it."""
    from zoo.inspect import inspect_adapter

    report = inspect_adapter(weights, config={"peft_type": "LORA", **config.model_dump()})
    for row in report.modules:
        if row.rank != config.rank_for(row.module):
            raise ZooError(
                f"{row.module}: the weights have rank {row.rank}, the config says {config.rank_for(row.module)}",
                "fix r / rank_pattern in adapter_config.json",
            )
    return SizeInfo(
        trainable_params=report.trainable_params,
        bytes=report.total_bytes,
        by_dtype={d.dtype: DtypeSize(params=d.params, bytes=d.bytes) for d in report.by_dtype},
    )


# --- registry operations ---------------------------------------------------------------------------


def add(
    path: PathLike,
    *,
    name: str | None = None,
    task: str | None = None,
    tags: Iterable[str] = (),
    license: str | None = None,
    allow_pickle: bool = False,
    registry: PathLike | None = None,
) -> Manifest:
    """Import a PEFT adapter folder into the store and register it.

    Sizes, ranks and hashes are measured from the files. A name that already exists is refused.

    Example:
        >>> zoo.add("outputs/checkpoint-500", name="llama-sql", task="text-to-sql")  # doctest: +SKIP
    """
    folder = Path(path)
    name = check_name(name or folder.resolve().name)
    reg = open_registry(registry)
    if reg.versions(name):
        raise ZooError(f"an adapter named {name!r} already exists", "pick another --name, or `zoo remove` it first")
    with tempfile.TemporaryDirectory() as work:
        adapter = read_adapter_folder(folder, allow_pickle=allow_pickle, workdir=Path(work))
        size = measure_size(adapter.weights, adapter.config)
        store = open_store()
        files = [
            store.put(folder / peft_format.CONFIG_NAME, peft_format.CONFIG_NAME),
            store.put(adapter.weights, peft_format.SAFETENSORS_NAME),
        ]
    raw = adapter.raw_config
    manifest = Manifest(
        name=name,
        method=adapter.config,
        base_model=BaseModelRef(
            name_or_path=raw.get("base_model_name_or_path"),
            revision=raw.get("revision"),
            architecture=(raw.get("auto_mapping") or {}).get("base_model_class"),
        ),
        task_type=raw.get("task_type"),
        size=size,
        files=files,
        source=Source(kind="local", path=_source_path(folder, reg), original_files=[adapter.converted_from] if adapter.converted_from else []),
        task=task,
        tags=sorted(set(tags)),
        license=license,
        extra_config=adapter.unknown_keys,
    )
    with reg.transaction() as adapters:
        if any(m.name == name for m in adapters):
            raise ZooError(f"an adapter named {name!r} already exists", "pick another --name, or `zoo remove` it first")
        adapters.append(manifest)
    store.adapter_dir(manifest)
    return manifest


def _source_path(folder: Path, reg: Registry) -> str:
    """The folder as recorded: relative to the registry file when it lies beside it (a shipped index
    such as the repo's registry.json stays valid wherever the repo is cloned), else absolute."""
    folder, home = folder.resolve(), reg.path.parent.resolve()
    return str(folder.relative_to(home)) if folder.is_relative_to(home) else str(folder)


def adapter_folder(manifest: Manifest, *, registry: PathLike | None = None) -> Path:
    """The stored folder of `manifest`; files missing from the store are fetched again from a local
    source first (e.g. a registry shipped with its adapters), and must hash to the manifest's sha256."""
    store = open_store()
    missing = [f for f in manifest.files if not store.has(f)]
    if missing and manifest.source.kind == "local" and manifest.source.path:
        source = Path(manifest.source.path)
        source = source if source.is_absolute() else open_registry(registry).path.parent / source
        for f in missing:
            if (source / f.path).is_file():
                got = store.put(source / f.path, f.path)
                if got.sha256 != f.sha256:
                    raise ZooError(f"{source / f.path} changed since it was registered (sha256 {got.sha256[:12]}… != {f.sha256[:12]}…)", f"re-add it under a new name")
    return store.adapter_dir(manifest)


def list_adapters(
    *, base: str | None = None, method: str | None = None, task: str | None = None, registry: PathLike | None = None
) -> list[Manifest]:
    """Registered adapters (every version), filtered by base model, method and task."""
    return [
        m
        for m in open_registry(registry).read()
        if (base is None or base in (m.base_model.name_or_path or ""))
        and (method is None or m.method.method == method)
        and (task is None or m.task == task)
    ]


def show(ref: str, *, registry: PathLike | None = None) -> Manifest:
    """The manifest of 'name' (latest version) or 'name@version'."""
    return open_registry(registry).resolve(ref)


def remove(ref: str, *, registry: PathLike | None = None) -> list[Manifest]:
    """Unregister 'name' (every version) or 'name@version'; returns what was removed."""
    reg = open_registry(registry)
    reg.resolve(ref)  # a clear error if nothing matches
    name, version = ref.partition("@")[0], ref.partition("@")[2]
    with reg.transaction() as adapters:
        removed = [m for m in adapters if m.name == name and (not version or str(m.version) == version)]
        adapters[:] = [m for m in adapters if m not in removed]
    store = open_store()
    for m in removed:
        store.drop_adapter_dir(m)
    return removed


@dataclass
class VerifyResult:
    ref: str
    path: str
    problem: str | None  # None: intact


def verify(ref: str | None = None, *, registry: PathLike | None = None) -> list[VerifyResult]:
    """Re-hash every stored file of one adapter (or all) against its manifest."""
    reg = open_registry(registry)
    manifests = [reg.resolve(ref)] if ref else reg.read()
    store = open_store()
    return [VerifyResult(m.ref, f.path, store.verify(f)) for m in manifests for f in m.files]


def schema() -> dict:
    """The manifest's JSON Schema."""
    from zoo.manifest import manifest_schema

    return manifest_schema()


# --- loading -------------------------------------------------------------------------------------------

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
    config: LoraConfig
    state: dict[str, torch.Tensor]
    task_type: str | None
    architecture: str | None


def resolve_adapter(item: str, *, registry: PathLike | None = None, allow_pickle: bool = False) -> ResolvedAdapter:
    """A registry reference ('name', 'name@2') or an adapter folder → config + tensors."""
    if Path(item).is_dir():
        with tempfile.TemporaryDirectory() as work:
            adapter = read_adapter_folder(Path(item), allow_pickle=allow_pickle, workdir=Path(work))
            state = peft_format.load_state(adapter.weights)
        raw = adapter.raw_config
        return ResolvedAdapter(
            Path(item).resolve().name, adapter.config, peft_format.strip_prefix(state),
            raw.get("task_type"), (raw.get("auto_mapping") or {}).get("base_model_class"),
        )
    manifest = open_registry(registry).resolve(item)
    folder = adapter_folder(manifest, registry=registry)
    state = peft_format.load_state(folder / peft_format.SAFETENSORS_NAME)
    return ResolvedAdapter(manifest.name, manifest.method, peft_format.strip_prefix(state), manifest.task_type, manifest.base_model.architecture)


def _num_labels(adapter: ResolvedAdapter) -> int | None:
    """A classification head saved in modules_to_save fixes the label count (last Linear's out features)."""
    heads = [k for k in adapter.state if k.endswith(".weight") and any(k.startswith(m + ".") or f".{m}." in k for m in adapter.config.modules_to_save)]
    return adapter.state[max(heads, key=lambda k: k.count("."))].shape[0] if heads else None


def load_base(
    base: PathLike, *, task_type: str | None = None, architecture: str | None = None, model_class: Any = None, **kwargs: Any
) -> torch.nn.Module:
    """`from_pretrained` with the class the adapter was trained on (task type, else its recorded architecture)."""
    import transformers

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
        raise


def load(
    base: PathLike | torch.nn.Module,
    adapters: str | Iterable[str] = (),
    *,
    registry: PathLike | None = None,
    model_class: Any = None,
    dtype: Any = None,
    device_map: Any = None,
    quantization_config: Any = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    **from_pretrained_kwargs: Any,
) -> torch.nn.Module:
    """Load `base` (a path, a Hub id, or a model you already built) with `adapters` attached and active.

    `adapters` are registry references or adapter folders, as a list or 'a+b'. `dtype`, `device_map`
    and `quantization_config` go to transformers' `from_pretrained` unchanged, so a base sharded by
    accelerate or loaded in 4-bit works the same way. Returns the transformers model in eval mode, ready
    for `forward`/`generate`; `zoo.detach(model)` takes the adapters off again.

    Example:
        >>> model = zoo.load("gpt2", adapters="poems+rhymes", dtype=torch.bfloat16)  # doctest: +SKIP
    """
    import torch

    from compose.lora.model import attach_lora

    resolved = [resolve_adapter(a, registry=registry, allow_pickle=allow_pickle) for a in split_adapters(adapters)] if adapters else []
    if len({a.name for a in resolved}) != len(resolved):
        raise ZooError("the same adapter is named twice", "list each adapter once")
    if isinstance(base, torch.nn.Module):
        model = base
    else:
        first = resolved[0] if resolved else None
        kwargs = {k: v for k, v in dict(dtype=dtype, device_map=device_map, quantization_config=quantization_config).items() if v is not None}
        if first and first.task_type in ("SEQ_CLS", "TOKEN_CLS") and "num_labels" not in from_pretrained_kwargs:
            if (n := _num_labels(first)) is not None:
                kwargs["num_labels"] = n
        model = load_base(
            base, task_type=first and first.task_type, architecture=first and first.architecture, model_class=model_class,
            trust_remote_code=trust_remote_code, **kwargs, **from_pretrained_kwargs,
        )
    for adapter in resolved:
        attach_lora(model, adapter.name, adapter.config, adapter.state)
    return model.eval()


def detach(model: torch.nn.Module, name: str | None = None) -> torch.nn.Module:
    """Take adapter `name` (default: all) off a model returned by `load`, restoring the original modules."""
    from compose.lora.model import detach_lora

    return detach_lora(model, name)
