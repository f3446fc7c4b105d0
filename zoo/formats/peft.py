"""PEFT's adapter folder format: `adapter_config.json` + `adapter_model.safetensors` (or a `.bin` pickle).

Weights are keyed `base_model.model.<module path>.lora_A.weight`: the path is relative to the transformers
model, behind the two wrappers PEFT puts around it. The engine takes paths relative to the transformers
model, so this module strips (and, when writing, restores) that prefix.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.errors import ZooError

if TYPE_CHECKING:
    import torch

    from zoo.manifest import MethodConfig

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"  # prompt learning methods save this one top-level tensor
#: The same tensor under the name peft 0.2 saved it (the prompt encoder's embedding, e.g. ChatGLM-6B prefixes).
LEGACY_PROMPT_KEYS = ("prompt_encoder.embedding.weight",)
MAX_CONFIG_BYTES = 1 << 20  # a real adapter_config.json is a few KB

#: PEFT's peft_type → the engine's method name (its config class is `compose.methods.METHODS[name][0]`).
PEFT_TYPES = {"LORA": "lora", "ADALORA": "adalora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning"}
_METADATA_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "auto_mapping", "peft_version", "inference_mode"}
# Only used while training or to pick targets (the weights name the modules): no effect on outputs.
_TRAINING_KEYS = {
    "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "ensure_weight_tying", "megatron_config", "megatron_core", "exclude_modules", "layers_to_transform",
    "layers_pattern", "runtime_config", "qalora_group_size",
    # AdaLoRA's rank allocation schedule
    "beta1", "beta2", "deltaT", "tinit", "tfinal", "total_step", "orth_reg_weight",
    # initialisation of IA3 vectors, prefixes, prompts and P-tuning's encoder (a saved file holds the result)
    "init_ia3_weights", "init_weights", "tokenizer_name_or_path", "tokenizer_kwargs", "prompt_tuning_init",
    "prompt_tuning_init_text", "encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers",
    "encoder_dropout", "prefix_projection",
    # where a method has no such field, the file's tensors already say it (saved heads, one prompt stack)
    "modules_to_save", "num_transformer_submodules",
}
# Change the forward pass when set; refused rather than silently computed wrong.
_UNSUPPORTED_KEYS = {
    "alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication", "monteclora_config",
    "target_parameters", "trainable_token_indices", "use_bdlora", "use_qalora", "velora_config",
}
# Written by peft < 0.3 for a layout no later peft loads: refused with that cause rather than as an unknown key.
_LEGACY_KEYS = {
    "enable_lora": "peft < 0.3's MergedLinear (LoRA on some parts of a fused projection such as ChatGLM's "
                   "query_key_value, stored as grouped lora_B convolutions), which no current peft or adapter-zoo loads",
}
#: LoRA initialisations after which PEFT rewrites the base weights when it loads the adapter (W − s·B₀·A₀):
#: "pissa" and "olora" are recomputed exactly (full SVD / QR of W, `compose.lora.residual`); these are not.
_RESIDUAL_REFUSED = {
    "pissa_niter_": "PiSSA with a randomized SVD (pissa_niter_K)",
    "corda": "CorDA, whose residual comes from training-data covariances",
    "loftq": "LoftQ, whose residual is a quantized base",
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
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooError(f"{path} is not valid JSON: {e}") from None
    except ValueError as e:  # NaN, Infinity, 1e999: no JSON number, and the registry could not write them back
        raise ZooError(f"{path}: {e}", f"write a finite number in {what}") from None
    except RecursionError:
        raise ZooError(f"{path} nests too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ZooError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    if not math.isfinite(value := float(text)):
        raise ValueError(f"{text} overflows a 64-bit float")
    return value


def _is_unset(value: Any) -> bool:
    return value in (None, False, "none", {}, [])


def check_legacy_config(cfg: dict[str, Any], where: str = CONFIG_NAME) -> None:
    """Refuse a config written by a peft whose layout nothing current loads, naming that cause (`zoo add`,
    `zoo inspect` and `zoo.load` all call this)."""
    for key, cause in _LEGACY_KEYS.items():
        if not _is_unset(cfg.get(key)):
            raise ZooError(f"{where}: {key}={cfg[key]!r} marks {cause}", "retrain the adapter with a current peft (target the fused module whole)")


def residual_init(value: Any, where: str = CONFIG_NAME) -> str | None:
    """A LoRA config's `init_lora_weights` as far as it matters after training: 'pissa' or 'olora' (PEFT loads
    the adapter onto the residual base W − s·B₀·A₀ of that initialisation), else None (only the start of
    training). The initialisations whose residual cannot be recomputed are refused."""
    if not isinstance(value, str):
        return None
    name = value.lower()
    if name in ("pissa", "olora"):
        return name
    for prefix, what in _RESIDUAL_REFUSED.items():
        if name.startswith(prefix):
            raise ZooError(
                f"{where}: init_lora_weights={value!r} is {what}: peft loads it onto base weights rewritten by that "
                "initialisation, which cannot be recomputed here",
                "convert it to a plain LoRA when saving: save_pretrained(..., path_initial_model_for_weight_conversion=...) "
                "(peft's convert_pissa_to_lora / convert_corda_to_lora)",
            )
    return None


def config_from_peft(cfg: dict[str, Any], where: str = CONFIG_NAME) -> tuple[MethodConfig, dict[str, Any]]:
    """Map a PEFT `adapter_config.json` onto the engine's config for its `peft_type`.

    Keys the config class has are taken; training-only keys are dropped; keys that would change the
    forward pass in a way the engine does not implement are refused. Returns the config and the keys
    this version does not know (kept verbatim, with a warning, as PEFT itself does for configs written
    by a newer PEFT).
    """
    from compose.methods import METHODS

    peft_type = cfg.get("peft_type")
    method = PEFT_TYPES.get(peft_type) if isinstance(peft_type, str) else None  # a list or dict is no key
    if method is None:
        raise ZooError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported", f"supported: {', '.join(PEFT_TYPES)}")
    config_class = METHODS[method][0]
    check_legacy_config(cfg, where)
    if cfg.get("bias", "none") != "none":
        raise ZooError(f"{where}: bias={cfg['bias']!r} is not supported", "re-train with bias='none' (the default)")
    for key in sorted(_UNSUPPORTED_KEYS & cfg.keys()):
        if not _is_unset(cfg[key]):
            raise ZooError(f"{where}: PEFT feature {key}={cfg[key]!r} is not supported by adapter-zoo yet")
    fields = set(config_class.model_fields) - {"method"}
    unknown = {k: v for k, v in cfg.items() if k not in fields | _METADATA_KEYS | _TRAINING_KEYS | _UNSUPPORTED_KEYS | {"bias"}}
    if unknown:
        warnings.warn(f"{where}: ignoring unknown config keys {sorted(unknown)} (kept in the manifest)", UnknownConfigKeysWarning, stacklevel=2)
    values = {k: v for k, v in cfg.items() if k in fields and v is not None}
    if "init_lora_weights" in fields:  # LoRA: only an initialisation that leaves a residual base matters
        values["init_lora_weights"] = residual_init(cfg.get("init_lora_weights"), where)
    try:
        return config_class.model_validate({**values, "method": method}), unknown
    except Exception as e:  # pydantic.ValidationError, reported by field
        from zoo.manifest import validation_message

        raise ZooError(validation_message(e, where)) from None


def peft_config_for(config: MethodConfig, *, base_model: str | None, task_type: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `adapter_config.json` PEFT (and vLLM, for LoRA) load for `config`."""
    peft_type = next(t for t, m in PEFT_TYPES.items() if m == config.method)
    cfg: dict[str, Any] = {
        **(extra or {}),
        **config.model_dump(exclude={"method"}),
        "peft_type": peft_type,
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }
    if config.method in ("lora", "adalora"):
        cfg.update(bias="none", lora_dropout=0.0)
    if cfg.get("init_lora_weights", True) is None:  # no residual base: peft's default
        del cfg["init_lora_weights"]
    if "modules_to_save" in cfg and not cfg["modules_to_save"]:
        cfg["modules_to_save"] = None
    return dict(sorted(cfg.items()))


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT keys → paths relative to the transformers model. Prompt-learning models have one wrapper
    fewer, so their saved heads are keyed `base_model.classifier.weight`; peft 0.2's name of the prompt
    tensor becomes `prompt_embeddings`."""
    out = {}
    for k, v in state.items():
        k = PROMPT_KEY if k in LEGACY_PROMPT_KEYS else k.removeprefix(KEY_PREFIX) if k.startswith(KEY_PREFIX) else k.removeprefix("base_model.")
        if k in out:
            raise ZooError(f"the adapter holds tensor {k!r} twice, under two names", "keep one of them")
        out[k] = v
    return out


def add_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Paths relative to the transformers model → PEFT keys (a prompt's embeddings are not a module's)."""
    return {(k if k == PROMPT_KEY else KEY_PREFIX + k): v for k, v in state.items()}


def weights_file(folder: Path, allow_pickle: bool = False, names: tuple[str, str] = (SAFETENSORS_NAME, PICKLE_NAME)) -> Path:
    """The adapter's weights file, `names` = (safetensors, pickle): safetensors, or the pickle only when
    explicitly allowed."""
    safetensors_name, pickle_name = names
    if (folder / safetensors_name).is_file():
        return folder / safetensors_name
    if (folder / pickle_name).is_file():
        if not allow_pickle:
            raise ZooError(
                f"{folder / pickle_name} is a pickle, which can run code when loaded",
                "pass --allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True), or convert it to safetensors",
            )
        return folder / pickle_name
    raise ZooError(f"{folder} holds no {safetensors_name}", "is this an adapter folder?")


def load_pickle_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a PEFT `.bin`, with `weights_only=True` (no code runs; only tensors are accepted)."""
    import torch

    from zoo.formats.pickle_bounds import check_archive, check_tensors

    check_archive(path)  # memory-mapped below: loading costs no more than the file's size
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # UnpicklingError and friends: report, never execute
        raise ZooError(f"{path} is not a weights-only pickle: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ZooError(f"{path} does not hold a flat dict of tensors")
    check_tensors(path, state)
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
    folder: Path, config: MethodConfig, state: dict[str, torch.Tensor], *, base_model: str | None, task_type: str | None
) -> Path:
    """Write a PEFT adapter folder (loadable by peft, vLLM and `zoo add`) from engine-keyed tensors. Its config
    names `base_model` only if it is a Hub id: a local path means nothing elsewhere and may name the user's home
    (the registry keeps it in the manifest)."""
    from safetensors.torch import save_file

    from zoo.hub import is_hub_id

    base_model = base_model if is_hub_id(base_model) else None

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_json = peft_config_for(config, base_model=base_model, task_type=task_type)
    (folder / CONFIG_NAME).write_text(json.dumps(config_json, indent=2) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in add_prefix(state).items()}
    save_file(tensors, folder / SAFETENSORS_NAME, metadata={"format": "pt"})
    return folder
