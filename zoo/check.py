"""`zoo check`: what a serving runtime would refuse or silently ignore in an adapter, rule by rule, with the fix.

Runtimes and their rules (from their source; see docs/runtimes.md):

- vllm: LoRA only; refuses non-empty `modules_to_save`, DoRA, a LoRA bias, ranks above `--max-lora-rank`
  (one of 8…512, default 16), and modules its model has no Linear for; scales every module by
  lora_alpha / r (√r with rsLoRA), so per-module rank/alpha patterns are silently ignored; a module whose
  path is not in the model is dropped, and an adapter of only such modules serves the bare base.
- llama.cpp: a GGUF written by `convert_lora_to_gguf.py` from a PEFT LoRA and the base's config: only
  lora_A/lora_B pairs, for architectures it maps, for modules that have a GGUF tensor; rsLoRA and
  alpha_pattern are silently dropped by that converter (`zoo export --to gguf` keeps them).
- peft: a PEFT-format folder whose modules exist in the base.

Status of each finding: `refused` (the runtime errors), `ignored` (it serves something else without a
word), `export` (the stored folder would be refused or misread, and `zoo export` writes it so it is not),
`setting` (a server option is needed), `ok`. An adapter is ready when nothing is refused or ignored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from zoo.api import PathLike
from zoo.errors import ZooError

if TYPE_CHECKING:
    from rich.console import Console

    from zoo.loading import ResolvedAdapter

RUNTIMES = ("vllm", "llama.cpp", "peft")
#: vLLM's allowed --max-lora-rank values, and its default.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
Status = Literal["refused", "ignored", "export", "setting", "ok"]


@dataclass
class Finding:
    """One rule's verdict: what the runtime does with this adapter, and how to fix it."""

    rule: str
    status: Status
    message: str
    fix: str | None = None


@dataclass
class CheckReport:
    """Every rule of one runtime applied to one adapter."""

    adapter: str
    runtime: str
    base: str | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Nothing refused or silently ignored (settings and `zoo export` fixes may still be needed)."""
        return not any(f.status in ("refused", "ignored") for f in self.findings)

    def to_json(self) -> dict:
        return {**asdict(self), "ready": self.ready}


def check(adapter: str, *, runtime: str, base: PathLike | None = None, registry: PathLike | None = None) -> CheckReport:
    """
    What `runtime` ('vllm', 'llama.cpp' or 'peft') would refuse or silently ignore in `adapter`.

    Args:
        adapter: a registered NAME[@VERSION] or an adapter folder.
        runtime: where it is going.
        base: the base's config.json or a folder holding it: tells which modules exist (required for
            llama.cpp, whose tensor names depend on the architecture).

    Returns:
        A `CheckReport`: one `Finding` per rule (status, message, fix); `.ready` when nothing is refused or ignored.

    Example:
        >>> zoo.check("llama-sql", runtime="vllm", base="Llama-3.2-1B").ready  # doctest: +SKIP
    """
    if runtime not in RUNTIMES:
        raise ZooError(f"unknown runtime {runtime!r}", f"use one of {', '.join(RUNTIMES)}")
    if runtime == "llama.cpp" and base is None:
        raise ZooError("llama.cpp's tensor names depend on the base's architecture", "pass --base with the base's config.json or folder")
    resolved = one_adapter(adapter, registry=registry)
    report = CheckReport(adapter=adapter, runtime=runtime, base=None if base is None else str(base))
    rules = {"vllm": _vllm, "llama.cpp": _llama_cpp, "peft": _peft}[runtime]
    report.findings = rules(resolved, base)
    bad = non_finite_tensor(resolved)
    report.findings.append(Finding("finite", "refused", f"tensor {bad} holds NaN or ±Inf", "retrain or re-download the adapter")
                           if bad else Finding("finite", "ok", "every weight is a finite number"))
    return report


def non_finite_tensor(adapter: ResolvedAdapter) -> str | None:
    """The name of the first of `adapter`'s floating-point tensors that holds NaN or ±Inf, None if none does."""
    import torch

    return next((k for k, v in sorted(adapter.state.items()) if v.is_floating_point() and not torch.isfinite(v).all()), None)


def one_adapter(ref: str, *, registry: PathLike | None = None) -> ResolvedAdapter:
    """The single adapter `ref` names (a registered name or a folder); compositions of several are refused."""
    from zoo.loading import resolve

    resolved = resolve(ref, registry=registry)
    if resolved.fusion or len(resolved.adapters) != 1:
        raise ZooError(f"{ref} is a composition of {len(resolved.adapters)} adapters, not one adapter",
                       "check or export its members, or a weighted composition (`zoo compose --fusion weighted`)")
    return resolved.adapters[0]


def lora_modules(adapter: ResolvedAdapter) -> dict[str, tuple]:
    """{module path: (A, B, scaling)} of a LoRA or AdaLoRA adapter (AdaLoRA as the LoRA that computes the same)."""
    from zoo.composition import as_lora

    lora = as_lora(adapter)
    state = lora.state
    return {k.removesuffix(".lora_A.weight"): (v, state[k.removesuffix("A.weight") + "B.weight"], lora.config.scaling_for(k.removesuffix(".lora_A.weight")))
            for k, v in state.items() if k.endswith(".lora_A.weight")}


# ---- rules shared by the runtimes --------------------------------------------------------------------


def _method(adapter: ResolvedAdapter, runtime: str) -> Finding:
    method = adapter.config.method
    if method == "lora":
        return Finding("method", "ok", "LoRA")
    if method == "adalora":
        return Finding("method", "export", f"AdaLoRA: {runtime} reads LoRA factors only (its lora_E tensors are refused)",
                       f"`zoo export {adapter.name} --to {'gguf' if runtime == 'llama.cpp' else 'peft'}` writes the LoRA that computes the same")
    return Finding("method", "refused", f"{method}: {runtime} serves LoRA adapters only", "no LoRA form exists for this method; serve it with zoo.load")


def _lora_features(adapter: ResolvedAdapter, runtime: str) -> list[Finding]:
    """modules_to_save, DoRA, LoRA bias: what neither vLLM nor llama.cpp can take."""
    config = adapter.config
    out = []
    saved = getattr(config, "modules_to_save", None) or [k for k in adapter.state if "lora_" not in k]  # or base weights saved with it
    out.append(Finding("modules_to_save", "refused", f"modules_to_save {saved[:3]}{' …' if len(saved) > 3 else ''}: {runtime} takes no full module copies",
                       "retrain with those modules frozen (e.g. no new tokens), or serve it with zoo.load / PEFT")
               if saved else Finding("modules_to_save", "ok", "none"))
    embedding = sorted({k.rsplit(".", 1)[0] for k in adapter.state if ".lora_embedding_" in k})
    if embedding:
        out.append(Finding("embeddings", "refused", f"LoRA on embeddings ({embedding[0]}): zoo export writes Linear LoRA factors only",
                           "serve it with zoo.load / PEFT, or retrain without embedding targets"))
    init = getattr(config, "init_lora_weights", None)
    if init:
        out.append(Finding("residual", "ignored", f"{init}: trained on the residual W − s·B₀·A₀, but {runtime} adds the factors to W itself",
                           "save it converted to a plain rank-2r LoRA (PEFT: save_pretrained(path_initial_model_for_weight_conversion=...))"))
    dora = getattr(config, "use_dora", False)
    out.append(Finding("dora", "refused", f"DoRA (lora_magnitude_vector): {runtime} does not support it",
                       f"merge it into the base (zoo.load(base, '{adapter.name}', merge=True).save_pretrained(out)) and serve that model")
               if dora else Finding("dora", "ok", "plain LoRA"))
    bias = getattr(config, "lora_bias", False)
    out.append(Finding("bias", "refused", f"lora_bias: {runtime} has no LoRA bias", "retrain with lora_bias=False and bias='none'")
               if bias else Finding("bias", "ok", "bias='none'"))
    return out


def _base_modules(base: PathLike) -> tuple[set[str], dict[str, str], str]:
    """(Linear/Conv1D module paths, other module paths → type, a label) of the base, from its config."""
    from zoo.estimate import _architecture, _config_path

    path = _config_path(base)
    arch = _architecture(path)
    return {m.name for m in arch.linears}, arch.unsupported, str(path)


def _targets(adapter: ResolvedAdapter, base: PathLike | None, runtime: str, unknown_suffix: Status) -> list[Finding]:
    """Adapter modules against the base's: missing paths are dropped; all missing serves the bare base."""
    if base is None:
        return [Finding("targets", "ok", "not checked (pass --base to check the modules against the base)")]
    linears, others, where = _base_modules(base)
    prefixes = sorted({n.partition(".")[0] for n in linears | set(others)})
    # an adapter of XForCausalLM ('model.layers…') checked against XModel ('layers…'), or the other way round
    modules = sorted(next((c for c in (m, m.partition(".")[2], *(f"{p}.{m}" for p in prefixes)) if c in linears or c in others), m)
                     for m in _module_paths(adapter))
    suffixes = {m.rsplit(".", 1)[-1] for m in linears}
    not_linear = [m for m in modules if m in others]
    unknown = [m for m in modules if m not in linears and m not in others and m.rsplit(".", 1)[-1] not in suffixes]
    absent = [m for m in modules if m not in linears and m not in others and m not in unknown]
    out = []
    if not_linear:
        out.append(Finding("targets", "refused", f"{len(not_linear)} module(s) are not Linear layers, e.g. {not_linear[0]} ({others[not_linear[0]]})",
                           "LoRA on embeddings/norms is not served; retrain with Linear targets"))
    if unknown:
        out.append(Finding("targets", unknown_suffix, f"{len(unknown)} module(s) have a name the base has no Linear for, e.g. {unknown[0]} "
                           f"({'an unsupported LoRA weight' if unknown_suffix == 'refused' else 'dropped'})", "the adapter was trained for another model"))
    if absent and len(absent) + len(unknown) + len(not_linear) == len(modules):
        out.append(Finding("targets", "ignored", f"no module path matches {where}: {runtime} would serve the bare base (e.g. {absent[0]})",
                           "pass the base the adapter was trained on"))
    elif absent:
        out.append(Finding("targets", "ignored", f"{len(absent)} of {len(modules)} module(s) are not in the base and are dropped, e.g. {absent[0]}",
                           "pass the base the adapter was trained on"))
    if not out:
        out.append(Finding("targets", "ok", f"all {len(modules)} module(s) are Linear layers of the base"))
    return out


def _module_paths(adapter: ResolvedAdapter) -> set[str]:
    suffixes = (".lora_A.weight", ".lora_B.weight", ".lora_E", ".lora_magnitude_vector", ".lora_B.bias", ".ia3_l")
    paths = set()
    for key in adapter.state:
        for s in suffixes:
            if key.endswith(s):
                paths.add(key.removesuffix(s))
    return paths


# ---- per runtime -------------------------------------------------------------------------------------


def _vllm(adapter: ResolvedAdapter, base: PathLike | None) -> list[Finding]:
    method = _method(adapter, "vLLM")
    if method.status == "refused":
        return [method]
    out = [method, *_lora_features(adapter, "vLLM")]
    modules = lora_modules(adapter)
    rank = max(A.shape[0] for A, _, _ in modules.values())
    allowed = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    if not allowed:
        out.append(Finding("rank", "refused", f"rank {rank}: above vLLM's largest max_lora_rank ({VLLM_MAX_LORA_RANKS[-1]})",
                           f"`zoo resize {adapter.name} --rank {VLLM_MAX_LORA_RANKS[-1]} --name {adapter.name}-r{VLLM_MAX_LORA_RANKS[-1]}`"))
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        lower = max((r for r in VLLM_MAX_LORA_RANKS if r < rank), default=None)
        resize = f" — or `zoo resize {adapter.name} --rank {lower} --name {adapter.name}-r{lower}`" if lower else ""
        out.append(Finding("rank", "setting", f"rank {rank}: vLLM needs max_lora_rank ≥ {allowed[0]} (default {VLLM_DEFAULT_MAX_LORA_RANK})",
                           f"start vLLM with --max-lora-rank {allowed[0]}{resize}"))
    else:
        out.append(Finding("rank", "ok", f"rank {rank} ≤ vLLM's default max_lora_rank {VLLM_DEFAULT_MAX_LORA_RANK}"))
    out.append(_uniform_scaling(adapter, modules))
    out += _targets(adapter, base, "vLLM", "refused")
    return out


def _uniform_scaling(adapter: ResolvedAdapter, modules: dict[str, tuple]) -> Finding:
    """vLLM scales every module by lora_alpha / r (√r with rsLoRA): per-module patterns are lost."""
    config = adapter.config
    if config.method != "lora":
        return Finding("scaling", "ok", "written uniform by `zoo export`")
    vllm_scaling = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    differ = [m for m, (_, _, s) in modules.items() if not math.isclose(s, vllm_scaling, rel_tol=1e-6)]
    ranks = {A.shape[0] for A, _, _ in modules.values()}
    if not differ and len(ranks) == 1:
        return Finding("scaling", "ok", f"one scaling {vllm_scaling:g} and rank for every module")
    what = f"{len(differ)} module(s) scale other than lora_alpha/r = {vllm_scaling:g}" if differ else f"ranks differ per module ({sorted(ranks)})"
    return Finding("scaling", "export", f"rank_pattern/alpha_pattern: vLLM ignores them; {what}",
                   f"`zoo export {adapter.name} --to peft --out DIR` folds each module's scaling into lora_B at one rank")


def _llama_cpp(adapter: ResolvedAdapter, base: PathLike) -> list[Finding]:
    from zoo.estimate import _config_path
    from zoo.formats.base_config import check_base_config
    from zoo.formats.gguf import GgufBase
    from zoo.formats.peft import read_json_config

    method = _method(adapter, "llama.cpp")
    if method.status == "refused":
        return [method]
    out = [method, *_lora_features(adapter, "llama.cpp")]
    config_path = _config_path(base)
    config = read_json_config(config_path, "config.json")  # unreadable or malformed: an error, not a finding
    check_base_config(config, str(config_path))
    try:
        gguf_base = GgufBase.from_config(config, str(config_path))
    except ZooError as e:
        return [*out, Finding("architecture", "refused", e.message, e.hint)]
    out.append(Finding("architecture", "ok", f"{gguf_base.architecture} → GGUF {gguf_base.gguf_arch}"
                       + (" (q/k rows permuted for RoPE)" if gguf_base.permute_qk else "")))
    modules = lora_modules(adapter)
    unmapped = [m for m in modules if gguf_base.tensor_name(m) is None]
    if unmapped:
        out.append(Finding("targets", "refused", f"{len(unmapped)} module(s) have no llama.cpp tensor, e.g. {unmapped[0]}",
                           "retrain with targets llama.cpp's graph has (attention and MLP projections)"))
    elif any(m.endswith("lm_head") for m in modules) and gguf_base.tied_embeddings:
        out.append(Finding("targets", "refused", "lm_head on a base with tied embeddings: llama.cpp has no separate output tensor",
                           "retrain without lm_head in target_modules"))
    else:
        out.append(Finding("targets", "ok", f"all {len(modules)} module(s) map to GGUF tensors"))
    config = adapter.config
    dropped = [k for k, on in (("use_rslora", getattr(config, "use_rslora", False)), ("alpha_pattern", getattr(config, "alpha_pattern", None))) if on]
    if dropped:
        out.append(Finding("scaling", "export", f"{' and '.join(dropped)}: convert_lora_to_gguf.py drops {'them' if len(dropped) > 1 else 'it'} (llama.cpp scales by alpha/rank)",
                           f"`zoo export {adapter.name} --to gguf` folds the true scaling into lora_b"))
    else:
        out.append(Finding("scaling", "ok", "llama.cpp's alpha/rank is the adapter's scaling"))
    return out


def _peft(adapter: ResolvedAdapter, base: PathLike | None) -> list[Finding]:
    manifest = adapter.manifest
    fmt = manifest.format if manifest is not None else "peft"
    out = [Finding("format", "refused", f"stored in AdapterHub's layout: PEFT cannot load a {adapter.config.method} adapter from it",
                   "load it with zoo.load or AdapterHub's adapters library")
           if fmt != "peft" else Finding("format", "ok", "a PEFT folder")]
    return out + _targets(adapter, base, "PEFT", "refused")


def render_check(report: CheckReport, console: Console) -> None:
    """One line per rule, fixes indented under it, then the verdict (fits 80 columns)."""
    from rich.table import Table

    table = Table(title=f"{report.adapter} → {report.runtime}" + (f" (base {report.base})" if report.base else ""), show_lines=False)
    table.add_column("status", no_wrap=True)
    table.add_column("rule", no_wrap=True)
    table.add_column("finding / fix", overflow="fold")
    for f in report.findings:
        table.add_row(f.status, f.rule, f.message + (f"\n→ {f.fix}" if f.fix and f.status != "ok" else ""))
    console.print(table)
    blocking = [f for f in report.findings if f.status in ("refused", "ignored")]
    console.print(f"ready for {report.runtime}" if not blocking else f"NOT ready for {report.runtime}: {len(blocking)} rule(s) refused or ignored")
