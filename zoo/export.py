"""`zoo export NAME`: an adapter out of the zoo in the form a serving runtime takes.

- `--to gguf`: a GGUF LoRA for llama.cpp (`--lora FILE`), as llama.cpp's `convert_lora_to_gguf.py` writes it
  (see `zoo.formats.gguf`), from the adapter and the base's config.
- `--to peft`: a clean PEFT folder for vLLM / LoRAX: one rank and one scaling for every module (each
  module's own scaling folded into lora_B, smaller ranks zero-padded — the same ΔW everywhere), no
  rank/alpha patterns vLLM would ignore; optionally resized to a fixed rank first.

Both refuse, in one line, what the runtime cannot take (the `zoo check` rules that are `refused` or `ignored`).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from zoo.api import PathLike
from zoo.check import VLLM_MAX_LORA_RANKS, check, lora_modules, one_adapter
from zoo.errors import ZooError

TARGETS = ("gguf", "peft")


@dataclass
class ExportReport:
    """What `export_gguf` / `export_peft` wrote."""

    adapter: str
    to: str
    out: str
    modules: int
    rank: int
    bytes: int
    tensors: list[dict] = field(default_factory=list)  # gguf: name, shape, type per tensor
    notes: list[str] = field(default_factory=list)  # scalings folded, ranks padded, resize error


def export_gguf(adapter: str, *, base: PathLike, out: PathLike, outtype: str = "f32", registry: PathLike | None = None) -> ExportReport:
    """
    Write `adapter` as a GGUF LoRA that llama.cpp loads with `--lora FILE`.

    Args:
        adapter: a registered NAME[@VERSION] or an adapter folder (LoRA, or AdaLoRA as the LoRA it computes).
        base: the base's config.json or folder (only the config is read: architecture, layers, heads).
        out: the .gguf file to write (must not exist; written under a temporary name, then renamed).
        outtype: 'f32' (default), 'f16', 'bf16' or 'q8_0' (tensors whose rows are not a multiple of 32 stay f16).

    Raises:
        ZooError: what llama.cpp cannot take (non-LoRA methods, DoRA, modules_to_save, lora_bias, an
            architecture or module with no GGUF tensor), in one line with the fix.

    Example:
        >>> zoo.export_gguf("llama-sql", base="Llama-3.2-1B/config.json", out="llama-sql.gguf", outtype="f16")  # doctest: +SKIP
    """
    from zoo.formats.gguf import GgufBase, write_lora_gguf
    from zoo.formats.peft import read_json_config

    if Path(out).is_dir():
        raise ZooError(f"--out {out} is a folder", "give the .gguf file to write, e.g. --out adapter.gguf")
    if os.path.lexists(out):  # a file, a FIFO or a link: never replaced behind the user's back
        raise ZooError(f"--out {out} already exists", "give a new file name, or remove it first")
    _refuse_blocking(check(adapter, runtime="llama.cpp", base=base, registry=registry))
    resolved = one_adapter(adapter, registry=registry)
    path = Path(base)
    config_path = path / "config.json" if path.is_dir() else path
    gguf_base = GgufBase.from_config(read_json_config(config_path, "config.json"), str(config_path))
    from zoo.composition import as_lora

    modules = lora_modules(resolved)
    alpha = float(as_lora(resolved).config.lora_alpha)
    factors, folded = {}, 0
    for module, (A, B, scaling) in modules.items():
        runtime_scaling = alpha / A.shape[0] if alpha else 1.0  # llama.cpp: alpha/rank, or 1 when alpha is 0
        if not math.isclose(scaling, runtime_scaling, rel_tol=1e-7):
            B, folded = B.float() * (scaling / runtime_scaling), folded + 1
        factors[module] = (A, B)
    tensors = write_lora_gguf(Path(out), gguf_base, factors, alpha=alpha, name=resolved.name, outtype=outtype)
    notes = [f"{folded} module(s): PEFT's scaling (rsLoRA / alpha_pattern) folded into lora_b"] if folded else []
    return ExportReport(adapter, "gguf", str(out), len(modules), max(A.shape[0] for A, _ in factors.values()), os.path.getsize(out),
                        [{"name": t.name, "shape": list(t.shape), "type": t.type} for t in tensors], notes)


def export_peft(adapter: str, *, out: PathLike, rank: int | None = None, registry: PathLike | None = None) -> ExportReport:
    """
    Write `adapter` as a PEFT folder vLLM and LoRAX serve as they read it: one rank, one scaling.

    A plain LoRA whose modules share its rank and scaling is written as stored (a clean config). Otherwise
    each module's scaling is folded into lora_B and modules of lower rank are zero-padded, so every
    module has rank R and scaling 1 (lora_alpha = R): the same ΔW, under any runtime's reading.

    Args:
        adapter: a registered NAME[@VERSION] or an adapter folder.
        out: the folder to write (must not exist, or be empty).
        rank: resize every module to this rank first (the best approximation, see `zoo.resize`).

    Raises:
        ZooError: non-LoRA methods, DoRA, modules_to_save, lora_bias (what vLLM refuses), `out` not empty.
    """
    from compose.durable import new_dir
    from compose.errors import CompositionError
    from compose.lora.config import LoraConfig
    from compose.lora.resize import pad_rank, resize_factors
    from zoo.formats import peft as peft_format

    out = Path(out)
    if rank is not None and rank > VLLM_MAX_LORA_RANKS[-1]:
        raise ZooError(f"--rank {rank} is above vLLM's largest max_lora_rank ({VLLM_MAX_LORA_RANKS[-1]})", f"pick a rank ≤ {VLLM_MAX_LORA_RANKS[-1]}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ZooError(f"{out} exists and is not empty", "export into a new folder")
    _refuse_blocking(check(adapter, runtime="vllm", registry=registry), skip=("rank",) if rank is not None else ())
    resolved = one_adapter(adapter, registry=registry)
    modules = lora_modules(resolved)
    config = resolved.config
    notes: list[str] = []
    uniform = config.method == "lora" and not config.rank_pattern and not config.alpha_pattern
    if uniform and rank is None:
        state = {k: v for k, v in resolved.state.items()}
        new_config, r = config, config.r
    else:
        factors = {}
        for module, (A, B, scaling) in modules.items():
            if rank is not None:
                try:
                    resized = resize_factors(A, B, scaling, rank=rank)
                except CompositionError as e:
                    raise ZooError(f"{adapter}: module {module}: {e}", "retrain the adapter with smaller weights") from None
                factors[module] = (resized.A, resized.B)
                if resized.error:
                    notes.append(f"{module}: rank {resized.old_rank} → {resized.rank}, relative error {resized.relative_error:.2e}")
            else:
                factors[module] = (A, B * scaling)
        r = rank if rank is not None else max(A.shape[0] for A, _ in factors.values())
        state = {}
        padded = 0
        for module, (A, B) in factors.items():
            padded += A.shape[0] < r
            state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = pad_rank(A.contiguous(), B.contiguous(), r)
        new_config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
                                fan_in_fan_out=getattr(config, "fan_in_fan_out", False))
        notes.insert(0, f"scaling folded into lora_B (lora_alpha = r = {r}){f'; {padded} module(s) zero-padded to rank {r}' if padded else ''}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_dir(out.parent, f".{out.name}.partial-")  # the umask's mode, as any new folder (mkdtemp's is 0700)
    try:
        peft_format.save_adapter(tmp, new_config, state, base_model=resolved.base_model, task_type=resolved.task_type)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(adapter, "peft", str(out), len(modules), r, sum(p.stat().st_size for p in out.iterdir()), notes=notes)


def _refuse_blocking(report, skip: tuple[str, ...] = ()) -> None:
    """The first refused / ignored rule of a `zoo check` report (but those in `skip`) as a one-line error."""
    for f in report.findings:
        if f.status in ("refused", "ignored") and f.rule not in skip:
            raise ZooError(f"{report.adapter}: {f.message}", f.fix)
