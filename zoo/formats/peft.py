"""PEFT's adapter folder format: `adapter_config.json` + `adapter_model.safetensors` (or a `.bin` pickle).

Weights are keyed `base_model.model.<module path>.lora_A.weight`: the path is relative to the transformers
model, behind the two wrappers PEFT puts around it. The engine takes paths relative to the transformers
model, so this module strips (and, when writing, restores) that prefix.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compose.lora.config import LoraConfig
from zoo.errors import ZooError

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is a few KB

# PEFT LoraConfig keys, by what they mean for a loaded adapter.
_LORA_FIELDS = set(LoraConfig.model_fields) - {"method"}
_METADATA_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "auto_mapping", "peft_version", "inference_mode"}
# Only used while training or to pick targets (the weights name the modules): no effect on outputs.
_TRAINING_KEYS = {
    "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "ensure_weight_tying", "megatron_config", "megatron_core", "exclude_modules", "layers_to_transform",
    "layers_pattern", "runtime_config", "qalora_group_size",
}
# Change the forward pass when set; refused rather than silently computed wrong.
_UNSUPPORTED_KEYS = {
    "alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication", "monteclora_config",
    "target_parameters", "trainable_token_indices", "use_bdlora", "use_qalora", "velora_config",
}


class UnknownConfigKeysWarning(UserWarning):
    """An adapter config has keys this version does not know (kept in the manifest, ignored)."""


def read_json_config(path: Path, what: str = CONFIG_NAME) -> dict[str, Any]:
    """Read a small JSON object, refusing oversized or malformed files with a one-line error."""
    if not path.is_file():
        raise ZooError(f"{path} not found", f"an adapter folder needs {what}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ZooError(f"{path} is {path.stat().st_size:,} bytes", f"{what} must be under {MAX_CONFIG_BYTES:,} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ZooError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _is_unset(value: Any) -> bool:
    return value in (None, False, "none", {}, [])


def lora_config_from_peft(cfg: dict[str, Any], where: str = CONFIG_NAME) -> tuple[LoraConfig, dict[str, Any]]:
    """Map a PEFT LoRA `adapter_config.json` onto `LoraConfig`.

    Returns the config and the keys this version does not know (kept verbatim, with a warning, as PEFT
    itself does for configs written by a newer PEFT).
    """
    if cfg.get("peft_type") != "LORA":
        raise ZooError(f"{where}: peft_type is {cfg.get('peft_type')!r}", "only LORA adapters are supported so far")
    if cfg.get("bias", "none") != "none":
        raise ZooError(f"{where}: bias={cfg['bias']!r} is not supported", "re-train with bias='none' (the default)")
    for key in sorted(_UNSUPPORTED_KEYS & cfg.keys()):
        if not _is_unset(cfg[key]):
            raise ZooError(f"{where}: PEFT feature {key}={cfg[key]!r} is not supported by adapter-zoo yet")
    unknown = {k: v for k, v in cfg.items() if k not in _LORA_FIELDS | _METADATA_KEYS | _TRAINING_KEYS | _UNSUPPORTED_KEYS | {"bias"}}
    if unknown:
        warnings.warn(f"{where}: ignoring unknown config keys {sorted(unknown)} (kept in the manifest)", UnknownConfigKeysWarning, stacklevel=2)
    fields = {k: v for k, v in cfg.items() if k in _LORA_FIELDS and v is not None}
    try:
        return LoraConfig.model_validate(fields), unknown
    except Exception as e:  # pydantic.ValidationError, reported by field
        from zoo.manifest import validation_message

        raise ZooError(validation_message(e, where)) from None


def peft_config_from_lora(config: LoraConfig, *, base_model: str | None, task_type: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `adapter_config.json` PEFT (and vLLM) load for `config`."""
    cfg: dict[str, Any] = {
        **(extra or {}),
        **config.model_dump(exclude={"method"}),
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
    }
    if not cfg["modules_to_save"]:
        cfg["modules_to_save"] = None
    return dict(sorted(cfg.items()))


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys → paths relative to the transformers model."""
    return {k.removeprefix(KEY_PREFIX): v for k, v in state.items()}


def add_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Paths relative to the transformers model → PEFT keys."""
    return {KEY_PREFIX + k: v for k, v in state.items()}


def weights_file(folder: Path, allow_pickle: bool = False) -> Path:
    """The adapter's weights file: safetensors, or a pickle only when explicitly allowed."""
    if (folder / SAFETENSORS_NAME).is_file():
        return folder / SAFETENSORS_NAME
    if (folder / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise ZooError(
                f"{folder / PICKLE_NAME} is a pickle, which can run code when loaded",
                "pass --allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True), or convert it to safetensors",
            )
        return folder / PICKLE_NAME
    raise ZooError(f"{folder} holds no {SAFETENSORS_NAME}", "is this a PEFT adapter folder?")


def load_pickle_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a PEFT `.bin`, with `weights_only=True` (no code runs; only tensors are accepted)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: report, never execute
        raise ZooError(f"{path} is not a weights-only pickle: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ZooError(f"{path} does not hold a flat dict of tensors")
    return state


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file (safetensors; a `.bin` only reaches here when allowed)."""
    if path.suffix == ".bin":
        return load_pickle_state(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ZooError(f"{path} is not a readable safetensors file: {e}") from None


def save_adapter(
    folder: Path, config: LoraConfig, state: dict[str, torch.Tensor], *, base_model: str | None, task_type: str | None
) -> Path:
    """Write a PEFT adapter folder (loadable by peft, vLLM and `zoo add`) from engine-keyed tensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_json = peft_config_from_lora(config, base_model=base_model, task_type=task_type)
    (folder / CONFIG_NAME).write_text(json.dumps(config_json, indent=2) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in add_prefix(state).items()}
    save_file(tensors, folder / SAFETENSORS_NAME, metadata={"format": "pt"})
    return folder
