"""`zoo.load`: registry names or folders onto a base loaded by transformers, equal to PEFT's outputs."""

from __future__ import annotations

import copy

import pytest
import torch

import zoo
from compose.errors import CompositionError
from tiny import make_peft_adapter, peft_model, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from zoo.errors import ZooError

ATOL = 1e-5


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    a = make_peft_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    b = make_peft_adapter(base, root / "b", seed=2, r=2, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "down_proj"], task_type="CAUSAL_LM")
    return root, base, a, b


def test_load_by_registry_name_equals_peft(llama_setup):
    root, base, a, _ = llama_setup
    zoo.add(a, name="a")
    model = zoo.load(root / "base", adapters=["a"])
    assert type(model).__name__ == "LlamaForCausalLM"  # from the adapter's task_type
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model(base, a)(ids).logits, atol=ATOL, rtol=0)
        # and it differs from the base (the adapter is really applied)
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-3


def test_load_two_adapters_from_folders_as_plus_string(llama_setup):
    root, base, a, b = llama_setup
    model = zoo.load(root / "base", adapters=f"{a}+{b}")
    reference = peft_model(base, a, "a")
    reference.load_adapter(str(b), adapter_name="b")
    reference.base_model.set_adapter(["a", "b"])
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=ATOL, rtol=0)


def test_detach_restores_the_base(llama_setup):
    root, base, a, _ = llama_setup
    model = zoo.load(root / "base", adapters=[str(a)])
    zoo.detach(model)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)


def test_load_onto_a_model_you_built(llama_setup):
    _, base, a, _ = llama_setup
    model = zoo.load(copy.deepcopy(base), adapters=[str(a)])
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model(base, a)(ids).logits, atol=ATOL, rtol=0)


def test_generate_with_adapter(llama_setup):
    root, base, a, _ = llama_setup
    model = zoo.load(root / "base", adapters=[str(a)])
    ids = token_ids(batch=1)
    ours = model.generate(ids, max_new_tokens=5, do_sample=False)
    theirs = peft_model(base, a).generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, theirs)


def test_dtype_is_forwarded(llama_setup):
    root, _, a, _ = llama_setup
    model = zoo.load(root / "base", adapters=[str(a)], dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert model(token_ids()).logits.dtype == torch.bfloat16


def test_seq_cls_head_fixes_num_labels(tmp_path):
    base = tiny_bert(num_labels=3)
    base.save_pretrained(tmp_path / "base")
    adapter = make_peft_adapter(base, tmp_path / "cls", r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    # a user may point at the plain encoder checkpoint (2 labels by default): the saved head decides
    base.bert.save_pretrained(tmp_path / "plain")
    model = zoo.load(tmp_path / "plain", adapters=[str(adapter)])
    assert model.classifier.out_features == 3
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model(base, adapter)(ids).logits, atol=ATOL, rtol=0)


def test_gpt2_conv1d_through_the_registry(tmp_path):
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    adapter = make_peft_adapter(base, tmp_path / "g", r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    zoo.add(adapter, name="g")
    model = zoo.load(tmp_path / "base", adapters="g")
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model(base, adapter)(ids).logits, atol=ATOL, rtol=0)


def test_adapter_that_does_not_fit_the_base_names_module_and_shapes(tmp_path):
    small, big = tiny_llama(hidden=32), tiny_llama(hidden=64)
    big.save_pretrained(tmp_path / "big")
    adapter = make_peft_adapter(small, tmp_path / "small-lora", r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(CompositionError, match=r"q_proj.*32.*64|q_proj.*64.*32"):
        zoo.load(tmp_path / "big", adapters=[str(adapter)])


def test_missing_base_is_one_line(tmp_path, llama_setup):
    _, _, a, _ = llama_setup
    with pytest.raises(ZooError, match="folder .*no-such-base' does not exist"):
        zoo.load(tmp_path / "no-such-base", adapters=[str(a)])


def test_merge_and_unmerge_in_memory(llama_setup):
    root, base, a, b = llama_setup
    unmerged = logits_of(zoo.load(root / "base", adapters=[str(a), str(b)]))
    model = zoo.load(root / "base", adapters=[str(a), str(b)], merge=True)
    assert model.zoo_merge_errors == {}  # full precision: nothing to report
    torch.testing.assert_close(logits_of(model), unmerged, atol=ATOL, rtol=0)
    zoo.unmerge(model)
    zoo.detach(model)
    torch.testing.assert_close(logits_of(model), logits_of(base), atol=1e-5, rtol=0)


def test_load_quantized_merge_reports_the_error(llama_setup, tmp_path):
    base = tiny_llama(hidden=64)
    base.save_pretrained(tmp_path / "base")
    adapter = make_peft_adapter(base, tmp_path / "q", r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    model = zoo.load(tmp_path / "base", adapters=[str(adapter)], quantize="nf4", merge=True)
    errors = model.zoo_merge_errors
    assert set(errors) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert all(0 < e.mean_abs <= e.max_abs for e in errors.values())
    with pytest.raises(ZooError, match="unknown quantization"):
        zoo.load(tmp_path / "base", adapters=[str(adapter)], quantize="nf3")


def logits_of(model):
    with torch.no_grad():
        return model(token_ids()).logits
