"""AdapterHub's saved adapters and fusions (the `adapters` library, formerly adapter-transformers).

An adapter folder holds `adapter_config.json` = {"config": {...}, "hidden_size", "model_class",
"model_name", "model_type", "name", "version"} and `adapter.safetensors` (or `pytorch_adapter.bin`),
maybe with a prediction head (`head_config.json` + `model_head.safetensors`), which is not imported.
A fusion folder holds `adapter_fusion_config.json` (with `adapter_names`) and
`model_adapter_fusion.safetensors` (or `pytorch_model_adapter_fusion.bin`).

Tensors are keyed by AdapterHub's module paths; this module maps them onto the engine's:

    <layer>.attention.output.adapters.<name>.*  /  <layer>.attention_adapters.adapters.<name>.*  → <layer>.mh_adapter.*
    <layer>.output.adapters.<name>.*            /  <layer>.output_adapters.adapters.<name>.*     → <layer>.output_adapter.*
    …adapter_fusion_layer.<a,b>.{query,key,value}.*                                             → <layer>.<location>.fusion.*
    …prefix_tunings.<name>.self_prefix.*  → prompt_embeddings (the prefix MLP run once, in eval mode)
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.errors import ZooError
from zoo.formats.peft import load_state, read_json_config, weights_file

if TYPE_CHECKING:
    import torch

    from compose.bottleneck.config import BottleneckConfig
    from compose.fusion.config import FusionConfig
    from compose.prefix.config import PrefixConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_FILES = ("head_config.json", "model_head.safetensors", "pytorch_model_head.bin")
FUSION_CONFIG_NAME = "adapter_fusion_config.json"
FUSION_WEIGHTS_NAMES = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")

# BnConfig keys that only matter while training (a saved file holds the trained tensors)
_BN_TRAINING = {"init_weights", "init_weights_seed", "dropout", "stochastic_depth", "cross_adapter", "inv_adapter_reduction_factor",
                "phm_dim", "factorized_phm_W", "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "phm_c_init",
                "phm_init_range", "learn_phm", "hypercomplex_nonlinearity", "phm_rank", "phm_bias", "architecture"}
# adapter-transformers v2 names of what are now `adapters` (and its old activation names, for files without a version)
_LEGACY = {"attention_text_task_adapters": "adapters", "attention_text_lang_adapters": "adapters",
           "layer_text_task_adapters": "adapters", "layer_text_lang_adapters": "adapters"}
_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}
_SITES = {"attention.output": "mh_adapter", "attention_adapters": "mh_adapter", "output": "output_adapter", "output_adapters": "output_adapter"}
_SITE_KEY = re.compile(r"^(?P<layer>.+\.\d+)\.(?P<site>attention\.output|attention_adapters|output|output_adapters)\.(?P<rest>.+)$")
_PREFIX_KEY = re.compile(r"(?:^|\.)prefix_tunings\.(?P<name>[^.]+)\.(?P<location>[^.]+)\.(?P<tensor>.+)$")


def is_adapterhub_folder(path: str | Path) -> bool:
    """Whether `path` is an AdapterHub adapter folder (a `config` dict, no `peft_type`) or fusion folder."""
    path = Path(path)
    if (path / FUSION_CONFIG_NAME).is_file():
        return True
    try:
        raw = read_json_config(path / CONFIG_NAME)
    except ZooError:
        return False
    return "peft_type" not in raw and isinstance(raw.get("config"), dict)


def read_adapterhub_adapter(
    folder: str | Path, allow_pickle: bool = False, *, model_config: Any = None
) -> tuple[BottleneckConfig | PrefixConfig | Any, dict[str, torch.Tensor], dict[str, Any]]:
    """
    Read an AdapterHub saved adapter as the engine's config and state.

    Bottleneck adapters (`seq_bn`, `double_seq_bn`, `par_bn`, custom `BnConfig`s) become a `BottleneckConfig`,
    prefix tuning a `PrefixConfig` (its MLP is run once, in eval mode, into `prompt_embeddings`; positions start
    at 0 as in AdapterHub), MAM (a union of prefix tuning and a bottleneck adapter) a `MamConfig`.

    Args:
        folder (`str` or `Path`): the folder `model.save_adapter` wrote.
        allow_pickle (`bool`): read `pytorch_adapter.bin` (with `torch.load(weights_only=True)`) when there is no
            `adapter.safetensors`.
        model_config (`dict` or `PretrainedConfig`, *optional*): the base model's config; prefix tuning and MAM need
            it for the attention layout (layers, key/value heads), which the adapter's files do not record.

    Returns:
        `(config, state, meta)`: state keyed relative to the transformers model (see the module docstring); meta has
        the file's name, model_type, model_class, model_name, hidden_size, version, and `notes` on what was skipped.

    Raises:
        [`ZooError`]: a missing or malformed file; a method or option the engine does not implement (Compacter,
            invertible adapters, gating on prefixes, LoRA/IA3/ReFT/prompt tuning from AdapterHub).
    """
    folder = Path(folder)
    raw = read_json_config(folder / CONFIG_NAME)
    if not isinstance(raw.get("config"), dict):
        raise ZooError(f"{folder / CONFIG_NAME} has no 'config' object", "is this an AdapterHub adapter folder?")
    meta = {k: raw.get(k) for k in ("name", "model_type", "model_class", "model_name", "hidden_size", "version")}
    meta["notes"] = []
    heads = [f for f in HEAD_FILES if (folder / f).is_file()]
    if heads:
        note = f"{folder}: prediction head ({', '.join(heads)}) not imported; adapter-zoo loads the adapter only"
        warnings.warn(note, stacklevel=2)
        meta["notes"].append(note)
    cfg = dict(raw["config"])
    if "version" not in raw and cfg.get("non_linearity") in _LEGACY_ACTIVATIONS:
        cfg["non_linearity"] = _LEGACY_ACTIVATIONS[cfg["non_linearity"]]
    state = load_state(weights_file(folder, allow_pickle, WEIGHTS_NAMES))
    for old, new in _LEGACY.items():
        state = {k.replace(f".{old}.", f".{new}."): v for k, v in state.items()}
    where = str(folder / CONFIG_NAME)
    architecture = cfg.get("architecture")
    if architecture is None:
        config = _bottleneck_config(cfg, where)
        return config, _bottleneck_state(state, config, where), meta
    if architecture == "prefix_tuning":
        config, prompt = _prefix(cfg, state, model_config, raw.get("hidden_size"), where)
        return config, {"prompt_embeddings": prompt}, meta
    if architecture == "union":
        configs = cfg.get("configs")
        if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
            raise ZooError(f"{where}: an AdapterHub config union needs a list of config objects, found {configs!r}")
        kinds = [c.get("architecture") for c in configs]
        if sorted(kinds, key=str) != sorted(["prefix_tuning", None], key=str):
            raise ZooError(f"{where}: AdapterHub config union of {kinds} is not supported yet", "only MAM (prefix_tuning + a bottleneck adapter) is")
        from compose.mam.config import MamConfig

        prefix_cfg, bn_cfg = sorted(configs, key=lambda c: c.get("architecture") is None)
        adapter = _bottleneck_config(bn_cfg, where)
        prefix, prompt = _prefix(prefix_cfg, state, model_config, raw.get("hidden_size"), where)
        bottleneck_state = _bottleneck_state({k: v for k, v in state.items() if ".prefix_tunings." not in f".{k}"}, adapter, where)
        return MamConfig(prefix=prefix, adapter=adapter), {"prompt_embeddings": prompt, **bottleneck_state}, meta
    raise ZooError(f"{where}: AdapterHub method {architecture!r} is not supported yet", "supported: bottleneck adapters, prefix_tuning, mam")


def read_adapterhub_fusion(folder: str | Path, allow_pickle: bool = False) -> tuple[FusionConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """
    Read an AdapterHub saved AdapterFusion (`model.save_adapter_fusion`) for `compose.bottleneck.fusion`.

    Returns:
        `(config, state, meta)`: members in AdapterHub's order; state `<layer>.<location>.fusion.{query,key,value}.*`
        (a projection the fusion config turns off is stored as the identity, which computes the same); meta as
        for adapters plus `query_before_ln` and `residual_before`, AdapterHub's placement of the query and residual,
        which `attach_bottleneck_fusion` takes.

    Raises:
        [`ZooError`]: a missing or malformed file, or temperature annealing (`temperature: true`), whose softmax
            temperature changes with every forward pass and so cannot be reproduced.
    """
    import torch

    from compose.fusion.config import FusionConfig

    folder = Path(folder)
    where = folder / FUSION_CONFIG_NAME
    raw = read_json_config(where, FUSION_CONFIG_NAME)
    cfg, members = raw.get("config"), raw.get("adapter_names")
    if not isinstance(cfg, dict) or not isinstance(members, list):
        raise ZooError(f"{where} lacks 'config' or 'adapter_names'", "is this an AdapterHub fusion folder?")
    if cfg.get("temperature"):
        raise ZooError(f"{where}: temperature annealing (temperature: true) is not supported", "its softmax temperature changes on every forward pass")
    options = {"query_before_ln": bool(cfg.get("query_before_ln")), "residual_before": bool(cfg.get("residual_before"))}
    meta = {k: raw.get(k) for k in ("name", "model_type", "model_class", "model_name", "hidden_size", "version")} | options | {"notes": []}
    fields = {"members": members, "regularization": 0.01 if cfg.get("regularization") else 0.0}
    if set(options) <= set(FusionConfig.model_fields):  # once FusionConfig carries AdapterHub's placement
        fields |= options
    config = FusionConfig(**fields)
    state = load_state(weights_file(folder, allow_pickle, FUSION_WEIGHTS_NAMES))
    hidden = raw.get("hidden_size")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _SITE_KEY.match(key)
        owner, sep, param = (match["rest"] if match else "").partition(f"adapter_fusion_layer.{raw.get('name')}.")
        if not match or owner or not sep:
            raise ZooError(f"{folder}: tensor '{key}' is not an AdapterFusion layer of '{raw.get('name')}' at a known site")
        if not param.startswith("dense."):  # AdapterHub builds (and never uses) `dense` when Q, K and V are all off
            grouped.setdefault(f"{match['layer']}.{_SITES[match['site']]}.fusion", {})[param] = tensor
    out = {}
    for path, tensors in grouped.items():
        width = next(iter(tensors.values())).shape[0] if tensors else hidden
        eye, zero = torch.eye(width), torch.zeros(width)
        defaults = {"query.weight": eye, "query.bias": zero, "key.weight": eye, "key.bias": zero, "value.weight": eye}
        out |= {f"{path}.{k}": tensors.get(k, default) for k, default in defaults.items()}
    return config, out, meta


def _bottleneck_config(cfg: dict[str, Any], where: str) -> BottleneckConfig:
    from pydantic import ValidationError

    from compose.bottleneck.config import BottleneckConfig

    if cfg.get("phm_layer"):
        raise ZooError(f"{where}: Compacter (phm_layer) adapters are not supported yet")
    if cfg.get("inv_adapter"):
        raise ZooError(f"{where}: invertible adapters (inv_adapter={cfg['inv_adapter']!r}) are not supported yet", "use an adapter without them (seq_bn, not seq_bn_inv)")
    fields = set(BottleneckConfig.model_fields) - {"method"}
    unknown = sorted(set(cfg) - fields - _BN_TRAINING - {"phm_layer", "inv_adapter"})
    if unknown:
        warnings.warn(f"{where}: ignoring unknown AdapterHub config keys {unknown}", stacklevel=3)
    try:
        return BottleneckConfig(**{k: v for k, v in cfg.items() if k in fields})
    except ValidationError as e:
        from zoo.manifest import validation_message

        raise ZooError(validation_message(e, where)) from None


def _bottleneck_state(state: dict[str, torch.Tensor], config: BottleneckConfig, where: str) -> dict[str, torch.Tensor]:
    """AdapterHub's bottleneck tensors keyed as `compose.bottleneck` takes them."""
    out, names = {}, set()
    for key, tensor in state.items():
        match = _SITE_KEY.match(key)
        adapters, _, rest = (match["rest"] if match else "").partition("adapters.")
        name, _, tensor_name = rest.partition(".")
        if not match or adapters or not tensor_name:
            raise ZooError(f"{where}: tensor '{key}' is not a bottleneck adapter tensor at a known site (cross-attention and invertible adapters are not supported)")
        names.add(name)
        # adapter_down is Sequential([LayerNorm if ln_before,] Linear, activation): the norm is also saved as adapter_norm_before
        head, _, tail = tensor_name.partition(".")
        if head == "adapter_down":
            index, _, param = tail.partition(".")
            tensor_name = f"adapter_norm_before.{param}" if config.ln_before and index == "0" else f"adapter_down.{param}"
        out[f"{match['layer']}.{_SITES[match['site']]}.{tensor_name}"] = tensor
    if len(names) > 1:
        raise ZooError(f"{where}: the weights hold several adapters {sorted(names)}", "save one adapter per folder")
    return out


def _prefix(cfg: dict[str, Any], state: dict[str, torch.Tensor], model_config: Any, hidden: int | None, where: str) -> tuple[PrefixConfig, torch.Tensor]:
    """PrefixConfig + PEFT-layout prompt_embeddings (T, L·2·kv_heads·head_dim) from AdapterHub's prefix pool."""
    import torch
    from pydantic import ValidationError

    from compose.bottleneck.layer import activation
    from compose.prefix.config import PrefixConfig

    if cfg.get("use_gating"):
        raise ZooError(f"{where}: gated prefixes (use_gating, UniPELT) are not supported yet")
    if cfg.get("leave_out"):
        raise ZooError(f"{where}: a prefix with leave_out={cfg['leave_out']} is not supported yet", "the engine prefixes every layer")
    if model_config is None:
        raise ZooError(f"{where}: AdapterHub prefix tuning does not record the attention layout", "pass the base model's folder or config.json: `zoo add --base PATH` (zoo.add(..., base=PATH))")
    mc = model_config if isinstance(model_config, dict) else model_config.to_dict()
    heads = mc.get("num_attention_heads") or mc.get("n_head")
    kv_heads = mc.get("num_key_value_heads") or heads
    layers = mc.get("num_hidden_layers") or mc.get("n_layer")
    hidden = hidden or mc.get("hidden_size") or mc.get("n_embd")
    T = cfg.get("prefix_length", 30)
    for name, value in (("hidden_size", hidden), ("prefix_length", T)):
        if type(value) is not int or value < 1:  # the file is input: a string or a bool here would fail deep in torch
            raise ZooError(f"{where}: {name} {value!r} is not a positive whole number")
    head_dim = mc.get("d_kv") or hidden // heads  # AdapterHub's choice
    pool: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _PREFIX_KEY.search(key)
        if match is None:
            continue
        if match["location"] != "self_prefix":
            raise ZooError(f"{where}: prefix location {match['location']!r} (encoder-decoder) is not supported yet")
        pool[match["tensor"]] = tensor  # every layer holds the same shared pool
    needed = {"control_trans"} if cfg.get("flat") else {"wte.weight", *(f"control_trans.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))}
    if not needed <= pool.keys():
        raise ZooError(f"{where}: the weights lack prefix tensors {sorted(needed - pool.keys())}", "is the weights file this adapter's?")
    width = layers * 2 * kv_heads * head_dim
    linear = lambda x, i: torch.nn.functional.linear(x, pool[f"control_trans.{i}.weight"].float(), pool[f"control_trans.{i}.bias"].float())
    with torch.no_grad():
        if cfg.get("flat"):
            prompt = pool["control_trans"].float().view(T, -1)
        else:  # wte(arange(T)) is wte's weight; then Linear → activation → Linear
            prompt = linear(activation(cfg.get("non_linearity", "tanh"))(linear(pool["wte.weight"].float(), 0)), 2)
    if tuple(prompt.shape) != (T, width):
        raise ZooError(f"{where}: prefix has shape {tuple(prompt.shape)}, expected ({T}, {width}) for {layers} layers × {kv_heads} heads × {head_dim}", "model_config is not the adapter's base model")
    try:
        config = PrefixConfig(
            num_virtual_tokens=T, num_layers=layers, token_dim=kv_heads * head_dim, num_attention_heads=kv_heads,
            prefix_projection=not cfg.get("flat"), encoder_hidden_size=None if cfg.get("flat") else cfg.get("bottleneck_size"), position_offset=False,
        )
    except ValidationError as e:  # e.g. a bottleneck_size that is no size
        from zoo.manifest import validation_message

        raise ZooError(validation_message(e, where)) from None
    return config, prompt.contiguous()
