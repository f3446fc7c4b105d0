"""Adapters on a base that accelerate spreads over memory and disk (`device_map` with offload).

A 4-layer Llama loaded with `device_map="auto"`, a CPU budget that holds its embeddings and first layer,
and the rest offloaded to disk (or all of it, for methods that act at the embeddings): those modules
keep meta tensors and get their weights from the offload files at each forward. Every adapter kind must give what it gives on the same base loaded whole
(`device_map="cpu"`) and what PEFT gives, fp32 within 1e-5; merges into offloaded modules are refused.
"""

from __future__ import annotations

import pytest
import torch
from test_bottleneck import PFEIFFER, random_state
from tiny import VOCAB, make_peft_adapter, random_peft_adapter, token_ids
from transformers import LlamaConfig, LlamaForCausalLM

import zoo
from compose.bottleneck.model import attach_bottleneck
from compose.errors import CompositionError
from compose.lora.layer import LoraLayer
from compose.methods import merge

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import peft

    root = tmp_path_factory.mktemp("offload")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(root / "base")
    adapters = {
        "a": make_peft_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
        "b": make_peft_adapter(base, root / "b", seed=2, r=2, lora_alpha=4, target_modules=TARGETS, task_type="CAUSAL_LM"),
        "ia3": random_peft_adapter(base, root / "ia3", peft.IA3Config(target_modules=["k_proj", "up_proj"], feedforward_modules=["up_proj"],
                                                                      task_type="CAUSAL_LM"), seed=3),
        "prompt": random_peft_adapter(base, root / "prompt", peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), seed=4),
        "prefix": random_peft_adapter(base, root / "prefix", peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), seed=5),
    }
    return root, base, {k: str(v) for k, v in adapters.items()}


def offload(root, cpu: str = "400KB") -> dict:
    """from_pretrained arguments that leave the embeddings and layer 0 in memory and offload the rest to disk
    (with `cpu="1KB"`: everything on disk, the embeddings too)."""
    return dict(device_map="auto", max_memory={"cpu": cpu}, offload_folder=str(root / f"offload-{cpu}"))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(token_ids()).logits


def assert_offloaded(model: torch.nn.Module) -> None:
    """Some adapted modules are offloaded (meta weights), some are not: both kinds are exercised."""
    assert {"cpu", "disk"} <= set(model.hf_device_map.values()), model.hf_device_map
    wrapped = [m.base_layer.weight.device.type for m in model.modules() if hasattr(m, "base_layer")]
    assert "meta" in wrapped and "cpu" in wrapped, wrapped


def peft_reference(base: torch.nn.Module, folders: list[str]) -> torch.Tensor:
    """PEFT's logits with `folders` loaded and all active, on the base in memory."""
    import copy

    import peft

    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), folders[0], adapter_name="n0").eval()
    for i, folder in enumerate(folders[1:], 1):
        ref.load_adapter(folder, adapter_name=f"n{i}")
    ref.base_model.set_adapter([f"n{i}" for i in range(len(folders))])
    return logits(ref)


@pytest.mark.parametrize("names", [["a"], ["a", "b"], ["ia3"]], ids=["lora", "stack", "ia3"])
def test_adapters_on_offloaded_modules_equal_the_base_in_memory_and_peft(setup, names):
    root, base, folders = setup
    chosen = [folders[n] for n in names]
    model = zoo.load(root / "base", chosen, **offload(root))
    assert_offloaded(model)
    ours, whole = logits(model), logits(zoo.load(root / "base", chosen, device_map="cpu"))
    torch.testing.assert_close(ours, whole, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours, peft_reference(base, chosen), atol=ATOL, rtol=0)
    assert (ours - logits(base)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("fusion", ["attention", "weighted"])
def test_fusions_on_offloaded_modules_equal_the_base_in_memory(setup, fusion):
    root, _, folders = setup
    kwargs = dict(fusion=fusion) | (dict(method="svd", rank=6, weights=[0.7, 0.3]) if fusion == "weighted" else {})
    model = zoo.load(root / "base", [folders["a"], folders["b"]], **kwargs, **offload(root))
    assert_offloaded(model)
    whole = zoo.load(root / "base", [folders["a"], folders["b"]], **kwargs, device_map="cpu")
    torch.testing.assert_close(logits(model), logits(whole), atol=ATOL, rtol=0)
    assert (logits(whole) - logits(zoo.load(root / "base", [folders["a"]], device_map="cpu"))).abs().max() > 100 * ATOL


@pytest.mark.parametrize("kind", ["prompt", "prefix", "mixed"])
def test_virtual_tokens_and_mixed_batches_on_a_base_entirely_on_disk(setup, kind):
    root, base, folders = setup
    names, kwargs = ([folders["a"], folders["b"]], dict(mixed=True)) if kind == "mixed" else ([folders[kind]], {})
    rows = dict(adapter_ids=torch.tensor([1, -1])) if kind == "mixed" else {}  # row 0 runs b, row 1 the base
    model = zoo.load(root / "base", names, **kwargs, **offload(root, cpu="1KB"))
    assert set(model.hf_device_map.values()) == {"disk"}
    whole = zoo.load(root / "base", names, **kwargs, device_map="cpu")
    with torch.no_grad():
        ours, ref = model(token_ids(), **rows).logits, whole(token_ids(), **rows).logits
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert (ref[0, -1] - logits(base)[0, -1]).abs().max() > 100 * ATOL


def test_bottleneck_on_offloaded_layers_equals_the_base_in_memory(setup):
    root, base, _ = setup
    model = zoo.load(root / "base", model_class=LlamaForCausalLM, **offload(root))
    whole = zoo.load(root / "base", model_class=LlamaForCausalLM, device_map="cpu")
    state = random_state(base, PFEIFFER)
    for m in (model, whole):
        attach_bottleneck(m, "bn", PFEIFFER, state)
    assert "disk" in model.hf_device_map.values() and model.model.layers[3].mlp.up_proj.weight.device.type == "meta"
    assert {p.device.type for n, p in model.named_parameters() if ".adapters.bn." in n} == {"cpu"}
    torch.testing.assert_close(logits(model), logits(whole), atol=ATOL, rtol=0)
    assert (logits(whole) - logits(base)).abs().max() > 100 * ATOL


def test_merge_into_offloaded_modules_is_refused_and_changes_nothing(setup):
    root, _, folders = setup
    with pytest.raises(CompositionError, match=r"^cannot merge into 'model\.layers\.\d\.self_attn\.q_proj' \(\d+ adapted module\(s\) in all\): accelerate offloaded its weights") as error:
        zoo.load(root / "base", [folders["a"]], merge=True, **offload(root))
    assert "\n" not in str(error.value)
    model = zoo.load(root / "base", [folders["a"], folders["ia3"]], **offload(root))
    before = logits(model)
    with pytest.raises(CompositionError, match="offloaded"):
        merge(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLayer))
    torch.testing.assert_close(logits(model), before, atol=0, rtol=0)


def test_wrappers_do_not_answer_for_accelerate_hooks(setup):
    """accelerate marks the modules it dispatched (`_hf_hook`); a LoRA layer that answered for its base layer's
    hook would look dispatched itself, and removing the hooks would fail on it."""
    from accelerate.hooks import remove_hook_from_submodules

    root, _, folders = setup
    model = zoo.load(root / "base", [folders["a"]], **offload(root))
    q_proj = model.model.layers[1].self_attn.q_proj
    assert isinstance(q_proj, LoraLayer) and hasattr(q_proj.base_layer, "_hf_hook") and not hasattr(q_proj, "_hf_hook")
    remove_hook_from_submodules(model)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
