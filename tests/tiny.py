"""Shared test helpers: tiny transformers models built from configs, PEFT adapters made for them, and the
layout of bitsandbytes 4-bit weights chosen by hand (it differs between CPUs).

PEFT is the oracle: `make_peft_adapter` trains nothing but saves an adapter whose every tensor
matters (`init_lora_weights=False` so B ≠ 0; DoRA magnitudes and `modules_to_save` copies are
perturbed so they differ from what the base alone would give), `load_adapter` reads it back the way
the engine takes it (`read_peft_adapter` any method's, into that method's engine config), and `peft_model`
loads it with `PeftModel.from_pretrained` for comparison.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from compose.lora.config import LoraConfig

VOCAB = 64


def _built(cls, config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # transformers zero-initialises biases; random ones exercise the code paths through them
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return model


def tiny_llama(seed: int = 0, causal: bool = True, hidden: int = 32) -> nn.Module:
    """A 2-layer Llama (GQA: 4 heads, 2 KV heads); `LlamaForCausalLM` or, with causal=False, `LlamaModel`."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    return _built(LlamaForCausalLM if causal else LlamaModel, config, seed)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer `GPT2LMHeadModel` (its attention and MLP projections are transformers' Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return _built(GPT2LMHeadModel, config, seed)


def tiny_bert(seed: int = 0, num_labels: int | None = 3) -> nn.Module:
    """A 1-layer BERT: `BertForSequenceClassification` with `num_labels`, or a plain `BertModel` with None."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels or 2,
    )
    return _built(BertModel if num_labels is None else BertForSequenceClassification, config, seed)


def token_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """Random input ids in [1, VOCAB) (0 is the pad id)."""
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def make_peft_adapter(base: nn.Module, out_dir: str | Path, seed: int = 0, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for `base` (left untouched) to `out_dir` and return the directory.

    `lora_kwargs` go to `peft.LoraConfig` (e.g. `target_modules`, `r`, `use_dora`, `task_type`).
    """
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:  # else m = ‖W + s·B·A‖ and DoRA's rescaling is exactly 1
                p.mul_(0.5 + torch.rand_like(p))
            elif "modules_to_save" in name:  # else the saved copy equals the original
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return Path(out_dir)


def load_adapter(adapter_dir: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A saved PEFT adapter as the engine takes it: its config, and tensors keyed relative to the model."""
    from zoo.formats import peft as peft_format

    config, _ = peft_format.config_from_peft(peft_format.read_json_config(Path(adapter_dir) / peft_format.CONFIG_NAME))
    return config, peft_format.strip_prefix(peft_format.load_state(Path(adapter_dir) / peft_format.SAFETENSORS_NAME))


def engine_config(cls, peft_config: dict, **overrides):
    """Engine config `cls` from the keys of a PEFT adapter_config.json that it has (every one must validate)."""
    values = {k: v for k, v in peft_config.items() if k in cls.model_fields and k != "method" and v is not None}
    return cls(**values, **overrides)


def read_peft_adapter(adapter_dir: str | Path, cls) -> tuple[object, dict[str, torch.Tensor]]:
    """A saved PEFT adapter as the engine takes it: config `cls` from its adapter_config.json (`engine_config`),
    and its tensors keyed relative to the model (no `base_model.model.`)."""
    from safetensors.torch import load_file

    raw = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    state = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    return engine_config(cls, raw), {k.removeprefix("base_model.model."): v for k, v in state.items()}


def peft_model(base: nn.Module, adapter_dir: str | Path, name: str = "default") -> nn.Module:
    """`PeftModel.from_pretrained` on a deep copy of `base`, in eval mode."""
    import peft

    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir), adapter_name=name).eval()


def same_lora_adapters(base: nn.Module, specs: dict[str, dict]) -> tuple[nn.Module, nn.Module]:
    """(ours, peft): deep copies of `base` carrying the same LoRA adapters `specs` ({name: peft.LoraConfig kwargs},
    random A, B and β), attached by `compose.lora.model.attach_lora` and by PEFT; both in eval mode, every
    adapter attached (in ours all active, in PEFT the first)."""
    import peft

    from compose.lora.model import attach_lora

    torch.manual_seed(0)
    ref = None
    for name, spec in specs.items():
        config = peft.LoraConfig(init_lora_weights=False, **spec)
        if ref is None:
            ref = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            ref.add_adapter(name, config)
    ours = copy.deepcopy(base)
    for name, spec in specs.items():
        state = peft.get_peft_model_state_dict(ref, adapter_name=name)
        attach_lora(ours, name, LoraConfig(**spec), {k.removeprefix("base_model.model."): v for k, v in state.items()})
    return ours.eval(), ref.eval()


def random_peft_adapter(base: nn.Module, out_dir: str | Path, peft_config, seed: int, prune: bool = False) -> Path:
    """Save a PEFT adapter of any method for `base` with every trained tensor drawn at random (PEFT starts IA3 at
    1, LoRA's B and AdaLoRA's E at 0, which would hide a wrong engine); AdaLoRA pruned per module with `prune`."""
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.5 + torch.rand_like(p) if "ia3_l" in name else 0.3 * torch.randn_like(p))
    if prune:  # as update_and_allocate leaves it: ranks kept per module by masks over init_r
        gen = torch.Generator().manual_seed(seed)
        names = sorted(n.removeprefix("base_model.model.").removesuffix(".default") for n, _ in model.named_parameters() if ".lora_E." in n)
        model.peft_config["default"].rank_pattern = {n: (torch.rand(peft_config.init_r, generator=gen) < 0.6).tolist() for n in names}
    model.save_pretrained(out_dir)
    return Path(out_dir)


def linear4bit_layers(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes 4-bit Linear layers of `model`."""
    return [m for m in model.modules() if type(m).__name__ == "Linear4bit"]


def keep_plain_layout(*models: nn.Module) -> None:
    """No repacking at forward: bitsandbytes packs 4-bit weights for its CPU kernel only where the CPU has
    AVX512-BF16 (it reads this flag), so the tests choose the layout themselves on every machine."""
    for model in models:
        for layer in linear4bit_layers(model):
            layer.support_avx512bf16_for_cpu = False


def pack_for_cpu(model: nn.Module) -> None:
    """What `Linear4bit.forward` does to each weight at its first no-grad forward on an AVX512-BF16 CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    for layer in linear4bit_layers(model):
        if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)


def round_absmax_to_bf16(model: nn.Module) -> None:
    """The plain-layout twin of `pack_for_cpu`: same codes, absmax rounded to bf16 as packing rounds it."""
    for layer in linear4bit_layers(model):
        layer.weight.quant_state.absmax = layer.weight.quant_state.absmax.to(torch.bfloat16).float()
