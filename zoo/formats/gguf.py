"""GGUF LoRA adapters for llama.cpp (`llama-cli --lora FILE`), written as llama.cpp's own
`convert_lora_to_gguf.py` writes them, with its `gguf` package.

What the converter produces for a PEFT LoRA and a base config (read from its source):

- keys `general.architecture` (the base's GGUF architecture), `general.type = "adapter"`,
  `adapter.type = "lora"`, `adapter.lora.alpha` (float32), `general.name`, `general.quantization_version`;
- per adapted module `<gguf name>.lora_a` = PEFT's lora_A (r, in) and `<gguf name>.lora_b` = lora_B (out, r),
  not transposed (GGUF lists the dimensions reversed: [in, r] and [r, out]); names from gguf's
  `TensorNameMap` for the architecture (`model.layers.0.self_attn.q_proj` → `blk.0.attn_q.weight`);
- Llama-family bases (Llama, Mistral: GPT-J-style RoPE) have their q_proj / k_proj rows permuted for
  llama.cpp's RoPE layout; on a LoRA the permutation acts on lora_b's rows (heads for q, KV heads for k);
- tensors in bf16 or other dtypes become fp32 first; then `--outtype`: f32, f16, bf16 or q8_0, where a
  tensor whose rows are not a multiple of 32 falls back to f16 (as gguf's quantizer refuses it).

llama.cpp scales each module by alpha / rank (rank from lora_b's shape). The converter writes
`lora_alpha` and drops rsLoRA and `alpha_pattern`, which then compute a different delta; here a module
whose PEFT scaling differs from alpha / rank has that ratio folded into its lora_b, so the file computes
exactly what PEFT does.
"""

from __future__ import annotations

import functools
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zoo.errors import ZooError

if TYPE_CHECKING:
    import torch

#: transformers architecture → (gguf MODEL_ARCH name, q/k rows permuted for RoPE) — the classes the converter
#: maps to these GGUF architectures (conversion/llama.py, qwen.py, gemma.py, phi.py, bert.py).
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
    "GemmaForCausalLM": ("GEMMA", False),
    "Gemma2ForCausalLM": ("GEMMA2", False),
    "Gemma3ForCausalLM": ("GEMMA3", False),
    "Phi3ForCausalLM": ("PHI3", False),
    "BertModel": ("BERT", False),
}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
F16_MAX = 65504.0  # the largest finite float16 (q8_0's block scales are float16 too)
QK8_0 = 32  # q8_0 block: rows must be a multiple of it


@functools.lru_cache(maxsize=8)
def _tensor_name_map(gguf_arch: str, layers: int):
    """gguf's name map for an architecture: built once, not per module (it lists every tensor of every layer,
    so building it per module made an 80-layer adapter quadratic: 72 s for `zoo check`)."""
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch), layers)


@dataclass(frozen=True)
class GgufBase:
    """What the converter reads from the base's config.json."""

    architecture: str  # transformers class, e.g. LlamaForCausalLM
    gguf_arch: str  # gguf.MODEL_ARCH name, e.g. LLAMA
    permute_qk: bool
    layers: int
    heads: int
    kv_heads: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: dict, where: str) -> GgufBase:
        """The base as the converter sees it (a nested `text_config` is lifted to the top, as it does)."""
        config = {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config
        architecture = (config.get("architectures") or [None])[0]
        if architecture not in ARCHITECTURES:
            raise ZooError(f"{where}: architecture {architecture!r} has no GGUF LoRA mapping here",
                           f"llama.cpp adapters are written for: {', '.join(ARCHITECTURES)}")
        try:
            layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        except (KeyError, TypeError, ValueError):
            raise ZooError(f"{where}: needs integer num_hidden_layers and num_attention_heads", "pass the base model's own config.json") from None
        gguf_arch, permute = ARCHITECTURES[architecture]
        return cls(architecture, gguf_arch, permute, layers, heads, int(config.get("num_key_value_heads") or heads),
                   bool(config.get("tie_word_embeddings", gguf_arch.startswith("GEMMA"))))

    def tensor_name(self, module: str) -> str | None:
        """The GGUF name of module `module`'s weight ('blk.0.attn_q.weight'), None if llama.cpp has none."""
        names = _tensor_name_map(self.gguf_arch, self.layers)
        for prefix, replace in (("model.language_model.", "model."), ("language_model.", "")):  # as the converter strips them
            if module.startswith(prefix):
                module = replace + module[len(prefix):]
                break
        return names.get_name(f"{module}.weight", try_suffixes=(".weight", ".bias"))

    def row_permutation_heads(self, module: str) -> int | None:
        """Heads whose rows llama.cpp permutes in this module's output (q: attention heads, k: KV heads), or None."""
        if not self.permute_qk:
            return None
        return self.heads if module.endswith("q_proj") else self.kv_heads if module.endswith("k_proj") else None


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute` on the rows of `weight` (out, …): within each head, the rows of the
    two RoPE halves are interleaved (HF's rotate-half layout → GPT-J's pairs)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class GgufTensorInfo:
    """One tensor written: its GGUF name, shape as torch has it, and GGML type."""

    name: str
    shape: tuple[int, ...]
    type: str


def write_lora_gguf(
    path: Path, base: GgufBase, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, alpha: float, name: str, outtype: str = "f32",
) -> list[GgufTensorInfo]:
    """
    Write `factors` ({module path: (lora_A (r, in), lora_B (out, r))}, already scaled for llama.cpp's alpha/r)
    as a GGUF LoRA adapter at `path` (written under a temporary name, then renamed).

    Raises:
        ZooError: a module has no GGUF tensor for the base's architecture, or its heads don't divide its rows.
    """
    import gguf
    import torch

    if outtype not in OUTTYPES:
        raise ZooError(f"unknown --outtype {outtype!r}", f"use one of {', '.join(OUTTYPES)}")
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, base.gguf_arch)])
    written = []
    for module, (A, B) in factors.items():
        tensor = base.tensor_name(module)
        if tensor is None:
            raise ZooError(f"module {module} has no llama.cpp tensor in a {base.architecture} ({base.gguf_arch})",
                           "llama.cpp adapts only the modules its model graph has; retrain without this target")
        if (heads := base.row_permutation_heads(module)) is not None:
            if B.shape[0] % (2 * heads):
                raise ZooError(f"module {module}: {B.shape[0]} rows do not split into {heads} RoPE heads", "the base config does not match the adapter")
            B = permute_rows(B, heads)
        for suffix, t in ((".lora_a", A), (".lora_b", B)):
            if t.dtype not in (torch.float16, torch.float32):  # the converter's first step
                t = t.to(torch.float32)
            data, kind = t.detach().cpu().contiguous().numpy(), qtype
            if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % QK8_0:
                kind = gguf.GGMLQuantizationType.F16  # gguf's quantizer refuses it; the converter falls back so
            limit = {gguf.GGMLQuantizationType.F16: F16_MAX, gguf.GGMLQuantizationType.Q8_0: F16_MAX * 127}.get(kind)  # q8_0: scale = max/127
            if limit is not None and data.size and abs(data).max() > limit:
                raise ZooError(f"module {module}: {suffix[1:]} reaches {float(abs(data).max()):.3g}, beyond what {kind.name} holds (it would be written as ±Inf)",
                               "export with --outtype f32 or bf16")
            data = gguf.quants.quantize(data, kind)
            writer.add_tensor(tensor + suffix, data, raw_dtype=kind)
            written.append(GgufTensorInfo(tensor + suffix, tuple(t.shape), kind.name))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_name(name)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # mkstemp's file would be 0600: a new file takes the umask's mode, as any export
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.partial"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
            break
        except FileExistsError:
            continue
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written
