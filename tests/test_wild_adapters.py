"""Adapters as they are found in public repositories, each against PEFT 0.21 loading the same files:
peft-0.2 prompt tensors, nested classifier heads, PiSSA/OLoRA saved without conversion, LoRA on embedding
layers and the embedding weights PEFT saves with them, peft < 0.3 MergedLinear configs."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import zoo
from compose.errors import CompositionError
from tiny import peft_model, random_peft_adapter, tiny_gpt2, tiny_llama, tiny_roberta, token_ids
from zoo.errors import ZooError
from zoo.estimate import estimate_adapter
from zoo.formats.peft import UnknownConfigKeysWarning
from zoo.inspect import inspect_adapter
from zoo.merge import merge_adapters

ATOL = 1e-5


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_ids() if ids is None else ids).logits


def rewrite(folder, tensors=lambda state: state, config=lambda cfg: cfg):
    """Edit a saved PEFT adapter in place: its tensors and its adapter_config.json."""
    state = tensors(load_file(folder / "adapter_model.safetensors"))
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = config(json.loads((folder / "adapter_config.json").read_text()))
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def differences(base, base_dir, adapter, out_dir) -> tuple[float, float, float, float]:
    """Max |Δ logit| against PEFT's loaded model of the adapter loaded, merged in memory and merged into a checkpoint
    (`zoo merge`), and of PEFT's own merge_and_unload; also checks that the adapter acts and that detaching gives
    the model's own weights back, bit for bit."""
    reference = peft_model(base, adapter)
    expected = logits(reference)
    loaded = zoo.load(base_dir, [str(adapter)])
    assert (logits(loaded) - logits(base)).abs().max() > 1e-2  # the adapter really acts
    merge_adapters(str(adapter), base=base_dir, out=out_dir)
    models = (loaded, zoo.load(base_dir, [str(adapter)], merge=True), AutoModelForCausalLM.from_pretrained(out_dir), reference.merge_and_unload())
    diffs = tuple((logits(model) - expected).abs().max().item() for model in models)
    zoo.detach(loaded)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), base.state_dict().values()))
    return diffs


def residual_adapter(folder, init: str, model: str):
    """(base, a PEFT adapter saved unconverted with `init`) for RESIDUAL_CASES[(init, model)]."""
    base = tiny_llama() if model == "llama" else tiny_gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, **RESIDUAL_CASES[init, model])
    return base, random_peft_adapter(base, folder, config, seed=3)


def embedding_adapter(folder, targets: list[str]):
    """(tied-embedding base, a PEFT LoRA on `targets` whose saved embedding weights differ from the base's)."""
    base = tiny_llama(tied=True)
    adapter = random_peft_adapter(base, folder, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), seed=4)
    # PEFT saves the targeted embeddings' weights (a resized vocabulary keeps its new rows there): make them matter,
    # the same change in both copies of the tied weight
    noise = lambda t: 0.1 * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))  # noqa: E731
    return base, rewrite(adapter, tensors=lambda s: {k: v + noise(v) if ".base_layer." in k else v for k, v in s.items()})


#: (init_lora_weights, model) → the rest of its LoraConfig
RESIDUAL_CASES = {
    ("pissa", "llama"): {"target_modules": ["q_proj", "down_proj"], "use_rslora": True, "rank_pattern": {"down_proj": 2}},
    ("olora", "llama"): {"target_modules": ["q_proj", "v_proj"]},
    ("pissa", "gpt2"): {"target_modules": ["c_attn"], "fan_in_fan_out": True},
}
EMBEDDING_TARGETS = [["q_proj", "lm_head"], ["q_proj", "embed_tokens"], ["embed_tokens", "lm_head"]]


# ---- peft 0.2's prompt tensor name; add checks what inspect and load check ------------------------


def test_peft02_prefix_tensor_name_is_read_by_add_inspect_and_load(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    config = peft.PrefixTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM")
    modern = random_peft_adapter(base, tmp_path / "modern", config, seed=1)
    legacy = tmp_path / "chatglm-style"
    legacy.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (legacy / name).write_bytes((modern / name).read_bytes())
    rewrite(legacy, tensors=lambda s: {"prompt_encoder.embedding.weight": s["prompt_embeddings"]},
            config=lambda c: {k: c[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "num_layers", "token_dim",
                                                "num_attention_heads", "num_transformer_submodules", "prefix_projection", "inference_mode")})

    zoo.add(legacy, name="p")
    report = inspect_adapter(legacy)
    assert (report.method, report.summary.num_virtual_tokens, report.trainable_params) == ("prefix", 8, 8 * 2 * 2 * 16)
    torch.testing.assert_close(logits(zoo.load(tmp_path / "base", ["p"])), logits(peft_model(base, modern)), atol=ATOL, rtol=0)


def test_add_refuses_what_inspect_refuses(tmp_path):
    base = tiny_llama()
    adapter = random_peft_adapter(base, tmp_path / "p", peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), seed=1)
    rewrite(adapter, config=lambda c: {**c, "num_layers": 3})  # the tensor holds 2 layers
    with pytest.raises(ZooError, match="config says") as inspect_error:
        inspect_adapter(adapter)
    with pytest.raises(ZooError) as add_error:
        zoo.add(adapter, name="p")
    assert str(add_error.value) == str(inspect_error.value)
    assert zoo.list_adapters() == []


# ---- a classifier head of two Linears ------------------------------------------------------------


def test_nested_head_takes_num_labels_from_its_output_layer(tmp_path):
    tiny_roberta(num_labels=2).save_pretrained(tmp_path / "base")  # a checkpoint whose own head has 2 labels
    torch.manual_seed(0)
    base3 = type(tiny_roberta()).from_pretrained(tmp_path / "base", num_labels=3, ignore_mismatched_sizes=True).eval()
    adapter = random_peft_adapter(base3, tmp_path / "cls", peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"), seed=2)
    assert {"base_model.model.classifier.dense.weight", "base_model.model.classifier.out_proj.weight"} <= set(load_file(adapter / "adapter_model.safetensors"))

    model = zoo.load(tmp_path / "base", [str(adapter)])
    assert model.classifier.out_proj.out_features == 3
    torch.testing.assert_close(logits(model), logits(peft_model(base3, adapter)), atol=ATOL, rtol=0)


# ---- PiSSA / OLoRA saved without conversion -------------------------------------------------------


@pytest.mark.parametrize("init,model", list(RESIDUAL_CASES))
def test_residual_initialisations_equal_peft(tmp_path, init, model):
    base, adapter = residual_adapter(tmp_path / init, init, model)
    base.save_pretrained(tmp_path / "base")
    assert json.loads((adapter / "adapter_config.json").read_text())["init_lora_weights"] == init  # saved unconverted
    assert max(differences(base, tmp_path / "base", adapter, tmp_path / "merged")) < ATOL  # PEFT's merge agrees too


def test_randomized_pissa_is_refused_naming_the_conversion(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    adapter = random_peft_adapter(base, tmp_path / "niter", peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_4"), seed=3)
    for attempt in (lambda: zoo.add(adapter, name="n"), lambda: zoo.load(tmp_path / "base", [str(adapter)])):
        with pytest.raises(ZooError, match="pissa_niter_4.*randomized SVD.*path_initial_model_for_weight_conversion"):
            attempt()


# ---- LoRA on embedding layers, and the embedding weights PEFT saves with it -------------------------


@pytest.mark.parametrize("targets", EMBEDDING_TARGETS)
def test_embedding_adapters_equal_peft(tmp_path, targets):
    base, adapter = embedding_adapter(tmp_path / "emb", targets)
    base.save_pretrained(tmp_path / "base")

    zoo.add(adapter, name="emb")
    report = inspect_adapter(adapter)
    estimate = estimate_adapter(tmp_path / "base", rank=4, targets=targets, dtype="fp32")
    assert (report.trainable_params, report.total_bytes) == (estimate.params, estimate.bytes)
    assert {s.module for s in report.saved_modules} == {"lm_head" if t == "lm_head" else "model.embed_tokens" for t in targets if t != "q_proj"}
    *ours, peft_merged = differences(base, tmp_path / "base", adapter, tmp_path / "merged")
    assert max(ours) < ATOL
    # PEFT merges a LoRA on one of two tied modules into their shared weight, which changes the other one too;
    # zoo's merges give the adapted module a weight of its own, so they compute what the unmerged model does
    assert peft_merged > 1


def test_merged_tied_weights_save_and_come_back(tmp_path):
    base, adapter = embedding_adapter(tmp_path / "emb", ["q_proj", "lm_head"])
    base.save_pretrained(tmp_path / "base")
    model = zoo.load(tmp_path / "base", [str(adapter)], merge=True)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    merge_adapters(str(adapter), base=tmp_path / "base", out=tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    zoo.unmerge(model)
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


def test_saved_embedding_of_another_vocabulary_is_one_line(tmp_path):
    base = tiny_llama(tied=True)
    base.save_pretrained(tmp_path / "base")
    adapter = random_peft_adapter(base, tmp_path / "chat", peft.LoraConfig(r=4, target_modules=["embed_tokens"]), seed=4)
    grow = lambda t: torch.cat([t, torch.randn(6, t.shape[1])]) if t.shape[0] == 64 else t  # noqa: E731  6 chat tokens more
    rewrite(adapter, tensors=lambda s: {k: grow(v) if ".base_layer." in k else v for k, v in s.items()})
    with pytest.raises(CompositionError, match=r"shape \(70, 32\).*\(64, 32\).*resize_token_embeddings\(70\)"):
        zoo.load(tmp_path / "base", [str(adapter)])


# ---- peft < 0.3 MergedLinear ---------------------------------------------------------------------


def test_merged_linear_configs_name_their_cause(tmp_path):
    """peft 0.2 wrote LoRA on some parts of a fused qkv as MergedLinear: lora_A (2r, in), lora_B a grouped Conv1d."""
    folder = tmp_path / "merged-linear"
    folder.mkdir()
    module = "base_model.model.transformer.h.0.attn.c_attn"
    save_file({f"{module}.lora_A.weight": torch.randn(8, 32), f"{module}.lora_B.weight": torch.randn(64, 4, 1)}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none",
        "target_modules": ["c_attn"], "enable_lora": [True, False, True], "merge_weights": False, "fan_in_fan_out": True,
    }))
    tiny_gpt2().save_pretrained(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownConfigKeysWarning)  # the cause, not "enable_lora is ignored"
        for attempt in (lambda: zoo.add(folder, name="m"), lambda: inspect_adapter(folder), lambda: zoo.load(tmp_path / "base", [str(folder)])):
            with pytest.raises(ZooError, match=r"enable_lora=\[True, False, True\] marks peft < 0.3's MergedLinear"):
                attempt()


@pytest.mark.parametrize("targets,init,refusal", [
    (["q_proj", "embed_tokens"], True, "carries 'model.embed_tokens.weight' for a layer accelerate offloaded"),
    (["q_proj"], "pissa", "a pissa adapter needs the base weight to compute its initial factors, and accelerate offloaded it"),
])
def test_what_needs_an_offloaded_weight_is_refused(tmp_path, targets, init, refusal):
    """Saved embedding weights would be overwritten by accelerate's hook, PiSSA's factors need W: neither is in
    memory on a module whose weights are offloaded (meta tensors, as accelerate leaves them)."""
    adapter = random_peft_adapter(tiny_llama(tied=True), tmp_path / "a", peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=init), seed=1)
    model = tiny_llama(tied=True)
    for module in (model.model.embed_tokens, model.model.layers[0].self_attn.q_proj):
        module.weight = torch.nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
    with pytest.raises(CompositionError, match=refusal):
        zoo.load(model, [str(adapter)])
