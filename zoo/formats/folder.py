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


def read_adapter_folder(folder: Path, *, allow_pickle: bool = False, workdir: Path | None = None) -> AdapterFolder:
    """Parse and check an adapter folder; a pickle is converted to safetensors in `workdir`."""
    if not folder.exists():
        raise ZooError(f"{folder} does not exist")
    if not folder.is_dir():
        raise ZooError(f"{folder} is not a folder", "point at the folder holding adapter_config.json")
    raw = peft_format.read_json_config(folder / peft_format.CONFIG_NAME)
    fmt = config_format(raw)
    if fmt == "peft":
        config, unknown = peft_format.config_from_peft(raw, where=str(folder / peft_format.CONFIG_NAME))
        base = BaseModelRef(
            name_or_path=raw.get("base_model_name_or_path"), revision=raw.get("revision"),
            architecture=(raw.get("auto_mapping") or {}).get("base_model_class"),
        )
        task_type = raw.get("task_type")
    else:
        from zoo.formats.adapterhub import read_adapterhub_adapter

        config, _, meta = read_adapterhub_adapter(folder, allow_pickle=allow_pickle)
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
        # AdapterHub pickles share tensors between names (a prefix pool per layer); safetensors stores each once per name
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, weights, metadata={"format": "pt"})
    return AdapterFolder(fmt, config, raw, unknown, weights, base, task_type, converted, folder / peft_format.CONFIG_NAME)


def load_adapter_state(folder: Path, fmt: Format, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder, keyed as the engine takes them (relative to the transformers model)."""
    if fmt == "adapterhub":
        from zoo.formats.adapterhub import read_adapterhub_adapter

        return read_adapterhub_adapter(folder, allow_pickle=allow_pickle)[1]
    return peft_format.strip_prefix(peft_format.load_state(peft_format.weights_file(folder, allow_pickle)))
