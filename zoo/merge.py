"""`zoo merge`: fold LoRA adapters into a base checkpoint folder, streaming shard by shard.

    >>> from zoo.merge import merge
    >>> report = merge([(config, state)], base="Llama-3.2-1B", out="merged", quantize="nf4", dequantize=True)  # doctest: +SKIP

Torch loads only when a merge runs, so the CLI can import this module at start-up.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from compose.lora.config import LoraConfig
from compose.merge.report import MergeReport
from zoo.errors import ZooError

if TYPE_CHECKING:
    import torch

PathLike = str | os.PathLike


def merge(
    adapters: list[tuple[LoraConfig, dict[str, torch.Tensor]]],
    *,
    base: PathLike,
    out: PathLike,
    dtype: str | None = None,
    quantize: str | None = None,
    dequantize: bool = False,
    double_quant: bool = False,
    progress: bool = False,
) -> MergeReport:
    """Write `base` with the LoRA `adapters` merged into it (W + Σᵢ sᵢ·Bᵢ·Aᵢ) to the new folder `out`.

    Args:
        adapters: (config, state) per adapter, states keyed as the engine takes them
            (`<module>.lora_A.weight`, `<module>.lora_B.weight`; on embeddings `<module>.lora_embedding_A/B`;
            base weights an adapter carries, `<module>.base_layer.weight`, replace the base's); several
            adapters add up (stacked).
        base: a local `save_pretrained` folder with safetensors weights (one file or sharded).
        out: the folder to create (absent or empty); same shards, config and tokenizer files as `base`.
        dtype: output dtype of floating tensors ('bfloat16', 'float16', 'float32'; None: unchanged).
        quantize: 'nf4' | 'fp4' | 'int8' — the adapters were trained (QLoRA) on the base quantized so by
            bitsandbytes: merge into deq(Q(W)), and write the result quantized again (loads with
            `from_pretrained(out)`), or in full precision with `dequantize`.
        dequantize: with `quantize`, write deq(Q(W)) + ΔW in `dtype` — the exact merge of a QLoRA adapter.
        double_quant: with 4-bit `quantize`, QLoRA's double quantization (`bnb_4bit_use_double_quant`).
        progress: show a progress bar over the base's tensors (on stderr).

    Returns:
        The `MergeReport`: per module, the error of the written weight against the exact merge (the
        extra quantization error when requantized); sizes, time, peak memory.

    Raises:
        ZooError: `base` is not a folder; an adapter uses DoRA, lora_bias or modules_to_save (merge those
            in memory: `zoo.load(..., merge=True)` then `save_pretrained`).
        CompositionError: a module is not in the checkpoint, a shape does not fit, `out` is not empty.
    """
    from compose.merge.checkpoint import merge_checkpoint

    if not os.path.isdir(base):
        raise ZooError(f"base {os.fspath(base)!r} is not a folder", "download the base model first (save_pretrained or `hf download`) and pass its folder")
    check_base_headers(base)
    deltas = lora_deltas(adapters)
    kwargs = dict(dtype=dtype, quantize=quantize, dequantize=dequantize, double_quant=double_quant, weights=carried_weights(adapters))
    if not progress:
        return merge_checkpoint(base, out, deltas, **kwargs)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=None)
        return merge_checkpoint(base, out, deltas, **kwargs,
                                on_tensor=lambda name, done, total: bar.update(task, completed=done, total=total, description=name))


def check_base_headers(base: PathLike) -> None:
    """Validate the header of every shard of the base checkpoint folder `base` as adapter headers are (known
    dtypes, sane shapes, offsets that cover exactly dtype × shape bytes) before a merge reads any tensor."""
    from pathlib import Path

    from compose.merge.shards import read_layout
    from zoo.formats.safetensors_header import read_safetensors_header

    base = Path(base)
    for shard in read_layout(base).shards:  # the index's names are checked to lie in `base`
        if (base / shard).is_file():
            read_safetensors_header(base / shard)


def merge_adapters(
    adapters: str | list[str],
    *,
    base: PathLike,
    out: PathLike,
    dtype: str | None = None,
    quantize: str | None = None,
    dequantize: bool = False,
    progress: bool = False,
    registry: PathLike | None = None,
) -> MergeReport:
    """`merge` by name: registered adapters, folders, or a stack / weighted composition ('a+b' adds up).

    Example:
        >>> zoo.merge("llama-sql", base="Llama-3.2-1B", out="llama-sql-merged", dtype="bf16")  # doctest: +SKIP
    """
    from zoo.loading import resolve

    from compose.methods import check_composition
    from zoo.composition import as_lora

    resolved = resolve(adapters, registry=registry)
    if resolved.fusion:
        raise ZooError("an attention fusion computes per input and cannot be merged into weights", "merge its members (stack) instead")
    check_composition([(a.name, a.config.method) for a in resolved.adapters], merge=True)
    scaled = [a.name for a in resolved.adapters if a.config.method == "ia3"]
    if scaled:
        raise ZooError(f"IA3 adapter '{scaled[0]}' scales weights rather than adding a delta; the streaming merge adds LoRA deltas only",
                       "merge it in memory: zoo.load(base, adapters, merge=True).save_pretrained(out)")
    resolved.adapters = [as_lora(a) for a in resolved.adapters]
    for a in resolved.adapters:
        if a.base_model and not names_base(a.base_model, base):
            warnings.warn(f"{a.name} was trained on {a.base_model!r}, and {os.fspath(base)!r} does not look like it: merging anyway, check it is that model")
    dtypes = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    if dtype is not None and dtype not in dtypes and dtype not in dtypes.values():
        raise ZooError(f"unknown dtype {dtype!r}", "use fp32, bf16 or fp16")
    return merge([(a.config, a.state) for a in resolved.adapters], base=base, out=out, dtype=dtypes.get(dtype, dtype),
                 quantize=quantize, dequantize=dequantize, progress=progress)


def names_base(recorded: str, folder: PathLike) -> bool:
    """Whether `folder` is plausibly the base an adapter records: the same folder, or one whose path names the
    recorded Hub repo (its name in a folder name, ignoring case and '-', '_', '.'; or the Hub cache's
    `models--org--name`). Shapes that do not fit fail anyway; this catches a same-shaped other model."""
    if Path(recorded).is_dir():
        return Path(recorded).resolve() == Path(folder).resolve()
    folder = Path(folder).absolute()  # as the user named it: a link named after the model counts
    squash = lambda text: re.sub(r"[-_.]", "", text.lower())  # noqa: E731
    repo = squash(recorded.rstrip("/").rsplit("/", 1)[-1])
    return bool(repo) and (any(repo in squash(part) for part in folder.parts[-4:]) or "models--" + recorded.replace("/", "--") in folder.parts)


#: State-key suffixes of (A, B): LoRA on a Linear/Conv1D, and on an nn.Embedding.
_FACTORS = {False: (".lora_A.weight", ".lora_B.weight"), True: (".lora_embedding_A", ".lora_embedding_B")}
_CARRIED = ".base_layer.weight"  # a base weight the adapter was saved with (PEFT's saved embedding layers)


def lora_deltas(adapters: list[tuple[LoraConfig, dict[str, torch.Tensor]]]) -> dict:
    """Module path → one `LoraDelta(A, B, scaling, fan_in_fan_out, embedding, init)` per adapter that targets it, in order."""
    from compose.merge.checkpoint import LoraDelta

    deltas: dict[str, list] = {}
    for config, state in adapters:
        unsupported = [k for k in state if not k.endswith((*_FACTORS[False], *_FACTORS[True], _CARRIED))]
        if config.use_dora or unsupported:
            what = "DoRA" if config.use_dora else f"tensor '{unsupported[0]}' (lora_bias or modules_to_save)"
            raise ZooError(f"cannot stream-merge an adapter with {what}: only plain LoRA factors merge into a checkpoint",
                           "merge it in memory: zoo.load(base, adapters, merge=True).save_pretrained(out)")
        for embedding, (a_suffix, b_suffix) in _FACTORS.items():
            modules = {k.removesuffix(a_suffix) for k in state if k.endswith(a_suffix)}
            lonely = modules ^ {k.removesuffix(b_suffix) for k in state if k.endswith(b_suffix)}
            if lonely:
                raise ZooError(f"module '{sorted(lonely)[0]}' lacks {a_suffix.strip('.')} or {b_suffix.strip('.')}", "the adapter file is incomplete; re-save it")
            for module in sorted(modules):
                # a weight saved with the adapter is its base as trained: for PiSSA/OLoRA, the residual already
                init = None if embedding or module + _CARRIED in state else config.init_lora_weights
                delta = LoraDelta(state[module + a_suffix], state[module + b_suffix], config.scaling_for(module), config.fan_in_fan_out, embedding, init)
                deltas.setdefault(module, []).append(delta)
    return deltas


def carried_weights(adapters: list[tuple[LoraConfig, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Module path → the base weight an adapter was saved with (`<module>.base_layer.weight`), which the merge
    writes in place of the checkpoint's."""
    import torch

    carried: dict[str, torch.Tensor] = {}
    for _, state in adapters:
        for key, tensor in state.items():
            module = key.removesuffix(_CARRIED)
            if key.endswith(_CARRIED) and carried.setdefault(module, tensor) is not tensor and not torch.equal(carried[module], tensor):
                raise ZooError(f"the adapters carry different weights for module '{module}' (saved embedding layers)", "merge one of them at a time")
    return carried
