"""Attach LoRA adapters to any transformers model in place, switch them, and take them off again.

Targeted modules are swapped for a `LoraLayer` wrapping the original (which it keeps as
`base_layer`); `modules_to_save` modules get each adapter's trained copy (`compose.heads`), switched with it.
Base weights an adapter carries (PEFT saves `<module>.base_layer.weight` of the embedding layers it targets:
resized vocabularies, tied heads) replace the model's in place for as long as it is attached, as PEFT's load
does: a parameter tied to another module (an LM head tied to the input embeddings) changes for both.
Everything is checked before the model is touched, so a failed attach leaves it as it was.
The model remembers its adapters (attach order and active list) and the base weights they replaced in
`model._compose_lora`.
"""

from __future__ import annotations

import torch
from torch import nn

from compose.devices import execution_device, offloaded
from compose.errors import CompositionError
from compose.heads import attach_heads, detach_heads, prepare_heads, resolve_module, set_active_heads
from compose.lora.config import LoraConfig
from compose.lora.layer import LoraAdapter, LoraLayer, adapter_dtype, base_features, base_kind
from compose.lora.residual import initial_factors, with_residual
from compose.modules import get_module, replace_module

#: PEFT tensor-name suffixes → LoraAdapter fields.
_LORA_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_B.bias": "lora_bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    # PEFT's LoRA on an nn.Embedding: A (r, vocab), B (dim, r), plain parameters
    ".lora_embedding_A": "embedding_A",
    ".lora_embedding_B": "embedding_B",
}
#: `<module>.base_layer.<name>`: the base module's own tensor, saved with the adapter (PEFT's save_embedding_layers).
BASE_LAYER = ".base_layer."


def attach_lora(model: nn.Module, name: str, config: LoraConfig, state: dict[str, torch.Tensor]) -> None:
    """Attach adapter `name` to `model` in place and make it active alongside the adapters already active.

    Args:
        model: any transformers model (or `nn.Module`), possibly loaded with `dtype`/`device_map` or quantized
            by bitsandbytes. Adapter tensors go to each base layer's device, in fp32 (fp64 over fp64 bases).
        name: the adapter's name, unique on this model.
        config: its hyper-parameters; ranks must agree with the tensors, scaling comes from `config.scaling_for`.
            With `init_lora_weights` 'pissa' / 'olora', B₀, A₀ are computed from the model's weights and the
            adapter runs as the rank-2r LoRA [B, −B₀]·[A; A₀] (`compose.lora.residual`).
        state: tensors keyed relative to the transformers model, i.e. a PEFT safetensors key with the leading
            `base_model.model.` removed: `<module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>.lora_B.bias`
            (lora_bias), `<module>.lora_magnitude_vector` (DoRA), and full tensors of `modules_to_save`
            modules such as `classifier.weight`. Module paths may differ from the model's by its
            `base_model_prefix` (an adapter trained on `XForCausalLM` loaded onto `XModel`, or back).
            LoRA on an `nn.Embedding`: `<module>.lora_embedding_A` (r, vocab) and `<module>.lora_embedding_B`
            (dim, r); base weights it was saved with: `<module>.base_layer.weight`.

    Raises:
        CompositionError: `name` is taken; a module is missing, of an unsupported type, or merged; a tensor's
            shape does not fit its module (a saved embedding of another vocabulary size); the rank disagrees
            with the config; two active adapters would replace the same `modules_to_save` module, or two
            attached adapters carry different weights for one base module.
    """
    registry = _registry(model)
    if name in registry["attached"]:
        raise CompositionError(f"adapter '{name}' is already attached; detach_lora(model, '{name}') first or choose another name")
    if any(isinstance(m, LoraLayer) and m.merged for m in model.modules()):
        raise CompositionError(f"cannot attach adapter '{name}' while LoRA layers are merged; unmerge() them first")
    lora, full = _split_state(state)
    if not lora and not full:
        raise CompositionError(f"adapter '{name}' has no tensors; check that its state dict was loaded")
    targets = [_make_adapter(model, key, tensors, config) for key, tensors in lora.items()]
    heads = prepare_heads(model, name, "LoRA", full)
    carried = _carried_parameters(model, name, targets)

    for path, adapter in targets:
        layer = get_module(model, path)
        if not isinstance(layer, LoraLayer):
            layer = LoraLayer(layer)
            replace_module(model, path, layer)
        layer.add_adapter(name, adapter)
    for param, tensor in carried:
        _replace_base_weight(registry, name, param, tensor)
    attach_heads(model, name, "LoRA", heads, switched=True)
    registry["attached"].append(name)
    set_active_adapters(model, registry["active"] + [name])


def set_active_adapters(model: nn.Module, names: list[str]) -> None:
    """Make exactly `names` active, in that order (their deltas add; `[]` runs the base model).

    Raises:
        CompositionError: a name is not attached, two of them (or one and another method's adapter) replace the
            same `modules_to_save` module, or a layer is merged (unmerge it first).
    """
    registry = _registry(model)
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in registry["attached"]]
    if unknown:
        raise CompositionError(f"adapters {unknown} are not attached; attached: {registry['attached']}")
    layers = [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLayer)]
    for path, m in layers:
        if m.merged:
            raise CompositionError(f"LoRA layer '{path}' is merged; unmerge() it before changing the active adapters")
    set_active_heads(model, names)  # checks every module before it changes any
    for _, m in layers:
        m.set_active(names)
    registry["active"] = names


def detach_lora(model: nn.Module, name: str | None = None) -> nn.Module:
    """Take adapter `name` (None: all adapters) off `model` and return the model.

    Modules left without adapters get their original objects back, so with everything detached
    the model is the one that went in. Merged layers are unmerged first (exact up to float rounding).

    Raises:
        CompositionError: `name` is not attached.
    """
    registry = _registry(model)
    if name is not None and name not in registry["attached"]:
        raise CompositionError(f"adapter '{name}' is not attached; attached: {registry['attached']}")
    names = set(registry["attached"]) if name is None else {name}
    for path, m in list(model.named_modules()):
        if isinstance(m, LoraLayer):
            if m.merged:
                m.unmerge()
            for n in names & set(m.adapters):
                m.remove_adapter(n)
            if not m.adapters:
                replace_module(model, path, m.base_layer)
    retie_weights(model)
    detach_heads(model, names, "LoRA")
    for key, (param, original, holders) in list(registry["replaced"].items()):
        holders -= names
        if not holders:  # no attached adapter carries these weights any more: the model's own come back
            param.data = original
            del registry["replaced"][key]
    registry["attached"] = [n for n in registry["attached"] if n not in names]
    registry["active"] = [n for n in registry["active"] if n not in names]
    return model


def untie_weights(model: nn.Module) -> None:
    """Before a merge: give each LoRA layer with active adapters whose base weight is one parameter with another
    module's (an LM head tied to the input embeddings) a parameter of its own over the same data, so that merging
    changes that module alone and the merged model computes what the unmerged one does. (PEFT's merge_and_unload
    writes into the shared weight, which changes the tied module too.) The model's config stops saying its word
    embeddings are tied, so `save_pretrained` keeps both, until `retie_weights`."""
    registry = _registry(model)
    holders: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        holders[id(param)] = holders.get(id(param), 0) + 1
    for m in model.modules():
        if isinstance(m, LoraLayer) and m.active and not m.merged and holders.get(id(m.base_layer.weight), 0) > 1:
            shared = m.base_layer.weight
            m.base_layer.weight = nn.Parameter(shared.data, requires_grad=shared.requires_grad)
            registry["untied"].append((m, shared))
    configs = [c for c in {id(c): c for c in _configs(model)}.values() if getattr(c, "tie_word_embeddings", False)]
    if registry["untied"] and not registry["tie_configs"]:
        registry["tie_configs"] = configs
        for config in configs:
            config.tie_word_embeddings = False


def retie_weights(model: nn.Module) -> None:
    """Undo `untie_weights` for the layers no longer merged (all of them: the config says tied again)."""
    registry = _registry(model)
    for m, shared in list(registry["untied"]):
        if not m.merged:
            m.base_layer.weight = shared
            registry["untied"].remove((m, shared))
    if not registry["untied"]:
        for config in registry["tie_configs"]:
            config.tie_word_embeddings = True
        registry["tie_configs"] = []


def _configs(model: nn.Module) -> list:
    """The model's transformers config and its text config (where the tie flag lives in multimodal models)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config, text]


def attached_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters attached to `model`, in attach order."""
    return list(_registry(model)["attached"])


def _registry(model: nn.Module) -> dict:
    """`attached` and `active` adapter names; `replaced`: id of a base parameter an adapter's carried weights
    replaced → (the parameter, its original data, the attached adapters carrying it); `untied`: (LoRA layer, the
    tied parameter it had) while merged, and `tie_configs` the configs whose tie flag `untie_weights` cleared."""
    if getattr(model, "_compose_lora", None) is None:
        model._compose_lora = {"attached": [], "active": []}
    for key, empty in (("replaced", dict), ("untied", list), ("tie_configs", list)):
        model._compose_lora.setdefault(key, empty())
    return model._compose_lora


def _split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """LoRA tensors grouped by module path ({path: {field: tensor}}, base weights the adapter carries under
    {"base_weights": {name: tensor}}), and the full (`modules_to_save`) tensors."""
    lora: dict[str, dict] = {}
    full: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            lora.setdefault(key[: -len(suffix)], {})[_LORA_SUFFIXES[suffix]] = tensor
        elif BASE_LAYER in key:
            module, _, field = key.rpartition(BASE_LAYER)
            lora.setdefault(module, {}).setdefault("base_weights", {})[field] = tensor
        elif "lora_" in key:
            raise CompositionError(f"tensor '{key}' is a LoRA tensor this engine does not support (Linear, Conv1D and Embedding targets only)")
        else:
            full[key] = tensor
    return lora, full


def _carried_parameters(model: nn.Module, name: str, targets: list[tuple[str, LoraAdapter]]) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(base parameter, the tensor adapter `name` carries for it), checked against the weights other attached
    adapters put there (a parameter tied to another module is one parameter)."""
    carried, seen = [], {}
    replaced = _registry(model)["replaced"]
    for path, adapter in targets:
        layer = get_module(model, path)
        base = layer.base_layer if isinstance(layer, LoraLayer) else layer
        for field, tensor in adapter.base_weights.items():
            param = getattr(base, field)
            current = replaced[id(param)][0].data if id(param) in replaced else None
            for other in (current, seen.get(id(param))):
                if other is not None and not torch.equal(other, tensor):
                    raise CompositionError(
                        f"adapter '{name}' carries other weights for '{path}.{field}' than the ones already in place "
                        "(another adapter's saved embedding, or a tied module); attach one of them at a time"
                    )
            seen[id(param)] = tensor
            carried.append((param, tensor))
    return carried


def _replace_base_weight(registry: dict, name: str, param: nn.Parameter, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of `param`'s data (kept, to come back when no adapter carries it any more)."""
    entry = registry["replaced"].setdefault(id(param), (param, param.data, set()))
    entry[2].add(name)
    param.data = tensor


def _make_adapter(model: nn.Module, key: str, tensors: dict, config: LoraConfig) -> tuple[str, LoraAdapter]:
    """Check one module's LoRA tensors against the model and build its `LoraAdapter` (model untouched)."""
    path = resolve_module(model, key)
    module = get_module(model, path)
    base = module.base_layer if isinstance(module, LoraLayer) else module
    from compose.ia3.layer import IA3Layer  # here: compose.ia3 builds on this module

    if isinstance(base, IA3Layer):
        raise CompositionError(f"module '{path}' is already scaled by an IA3 adapter; LoRA and IA3 cannot adapt the same module (detach the IA3 adapter, or target other modules)")
    kind = base_kind(base)
    if kind is None:
        raise CompositionError(f"module '{path}' is a {type(base).__name__}; LoRA supports Linear, GPT-2 Conv1D, Embedding and bitsandbytes Linear4bit/Linear8bitLt")
    base_weights = _base_weights(path, base, tensors.pop("base_weights", {}))
    if kind == "embedding" and {"lora_A", "lora_B"} & set(tensors):
        raise CompositionError(f"module '{path}' is an Embedding but the adapter has Linear LoRA tensors (lora_A/lora_B.weight) for it; PEFT saves lora_embedding_A/B there")
    if kind != "embedding" and {"embedding_A", "embedding_B"} & set(tensors):
        raise CompositionError(f"module '{path}' is a {type(base).__name__} but the adapter has embedding LoRA tensors (lora_embedding_A/B) for it; the adapter was trained for a different architecture")
    fields = ("embedding_A", "embedding_B") if kind == "embedding" else ("lora_A", "lora_B")
    missing = set(fields) - set(tensors)
    if missing:
        raise CompositionError(f"module '{key}' lacks {sorted(f.replace('embedding_', 'lora_embedding_') for f in missing)}; the adapter file is incomplete")
    a, b, bias, magnitude = (tensors.get(f) for f in (*fields, "lora_bias", "magnitude"))
    if kind == "embedding" and (bias is not None or magnitude is not None):
        raise CompositionError(f"module '{path}': {'lora_bias' if bias is not None else 'DoRA'} on an Embedding is not supported")
    n_in, n_out = base_features(base)
    r = a.shape[0]
    if a.shape != (r, n_in) or b.shape != (n_out, r):
        raise CompositionError(
            f"module '{path}': lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
            f"{type(base).__name__} (in {n_in}, out {n_out}); expected lora_A (r, {n_in}) and lora_B ({n_out}, r) — "
            "the adapter was trained for a different model"
        )
    if r != config.rank_for(key):
        raise CompositionError(f"module '{path}': the tensors have rank {r} but the config says {config.rank_for(key)} (r / rank_pattern); fix the adapter config")
    if (magnitude is not None) != config.use_dora:
        raise CompositionError(f"module '{path}': use_dora={config.use_dora} but the adapter {'has' if magnitude is not None else 'lacks'} lora_magnitude_vector; fix the adapter config")
    if magnitude is not None and bias is not None:
        raise CompositionError(f"module '{path}': DoRA with lora_bias is not supported (PEFT refuses it too)")
    for field, t in (("lora_B.bias", bias), ("lora_magnitude_vector", magnitude)):
        if t is not None and t.shape != (n_out,):
            raise CompositionError(f"module '{path}': {field} has shape {tuple(t.shape)}, expected ({n_out},) for the base's {n_out} outputs")
    dtype, device = adapter_dtype(base), execution_device(base)  # an offloaded base's weight is on meta
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    # patterns (rank/alpha) name modules as the adapter was trained, so match on `key`, not `path`
    scaling = config.scaling_for(key)
    a, b = cast(a), cast(b)
    # PEFT initialises embeddings plainly, and a base weight saved with the adapter is the residual already
    residual = config.init_lora_weights is not None and kind != "embedding" and "weight" not in base_weights
    if residual:
        if kind not in ("linear", "conv1d"):
            raise CompositionError(f"module '{path}': a {config.init_lora_weights} adapter on a quantized base (PEFT trains those on the residual of the full-precision weight); load the base unquantized")
        if offloaded(base):
            raise CompositionError(f"module '{path}': a {config.init_lora_weights} adapter needs the base weight to compute its initial factors, and accelerate offloaded it; load the base without offloading that module")
        a, b = with_residual(a, b, *initial_factors(base.weight, config.init_lora_weights, r, scaling, transposed=kind == "conv1d"))
    return path, LoraAdapter(a, b, scaling, cast(bias), cast(magnitude), residual=residual, base_weights=base_weights)


def _base_weights(path: str, base: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base module's tensors an adapter carries, checked against the module's and cast to its dtype and device."""
    own = dict(base.named_parameters(recurse=False))
    out = {}
    for field, tensor in tensors.items():
        if field not in own:
            raise CompositionError(f"the adapter carries '{path}.base_layer.{field}' but {type(base).__name__} '{path}' has no parameter '{field}'; the adapter was trained for a different architecture")
        if tensor.shape != own[field].shape:
            hint = (f"it was trained with a resized vocabulary: resize the model's token embeddings (model.resize_token_embeddings({tensor.shape[0]})) and pass the model"
                    if base_kind(base) == "embedding" or tensor.shape[1:] == own[field].shape[1:] else "the adapter was trained for a different model")
            raise CompositionError(f"the adapter carries '{path}.{field}' of shape {tuple(tensor.shape)} but the model's is {tuple(own[field].shape)}; {hint}")
        if base_kind(base) in ("bnb4", "bnb8") or offloaded(base):
            what = "a quantized layer; load the base unquantized" if not offloaded(base) else "a layer accelerate offloaded (it would load its own weights over them); load the base without offloading that module"
            raise CompositionError(f"the adapter carries '{path}.{field}' for {what}")
        out[field] = tensor.to(device=own[field].device, dtype=own[field].dtype)
    return out
