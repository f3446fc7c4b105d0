"""An adapter folder on disk, whatever wrote it: PEFT or AdapterHub.

PEFT folders hold `adapter_config.json` with a `peft_type` and `adapter_model.safetensors`;
AdapterHub folders hold `adapter_config.json` with a `config` dict and `adapter.safetensors`. Either
way a pickled `.bin` is read only when allowed (with `weights_only=True`) and converted to safetensors,
so the store never holds a pickle. Files are stored under their format's own names, so a stored folder
still loads with the library that wrote it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from zoo.errors import ZooError
from zoo.formats import peft as peft_format
from zoo.manifest import WEIGHTS_FILES, BaseModelRef, FileEntry

if TYPE_CHECKING:
    import torch

    from zoo.manifest import MethodConfig

Format = Literal["peft", "adapterhub"]

#: format → (safetensors name, pickle name) of its weights file
WEIGHTS_NAMES: dict[str, tuple[str, str]] = {
    "peft": (WEIGHTS_FILES["peft"], peft_format.PICKLE_NAME),
    "adapterhub": (WEIGHTS_FILES["adapterhub"], "pytorch_adapter.bin"),
}


def folder_files() -> list[str]:
    """Every file of an adapter or AdapterFusion folder that zoo reads (PEFT and AdapterHub layouts): what
    `zoo add` copies out of the folder before reading anything."""
    from zoo.formats import adapterhub

    names = [peft_format.CONFIG_NAME, *(n for pair in WEIGHTS_NAMES.values() for n in pair)]
    names += [adapterhub.FUSION_CONFIG_NAME, *adapterhub.FUSION_WEIGHTS_NAMES, *adapterhub.HEAD_FILES]
    return list(dict.fromkeys(names))


@dataclass
class AdapterFolder:
    """An adapter folder as read from disk, before it is stored."""

    format: Format
    config: MethodConfig
    raw_config: dict[str, Any]
    unknown_keys: dict[str, Any]
    weights: Path  # a safetensors file (a converted copy when the source was a pickle)
    base_model: BaseModelRef
    task_type: str | None = None
    converted_from: FileEntry | None = None
    config_path: Path = Path()

    @property
    def files(self) -> dict[str, Path]:
        """{name in the stored folder: file to store}."""
        return {peft_format.CONFIG_NAME: self.config_path, WEIGHTS_NAMES[self.format][0]: self.weights}


def config_format(raw: dict[str, Any]) -> Format:
    """Which library wrote an `adapter_config.json`: PEFT's has a `peft_type`, AdapterHub's nests the
    method's settings under `config`."""
    return "adapterhub" if "peft_type" not in raw and isinstance(raw.get("config"), dict) else "peft"


def read_adapter_folder(folder: Path, *, allow_pickle: bool = False, workdir: Path | None = None, model_config: dict | None = None) -> AdapterFolder:
    """Parse and check an adapter folder; a pickle is converted to safetensors in `workdir`.

    `model_config` (the base's config.json) is needed for AdapterHub prefixes, whose files do not record
    the attention layout; without it, a local base named in the adapter's `model_name` is used."""
    if not folder.exists():
        raise ZooError(f"{folder} does not exist")
    if not folder.is_dir():
        raise ZooError(f"{folder} is not a folder", "point at the folder holding adapter_config.json")
    raw = peft_format.read_json_config(folder / peft_format.CONFIG_NAME)
    fmt = config_format(raw)
    if fmt == "peft":
        where = folder / peft_format.CONFIG_NAME
        config, unknown = peft_format.config_from_peft(raw, where=str(where))
        auto_mapping = _text_or_none(raw, "auto_mapping", where, dict) or {}
        base = BaseModelRef(
            name_or_path=_text_or_none(raw, "base_model_name_or_path", where), revision=_text_or_none(raw, "revision", where),
            architecture=_text_or_none(auto_mapping, "base_model_class", where),
        )
        task_type = _text_or_none(raw, "task_type", where)
    else:
        from zoo.formats.adapterhub import read_adapterhub_adapter

        local_base = Path(str(raw.get("model_name") or "")) / "config.json"
        if model_config is None and local_base.is_file():
            model_config = peft_format.read_json_config(local_base, "config.json")
        config, _, meta = read_adapterhub_adapter(folder, allow_pickle=allow_pickle, model_config=model_config)
        unknown, task_type = {}, None
        base = BaseModelRef(name_or_path=meta.get("model_name"), model_type=meta.get("model_type"), architecture=meta.get("model_class"))
    weights = peft_format.weights_file(folder, allow_pickle, WEIGHTS_NAMES[fmt])
    converted = None
    if weights.suffix == ".bin":
        from safetensors.torch import save_file

        from zoo.store import sha256_file

        state = peft_format.load_pickle_state(weights)
        sha, size = sha256_file(weights)
        converted = FileEntry(path=weights.name, sha256=sha, size=size)
        weights = Path(workdir or tempfile.mkdtemp()) / WEIGHTS_NAMES[fmt][0]
        save_file(_distinct(state), weights, metadata={"format": "pt"})
    return AdapterFolder(fmt, config, raw, unknown, weights, base, task_type, converted, folder / peft_format.CONFIG_NAME)


def _text_or_none(raw: dict[str, Any], key: str, where: Path, kind: type = str) -> Any:
    """`raw[key]` when it is a `kind` (a string by default) or absent/null; a one-line error otherwise."""
    value = raw.get(key)
    if value is not None and not isinstance(value, kind):
        expected = {str: "a string", dict: "an object"}[kind]
        raise ZooError(f"{where}: {key} is {value!r:.80}, not {expected}", f"fix {key} in {where.name} (or remove it)")
    return value


def _distinct(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per tensor: AdapterHub pickles name some tensors twice or once per layer (its shared prefix
    pool, a LayerNorm under `ln_before`), which safetensors refuses; the first name in sorted order is kept."""
    seen, out = set(), {}
    for name in sorted(state):
        t = state[name]
        identity = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if identity not in seen:
            seen.add(identity)
            out[name] = t.contiguous()
    return out


def load_adapter_state(folder: Path, config: MethodConfig, fmt: Format, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder whose `config` is known, keyed as the engine takes them."""
    if fmt == "adapterhub":
        from zoo.formats.adapterhub import read_adapterhub_adapter

        return read_adapterhub_adapter(folder, allow_pickle=allow_pickle, model_config=attention_layout(config))[1]
    return peft_format.strip_prefix(peft_format.load_state(peft_format.weights_file(folder, allow_pickle)))


def attention_layout(config: MethodConfig) -> dict | None:
    """The part of a base config that AdapterHub's prefix import needs, from a prefix already imported once."""
    prefix = config if config.method == "prefix" else getattr(config, "prefix", None)
    if prefix is None:
        return None
    return {"num_hidden_layers": prefix.num_layers, "num_attention_heads": prefix.num_attention_heads, "d_kv": prefix.head_dim}
