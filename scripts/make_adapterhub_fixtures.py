"""Build the AdapterHub fixtures that tests/test_adapterhub.py compares the engine against.

Run with the AdapterHub venv (adapters 1.3.0, transformers 4.57), never in CI:

    /work/venv-adapters/bin/python scripts/make_adapterhub_fixtures.py

For each family (a tiny BERT, GPT-2 and Llama built from configs, fixed seeds) it writes under
tests/fixtures/adapterhub/<family>/:

    base/                       the base model (save_pretrained, safetensors), saved before adapters.init
    adapters/<name>/            AdapterHub saved adapters (adapter_config.json + adapter.safetensors)
    fusions/<name>/             AdapterHub saved fusions (adapter_fusion_config.json + model_adapter_fusion.safetensors)
    expected.safetensors        input_ids, attention_mask and the eval outputs of every case

Adapter weights are randomised (AdapterHub zero-initialises some up-projections), so every tensor matters.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import adapters
from adapters import BnConfig, ConfigUnion, Fuse, ParBnConfig, PrefixTuningConfig, Stack
from adapters.configuration import AdapterFusionConfig

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "adapterhub"
VOCAB = 64

# one adapter that exercises the options the presets leave off
CUSTOM = BnConfig(
    mh_adapter=True, output_adapter=True, reduction_factor={"0": 4, "default": 8}, non_linearity="gelu",
    original_ln_before=True, residual_before_ln=False, ln_before=True, ln_after=True, adapter_residual_before_ln=True,
    use_gating=True, scaling="channel", leave_out=[1],
)
ADAPTERS = {
    "seq": "seq_bn",
    "seq2": "seq_bn",
    "dbl": "double_seq_bn",
    "par": "par_bn",
    "learned": BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=8, non_linearity="swish", is_parallel=True,
                        scaling="learned", original_ln_before=False, ln_after=True),
    "custom": CUSTOM,
    "noln": BnConfig(mh_adapter=True, output_adapter=False, reduction_factor=8, non_linearity="tanh", original_ln_after=False,
                     residual_before_ln=False),
    "prefix": PrefixTuningConfig(prefix_length=4, bottleneck_size=16),
    "flat": PrefixTuningConfig(prefix_length=3, flat=True),
    "mam": ConfigUnion(PrefixTuningConfig(prefix_length=4, bottleneck_size=16), ParBnConfig(reduction_factor=4)),
}
#: family-only adapters: 'post_add' needs the sub-layer's LayerNorm (AdapterHub fails on pre-LN layers)
EXTRA = {"bert": {"postadd": BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=4, non_linearity="relu", residual_before_ln="post_add",
                                      original_ln_before=True, ln_after=True, adapter_residual_before_ln=True)}}
SAFE = {"seq", "seq2", "dbl", "par", "learned", "noln", "postadd"}
STATIC = AdapterFusionConfig.load("static", query_before_ln=True, residual_before=True)
FUSIONS = {"seq,seq2": ("dynamic", ["seq", "seq2"]), "par,seq": (STATIC, ["par", "seq"])}
CASES = {  # case name → (active setup, skip_layers)
    "base": (None, None),
    **{name: (Stack(name), None) for name in ADAPTERS},
    "stack_seq_dbl": (Stack("seq", "dbl"), None),
    "stack_dbl_par": (Stack("dbl", "par"), None),
    "fuse": (Fuse("seq", "seq2"), None),
    "fuse_static": (Fuse("par", "seq"), None),
    "drop_dbl": (Stack("dbl"), [0]),
    "drop_fuse": (Fuse("seq", "seq2"), [0]),
}


def tiny(family: str) -> torch.nn.Module:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if family == "bert":
        config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=32)
        model = BertModel(config, add_pooling_layer=False)
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1, pad_token_id=0))
    else:
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
        model = LlamaForCausalLM(config)
    # eager attention: with SDPA and no materialised mask, AdapterHub's prefixes meet a top-left-aligned causal
    # mask (query i sees keys 0..i, mostly prefix), which is not prefix tuning
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # random biases and norm weights, so paths through them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
            elif "norm" in name.lower() or ".ln_" in name:
                p.normal_(1.0, 0.1)
    return model.eval()


def outputs(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).contiguous()


def build(family: str) -> int:
    out = ROOT / family
    shutil.rmtree(out, ignore_errors=True)
    model = tiny(family)
    model.save_pretrained(out / "base", safe_serialization=True)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    tensors = {"input_ids": ids, "attention_mask": mask}

    adapters.init(model)
    names = {**ADAPTERS, **EXTRA.get(family, {})}
    for name, config in names.items():
        model.add_adapter(name, config=config)
    for fusion_name, (config, members) in FUSIONS.items():
        model.add_adapter_fusion(Fuse(*members), config=config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if any(k in name for k in ("adapters.", "prefix_tunings.", "adapter_fusion_layer.")):
                base = torch.eye(p.shape[0]) if name.endswith("value.weight") else 1.0 if name.endswith(("norm_before.weight", "norm_after.weight", ".scaling")) else 0.0
                p.copy_(base + torch.randn(p.shape, generator=generator) * (0.1 if "adapter_fusion_layer" in name else 0.5))
    model.eval()

    for case, (setup, skip) in (CASES | {name: (Stack(name), None) for name in EXTRA.get(family, {})}).items():
        model.set_active_adapters(setup, skip_layers=skip)
        tensors[case] = outputs(model, ids, mask)
        # the base model alone gives `base`; nothing else may equal it
        assert case == "base" or (tensors[case] - tensors["base"]).abs().max() > 1e-3, case
    model.set_active_adapters(None)

    (out / "adapters").mkdir()
    (out / "fusions").mkdir()
    for name in names:
        # AdapterHub registers some modules under two names (ln_before's norm, the prefix pool), which
        # safetensors refuses to save: those adapters get AdapterHub's default pickle
        model.save_adapter(str(out / "adapters" / name), name, with_head=(name == "seq"), use_safetensors=name in SAFE)
    for fusion_name in FUSIONS:
        model.save_adapter_fusion(str(out / "fusions" / fusion_name.replace(",", "_")), fusion_name, use_safetensors=True)
    save_file(tensors, out / "expected.safetensors")
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


if __name__ == "__main__":
    total = sum(build(family) for family in ("bert", "gpt2", "llama"))
    print(f"wrote {ROOT} ({total / 1e6:.2f} MB)")
