"""bitsandbytes quantization exactly as transformers applies it when it loads a model with a
`BitsAndBytesConfig`, for merging LoRA deltas into quantized bases.

    4-bit (QLoRA):  W ↦ blockwise NF4/FP4 codes, 64 values per block sharing one fp32 absmax,
                    of W in the model's dtype;  deq = code · absmax, in that dtype.
    8-bit (LLM.int8): W ↦ CB = round(127 · W / SCB) with SCB = max|W| per row, of W in fp16;
                    deq = CB · SCB / 127, in fp32.

A QLoRA adapter was trained against deq(Q(W)), so the exact merge is deq(Q(W)) + ΔW; quantizing that
again adds a rounding error of its own, which `QuantError.between` measures.

On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight in place at its first no-grad
forward (`_convert_weight_packed_for_cpu`): the codes are reordered for its bf16 kernel and absmax is
rounded to bf16 and transposed, with `quant_state.dtype` relabelled bf16. `plain_4bit` reads either
layout back as the standard one, with the absmax that kernel multiplies by.
"""

from __future__ import annotations

import copy
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn

from compose.merge.report import QuantError

BLOCKSIZE = 64  # Params4bit's default, which transformers keeps


def quantize(weight: torch.Tensor, method: str, double_quant: bool = False) -> tuple[torch.Tensor, Any]:
    """Q(W) of an (out, in) weight: (packed 4-bit codes, QuantState) or (int8 CB, fp32 SCB), bit for bit
    what `Params4bit` / `Int8Params` store when transformers quantizes the weight at load time."""
    if method == "int8":
        cb, scb, _ = bnbf.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        return cb, scb
    return bnbf.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=method, quant_storage=torch.uint8)


def is_packed(state: Any) -> bool:
    """Whether a 4-bit QuantState is in bitsandbytes' CPU kernel layout (see the module docstring)."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def plain_4bit(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """A 4-bit weight's (codes, QuantState) in bitsandbytes' standard layout, whichever layout it is in;
    the layer's own tensors are left as they are.

    A packed weight's codes come back exactly through bitsandbytes' inverse; its absmax is taken as the
    packed state holds it (the bf16 values the kernel multiplies by, one per block again, non-nested),
    since the fp32 absmax it was rounded from is gone. (The inverse's own absmax is not usable: 0.50
    leaves a non-nested one transposed, and quantizes a nested one again.)
    """
    if not is_packed(state):
        return data, state
    codes, _ = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))  # it rewrites the state it is given
    absmax = state.absmax.T.reshape(-1).float()  # packed: (in / blocksize, out) bf16
    return codes, bnbf.QuantState(absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                                  quant_type=state.quant_type, dtype=state.original_dtype)


def dequantize(data: torch.Tensor, state: Any) -> torch.Tensor:
    """deq(Q(W)) from `quantize`'s output or a layer's weight in either 4-bit layout (4-bit: in the
    quantized weight's dtype; int8: fp32)."""
    if isinstance(state, torch.Tensor):
        return bnbf.int8_vectorwise_dequant(data, state)
    return bnbf.dequantize_4bit(*plain_4bit(data, state))


def serialized(module: str, data: torch.Tensor, state: Any) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a quantized Linear named `module`, as transformers' `save_pretrained` writes
    them: `weight` + `weight.absmax`, `weight.quant_map`, `weight.quant_state.bitsandbytes__nf4`, ...
    (4-bit), or `weight` + `SCB` + `weight_format` (8-bit, row-major = 0)."""
    if isinstance(state, torch.Tensor):
        return {f"{module}.weight": data, f"{module}.SCB": state, f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}
    return {f"{module}.weight": data, **{f"{module}.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def requantize_layer(layer: nn.Module, exact: torch.Tensor) -> QuantError:
    """Replace the weight of bitsandbytes `layer` by Q(exact) with the layer's own settings (4-bit: quant
    type, block size, double quantization and dtype; 8-bit: fp16 rows), and return the rounding error
    |deq(Q(exact)) − exact| that this adds. The new weight is in the standard layout (bitsandbytes packs
    it again at its next forward where it would)."""
    old = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        method = old.quant_type
        dtype = old.quant_state.original_dtype if is_packed(old.quant_state) else old.quant_state.dtype
        data, state = quantize(exact.to(dtype), method, old.compress_statistics)
        layer.weight = bnb.nn.Params4bit(
            data, requires_grad=False, quant_state=state, blocksize=old.blocksize, compress_statistics=old.compress_statistics,
            quant_type=method, quant_storage=old.quant_storage, module=layer, bnb_quantized=True,
        )
        layer.quant_state = state
    else:
        data, state = quantize(exact, "int8")
        layer.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=state)
        layer.init_8bit_state()  # the layer's state still holds the old CB/SCB the forward would use
    return QuantError.between(dequantize(data, state), exact)


def bnb_config(method: str, compute_dtype: torch.dtype, double_quant: bool = False) -> Any:
    """The transformers `BitsAndBytesConfig` for `method` ('nf4' | 'fp4' | 'int8')."""
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=double_quant)


def quantized_modules(meta_model: nn.Module, config: Any, dtype: torch.dtype) -> set[str]:
    """Names of the modules that transformers replaces by bitsandbytes layers when it loads the model with
    `config`: every Linear / Conv1D except what it keeps in full precision (the output head, tied and
    last modules, `llm_int8_skip_modules`, `_keep_in_fp32_modules`). Runs transformers' own quantizer
    preprocessing on `meta_model` (built on the meta device), which it modifies."""
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    quantizer.preprocess_model(model=meta_model, dtype=dtype, device_map={"": "cpu"})
    return {name for name, m in meta_model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
