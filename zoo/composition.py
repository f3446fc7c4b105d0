"""Compositions: several registered adapters made to act as one, and registered as a new entry.

- `stack`: the adapters act together, their outputs add (an entry listing the members).
- `weighted`: one new LoRA adapter, Σ wᵢ·sᵢ·BᵢAᵢ by `cat`/`svd` or peft's factor-wise methods,
  written in PEFT format (loadable by peft and vLLM).
- `attention`: an AdapterFusion layer per adapted module, optionally trained on JSONL data.

The math is in `compose`; this module resolves names, checks that the members fit, and registers.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from inspect import signature
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from compose.errors import CompositionError
from compose.lora.config import LoraConfig
from compose.methods import check_composition
from zoo.api import PathLike, open_registry, open_store, register, register_folder
from zoo.errors import ZooError
from zoo.formats import peft as peft_format
from zoo.loading import FUSION_WEIGHTS, ResolvedAdapter, resolve
from zoo.manifest import BaseModelRef, CompositionManifest, MemberRef, Manifest, SizeInfo, Source, check_name

if TYPE_CHECKING:
    import torch

FUSIONS = ("stack", "weighted", "attention")
#: What each fusion takes beyond name, task and tags: any other option given is refused, never ignored.
FUSION_OPTIONS = {
    "stack": (),
    "weighted": ("weights", "method", "rank", "density", "seed"),
    "attention": ("base", "train", "epochs", "lr", "batch_size", "drop_train", "prune_below", "temperature", "seed"),
}
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def _modules(adapter: ResolvedAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A, B)} of one adapter."""
    return {k.removesuffix(".lora_A.weight"): (v, adapter.state[k.removesuffix("A.weight") + "B.weight"]) for k, v in adapter.state.items() if k.endswith(".lora_A.weight")}


def as_lora(adapter: ResolvedAdapter) -> ResolvedAdapter:
    """An AdaLoRA adapter as the LoRA adapter that computes the same (other methods unchanged)."""
    if adapter.config.method != "adalora":
        return adapter
    from dataclasses import replace

    from compose.adalora.model import adalora_to_lora

    config, state = adalora_to_lora(adapter.config, adapter.state)
    return replace(adapter, config=config, state=state)


def check_members(adapters: list[ResolvedAdapter]) -> None:
    """Members must share the base model and agree on every module they both adapt (in/out features)."""
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1:
        raise ZooError(f"the adapters were trained on different base models: {sorted(bases)}", "compose adapters of one base")
    seen: dict[str, tuple[str, int, int]] = {}
    for adapter in adapters:
        for module, (A, B) in _modules(adapter).items():
            shape = (A.shape[1], B.shape[0])
            if module in seen and seen[module][1:] != shape:
                other, n_in, n_out = seen[module]
                raise ZooError(
                    f"{adapter.name} and {other} disagree on module {module}: in/out {shape[0]}/{shape[1]} vs {n_in}/{n_out}",
                    "they were trained on different architectures",
                )
            seen.setdefault(module, (adapter.name, *shape))


def check_finite(**values: float | Iterable[float] | None) -> None:
    """Refuse NaN and ±Infinity among numeric options (a number or a list of them; None: not given)."""
    for option, value in values.items():
        numbers = [] if value is None else [value] if isinstance(value, (int, float)) else list(value)
        if not all(math.isfinite(x) for x in numbers):
            raise ZooError(f"{option} {value} holds a number that is not finite", f"give {option} as finite numbers, e.g. 0.7,0.3" if option == "weights" else f"give {option} a finite number")


def combine_adapters(
    adapters: list[ResolvedAdapter], weights: Iterable[float] | None, *, method: str | None = None, rank: int | None = None,
    density: float | None = None, seed: int = 0, name: str = "weighted",
) -> ResolvedAdapter:
    """One adapter computing the weighted combination of `adapters`: IA3 adapters give one IA3 vector set
    (l = Σ wᵢ·lᵢ, peft's rule); LoRA and AdaLoRA adapters one LoRA, module by module.

    Each module combines the adapters that target it; the svd methods' `rank` defaults to the largest
    rank among them (peft's `svd_rank` default). The LoRA result has scaling 1 everywhere
    (lora_alpha = r, per-module rank/alpha patterns where ranks differ), as peft's
    `add_weighted_adapter` writes it — but without peft's rsLoRA slip (#3761).
    """
    import torch

    from compose.lora.weighted import SVD_METHODS, LoraFactors, combine

    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    check_finite(weights=weights, density=density)
    if len(weights) != len(adapters):
        raise ZooError(f"{len(weights)} weights for {len(adapters)} adapters", "give one weight per adapter")
    check_composition([(a.name, a.config.method) for a in adapters], fusion="weighted")
    if adapters[0].config.method == "ia3":
        if method not in (None, "linear") or rank is not None or density is not None:
            raise ZooError("IA3 vectors combine linearly (l = Σ wᵢ·lᵢ, peft's rule)", "drop method/rank/density for IA3 adapters")
        return _combine_ia3(adapters, weights, name)
    method = method or "svd"
    if rank is not None and rank < 1:
        raise ZooError(f"--rank (rank=) must be positive, got {rank}", "leave it out for the members' largest rank")
    adapters = [as_lora(a) for a in adapters]
    check_members(adapters)
    for a in adapters:
        other = next((k for k in a.state if not k.endswith(_FACTOR_SUFFIXES)), None)  # e.g. LoRA on an embedding
        if a.config.use_dora or a.config.modules_to_save or a.config.lora_bias or a.config.init_lora_weights or other:
            feature = ("DoRA" if a.config.use_dora else "modules_to_save" if a.config.modules_to_save else "lora_bias" if a.config.lora_bias
                       else f"{a.config.init_lora_weights} (trained on a residual base)" if a.config.init_lora_weights else f"tensor {other!r}")
            raise ZooError(f"{a.name} uses {feature}, which a weighted sum of LoRA factors cannot express", "stack it instead")
    if len({a.config.fan_in_fan_out for a in adapters}) > 1:
        raise ZooError("the adapters disagree on fan_in_fan_out", "compose adapters of one base")
    generator = torch.Generator().manual_seed(seed)
    per_adapter = [_modules(a) for a in adapters]
    modules = list(dict.fromkeys(m for mods in per_adapter for m in mods))
    state, ranks, capped = {}, {}, {}
    for module in modules:
        present = [(i, mods[module]) for i, mods in enumerate(per_adapter) if module in mods]
        factors = [LoraFactors(A, B, adapters[i].config.scaling_for(module)) for i, (A, B) in present]
        module_rank = max(f.A.shape[0] for f in factors) if rank is None and method in SVD_METHODS else rank  # peft's svd_rank default
        width = min(present[0][1][0].shape[1], present[0][1][1].shape[0])  # min(in, out): no rank above it adds anything
        if rank is not None and rank > width:
            capped[module] = width  # rather than rows of zeros (rank 10⁶ on a 64-wide module: megabytes of them)
        try:
            A, B = combine(factors, [weights[i] for i, _ in present], method, rank=capped.get(module, module_rank), density=density, generator=generator)
        except CompositionError as e:
            raise ZooError(f"module {module} ({', '.join(adapters[i].name for i, _ in present)}): {e}") from None
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = A, B
        ranks[module] = A.shape[0]
    if capped:
        widths = sorted(set(capped.values()))
        warnings.warn(f"rank {rank} is above the width of {len(capped)} module(s); capped to their width ({', '.join(map(str, widths))})", stacklevel=2)
    config = LoraConfig.at_scaling_one(
        ranks, fan_in_fan_out=adapters[0].config.fan_in_fan_out, target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
    )
    return ResolvedAdapter(name, config, state, *_identity(adapters))


def _identity(adapters: list[ResolvedAdapter]) -> tuple[str | None, str | None, str | None]:
    """(task type, architecture, base) of a combination: each from the first member that records it."""
    return tuple(next((getattr(a, f) for a in adapters if getattr(a, f)), None) for f in ("task_type", "architecture", "base_model"))


def _combine_ia3(adapters: list[ResolvedAdapter], weights: list[float], name: str) -> ResolvedAdapter:
    from compose.ia3.config import combine_ia3_configs
    from compose.ia3.model import combine_ia3

    try:
        state = combine_ia3([a.state for a in adapters], weights)
        config = combine_ia3_configs([a.config for a in adapters])
    except CompositionError as e:
        raise ZooError(f"{'+'.join(a.name for a in adapters)}: {e}") from None
    return ResolvedAdapter(name, config, state, *_identity(adapters))


def _members(adapters: list[ResolvedAdapter]) -> list[MemberRef]:
    refs = []
    for a in adapters:
        if a.manifest is None:
            raise ZooError(f"{a.name} is a folder, not a registered adapter", "`zoo add` it first, then compose by name")
        weights = a.manifest.weights
        refs.append(MemberRef(name=a.manifest.name, version=a.manifest.version, sha256=weights.sha256))
    return refs


def _base_ref(adapters: list[ResolvedAdapter]) -> BaseModelRef:
    """The members' base, each field from the first member that records it: a composition keeps the class
    (e.g. LlamaForCausalLM, not the headless LlamaModel) and model type its members were trained on."""
    refs = [a.manifest.base_model for a in adapters if a.manifest]
    return BaseModelRef(**{field: next((getattr(r, field) for r in refs if getattr(r, field)), None) for field in BaseModelRef.model_fields})


def compose(
    adapters: str | Iterable[str],
    *,
    fusion: str,
    name: str,
    weights: Iterable[float] | None = None,
    method: str | None = None,
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    base: PathLike | None = None,
    train: PathLike | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 16,
    drop_train: bool = False,
    prune_below: float | None = None,
    temperature: float = 1.0,
    progress: bool = False,
    task: str | None = None,
    tags: Iterable[str] = (),
    registry: PathLike | None = None,
) -> Manifest:
    """Compose registered adapters into a new registry entry named `name`.

    Example:
        >>> zoo.compose("sql+chat", fusion="weighted", weights=[0.7, 0.3], method="svd", rank=16, name="sql-chat")  # doctest: +SKIP
    """
    check_name(name)
    check_finite(density=density, lr=lr, prune_below=prune_below, temperature=temperature)
    if fusion not in FUSIONS:
        raise ZooError(f"unknown fusion {fusion!r}", f"use one of {', '.join(FUSIONS)}")
    if not -(2**63) <= seed < 2**63:  # what torch's generators and the registry's integers hold
        raise ZooError(f"--seed {seed} is out of range", "give a seed between -2**63 and 2**63 - 1")
    given = dict(weights=weights, method=method, rank=rank, density=density, seed=seed, base=base, train=train, epochs=epochs, lr=lr,
                 batch_size=batch_size, drop_train=drop_train, prune_below=prune_below, temperature=temperature)
    defaults = {k: p.default for k, p in signature(compose).parameters.items()}
    if stray := [option for option, value in given.items() if value != defaults[option] and option not in FUSION_OPTIONS[fusion]]:
        takers = [f for f in FUSIONS if stray[0] in FUSION_OPTIONS[f]]
        raise ZooError(f"--{stray[0].replace('_', '-')} ({stray[0]}=) does not apply to --fusion {fusion}", f"drop it, or use --fusion {takers[0]}")
    if open_registry(registry).versions(name):
        raise ZooError(f"an adapter named {name!r} already exists", "pick another --name, or `zoo remove` it first")
    resolved = resolve(adapters, registry=registry)
    if resolved.fusion:
        raise ZooError("a fusion cannot be a member of another composition", "compose its members instead")
    members = resolved.adapters
    refs = _members(members)
    check_composition([(a.name, a.config.method) for a in members], fusion=fusion)
    if len(members) < 2:
        raise ZooError("a composition needs at least two adapters", "write a+b")
    check_members(members)
    recipe: dict[str, Any] = {"fusion": fusion}
    if fusion == "weighted":
        combined = combine_adapters(members, weights, method=method, rank=rank, density=density, seed=seed, name=name)
        recipe |= {"method": method or ("linear" if members[0].config.method == "ia3" else "svd"), "weights": list(weights) if weights is not None else None, "rank": rank, "density": density, "seed": seed}
        with tempfile.TemporaryDirectory() as work:
            folder = peft_format.save_adapter(Path(work) / name, combined.config, combined.state, base_model=combined.base_model, task_type=combined.task_type)
            source = Source(kind="composition", members=refs, recipe=recipe)
            return register_folder(folder, name=name, source=source, task=task, tags=tags, base_model=_base_ref(members), registry=registry)
    size = SizeInfo(trainable_params=sum(a.manifest.size.trainable_params for a in members), bytes=sum(a.manifest.size.bytes for a in members))
    common = dict(name=name, members=refs, base_model=_base_ref(members), task=task, tags=sorted(set(tags)))
    if fusion == "stack":
        return register(CompositionManifest(fusion="stack", size=size, files=[], source=Source(kind="composition", members=refs, recipe=recipe), **common), registry=registry)
    from zoo.fusion_training import build_fusion

    config, state = build_fusion(
        members, base=base, train=train, epochs=epochs, lr=lr, batch_size=batch_size, drop_train=drop_train,
        prune_below=prune_below, temperature=temperature, seed=seed, progress=progress,
    )
    kept = [r for r in refs if r.name in config.members]
    recipe |= {"train": str(train) if train else None, "epochs": epochs, "lr": lr, "drop_train": drop_train, "prune_below": prune_below, "seed": seed}
    from zoo.api import measure_tensors
    from zoo.gc import adding

    with adding(open_store()):  # a concurrent `zoo gc` keeps the blob until the entry is in
        entry = _store_fusion_weights(state)
        manifest = CompositionManifest(
            fusion="attention", fusion_config=config, size=measure_tensors(open_store().blob_path(entry.sha256)), files=[entry],
            source=Source(kind="composition", members=kept, recipe=recipe), **(common | {"members": kept}),
        )
        return register(manifest, registry=registry)


def _store_fusion_weights(state: dict[str, torch.Tensor]):
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / FUSION_WEIGHTS
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path, metadata={"format": "pt"})
        return open_store().put(path, FUSION_WEIGHTS)


def register_fusion_folder(
    folder: Path, *, name: str, source: Source, task: str | None = None, tags: Iterable[str] = (),
    allow_pickle: bool = False, staged: bool = False, registry: PathLike | None = None,
) -> CompositionManifest:
    """Register an AdapterHub AdapterFusion folder (`adapter_fusion_config.json` + weights) over members
    already in the registry under the names the fusion lists; its files are stored as they are.
    `staged`: `folder` is a `Store.staging()` folder, whose files are moved into the store, not copied."""
    from zoo.api import measure_tensors
    from zoo.formats.adapterhub import FUSION_CONFIG_NAME, FUSION_WEIGHTS_NAMES, read_adapterhub_fusion
    from zoo.formats.peft import weights_file
    from zoo.formats.tensor_values import check_tensor_values

    check_name(name)
    config, _, meta = read_adapterhub_fusion(folder, allow_pickle=allow_pickle)
    reg = open_registry(registry)
    missing = [m for m in config.members if not reg.versions(m)]
    if missing:
        raise ZooError(f"{folder}: the fusion's members {missing} are not in the registry", "`zoo add` each member adapter under the name the fusion lists first")
    members = [reg.resolve(m) for m in config.members]
    weights = weights_file(folder, allow_pickle, FUSION_WEIGHTS_NAMES)
    from zoo.gc import adding

    with tempfile.TemporaryDirectory() as work, adding(open_store()):  # a concurrent `zoo gc` keeps the blobs until the entry is in
        if weights.suffix == ".bin":  # stored as safetensors, like adapters' pickles
            from safetensors.torch import save_file

            state = peft_format.load_pickle_state(weights)
            weights = Path(work) / FUSION_WEIGHTS_NAMES[0]
            save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, weights, metadata={"format": "pt"})
        check_tensor_values(weights)  # as for an adapter: no NaN, ±Inf or integer weights
        store = open_store()
        files = [store.put(folder / FUSION_CONFIG_NAME, FUSION_CONFIG_NAME, move=staged),
                 store.put(weights, FUSION_WEIGHTS_NAMES[0], move=staged and weights.parent == folder)]
        refs = [MemberRef(name=m.name, version=m.version, sha256=m.weights.sha256) for m in members]
        manifest = CompositionManifest(
            name=name, fusion="attention", fusion_config=config, format="adapterhub", members=refs, base_model=members[0].base_model,
            size=measure_tensors(store.blob_path(files[1].sha256)), files=files, source=source,
            task=task, tags=sorted(set(tags)),
        )
        return register(manifest, registry=registry)
