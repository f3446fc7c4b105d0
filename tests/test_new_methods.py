"""LoHa, LoKr and VeRA in the engine vs PEFT, on tiny Llama, GPT-2 (Conv1D) and BERT: forward, the tensor shapes
the configs predict, merge/unmerge, detach, stacking with LoRA, conversion to LoRA, and what attach refuses.

PEFT's LoHa and LoKr adapt nn.Linear only, so on GPT-2 their oracle is PEFT on a copy whose Conv1D modules are
nn.Linear with the transposed weights (the same function, ΔW in the same (out, in) layout).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from compose.delta import DeltaLayer, attached_deltas, convert_to_lora, merge_deltas, unmerge_deltas
from compose.errors import CompositionError
from compose.ia3.config import IA3Config
from compose.ia3.model import attach_ia3
from compose.loha.config import LoHaConfig
from compose.loha.model import attach_loha, detach_loha
from compose.lokr.config import LoKrConfig
from compose.lokr.model import attach_lokr, detach_lokr
from compose.lora.config import LoraConfig
from compose.lora.layer import base_features
from compose.lora.model import attach_lora
from compose.vera.config import VeraConfig
from compose.vera.model import attach_vera, detach_vera
from tests.tiny import engine_config, peft_model, random_peft_adapter, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from zoo.formats.peft import strip_prefix

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: method → (engine config class, attach, detach, peft config class name)
METHODS = {
    "loha": (LoHaConfig, attach_loha, detach_loha, "LoHaConfig"),
    "lokr": (LoKrConfig, attach_lokr, detach_lokr, "LoKrConfig"),
    "vera": (VeraConfig, attach_vera, detach_vera, "VeraConfig"),
}
LLAMA = ["q_proj", "v_proj", "down_proj"]
GPT2 = ["c_attn", "mlp.c_proj"]
BERT = {"target_modules": ["query", "value", "output.dense"], "task_type": "SEQ_CLS"}  # SEQ_CLS saves the classifier too
#: (method, architecture) → peft config kwargs; together they exercise every option that changes the tensors or the math
CASES = {
    ("loha", "llama"): {"r": 4, "alpha": 6, "target_modules": LLAMA, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    ("loha", "gpt2"): {"r": 3, "alpha": 5, "target_modules": GPT2},
    ("loha", "bert"): {"r": 2, "alpha": 4, **BERT},
    # r=2: w1 whole at (4, 4) factors, decomposed at down_proj (its w1 is (4, 8)); w2 always decomposed
    ("lokr", "llama"): {"r": 2, "alpha": 3, "target_modules": LLAMA, "decompose_both": True, "rank_pattern": {"v_proj": 1}},
    ("lokr", "gpt2"): {"r": 16, "alpha": 4, "target_modules": GPT2, "decompose_factor": 4},  # r ≥ half the sides: whole factors
    ("lokr", "bert"): {"r": 1, "alpha": 2, **BERT, "decompose_factor": 3},  # 3 divides neither 32 nor 64: the search's pair
    ("vera", "llama"): {"r": 8, "target_modules": LLAMA, "projection_prng_key": 7},
    ("vera", "gpt2"): {"r": 4, "target_modules": GPT2, "fan_in_fan_out": True},
    ("vera", "bert"): {"r": 4, **BERT},
    ("vera", "llama-regenerated"): {"r": 8, "target_modules": LLAMA, "projection_prng_key": 3, "save_projection": False},
}
BASES = {"llama": tiny_llama, "llama-regenerated": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def linearized(model: nn.Module) -> nn.Module:
    """A copy of `model` with every transformers Conv1D replaced by the nn.Linear computing the same thing."""
    model = copy.deepcopy(model)
    for path, m in list(model.named_modules()):
        if type(m).__name__ == "Conv1D":
            linear = nn.Linear(*m.weight.shape)
            with torch.no_grad():
                linear.weight.copy_(m.weight.T)
                linear.bias.copy_(m.bias)
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, linear)
    return model


def make_case(tmp_path: Path, method: str, arch: str, seed: int = 0, **overrides):
    """(base, the base PEFT runs on, adapter folder) for CASES[(method, arch)] with random trained tensors."""
    import peft

    base = BASES[arch]()
    oracle_base = linearized(base) if arch == "gpt2" and method != "vera" else base
    peft_config = getattr(peft, METHODS[method][3])(**(CASES[(method, arch)] | overrides))
    return base, oracle_base, random_peft_adapter(oracle_base, tmp_path / f"{method}-{arch}-{seed}", peft_config, seed=seed)


def read(adapter_dir: Path, method: str):
    """The engine's config and state of a saved PEFT adapter (PEFT's `base_model.vera_A` becomes `vera_A`)."""
    raw = json.loads((adapter_dir / "adapter_config.json").read_text())
    return engine_config(METHODS[method][0], raw), strip_prefix(load_file(adapter_dir / "adapter_model.safetensors"))


def attached(base: nn.Module, method: str, adapter_dir: Path, name: str = "a") -> nn.Module:
    model = copy.deepcopy(base)
    METHODS[method][1](model, name, *read(adapter_dir, method))
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """W (out, in) of every module a DeltaLayer wraps, by path."""
    return {path: m.base_weight().detach().clone() for path, m in model.named_modules() if isinstance(m, DeltaLayer)}


@pytest.mark.parametrize("method,arch", CASES)
def test_forward_matches_peft(tmp_path, method, arch):
    base, oracle_base, adapter = make_case(tmp_path, method, arch)
    ids = token_ids()
    expected = logits(peft_model(oracle_base, adapter), ids)
    assert not torch.allclose(expected, logits(base, ids), atol=1e-3)  # the adapter matters
    model = attached(base, method, adapter)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)
    assert attached_deltas(model) == {"a": method}
    if arch == "bert":  # the SEQ_CLS head came along
        assert type(model.classifier).__name__ == "SavedModule"


@pytest.mark.parametrize("method,arch", CASES)
def test_tensor_shapes_are_the_files(tmp_path, method, arch):
    """What estimate and inspect will count: the config's shapes for the model's modules are exactly the file's tensors."""
    base, _, adapter = make_case(tmp_path, method, arch)
    config, state = read(adapter, method)
    model = attached(base, method, adapter)
    targets = {path: base_features(m.base_layer) for path, m in model.named_modules() if isinstance(m, DeltaLayer)}
    on_file = {k: tuple(t.shape) for k, t in state.items() if not k.startswith("classifier.")}
    assert config.tensor_shapes(targets) == on_file


@pytest.mark.parametrize("method,arch", CASES)
def test_merge_and_unmerge_match_peft(tmp_path, method, arch):
    base, oracle_base, adapter = make_case(tmp_path, method, arch)
    ids = token_ids()
    merged_by_peft = peft_model(oracle_base, adapter).merge_and_unload()
    model = attached(base, method, adapter)
    before, unmerged = adapted_weights(model), logits(model, ids)

    merge_deltas(model)
    torch.testing.assert_close(logits(model, ids), logits(merged_by_peft, ids), atol=1e-5, rtol=0)
    for path, weight in adapted_weights(model).items():
        theirs = merged_by_peft.get_submodule(path)
        theirs = theirs.weight.T if type(theirs).__name__ == "Conv1D" else theirs.weight  # (in, out) on GPT-2 itself (VeRA)
        torch.testing.assert_close(weight, theirs, atol=1e-6, rtol=0, msg=path)

    unmerge_deltas(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    for path, weight in adapted_weights(model).items():
        torch.testing.assert_close(weight, before[path], atol=1e-6, rtol=0, msg=path)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("merged", [False, True])
def test_detach_restores_the_original_modules(tmp_path, method, merged):
    base, _, adapter = make_case(tmp_path, method, "bert")
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    METHODS[method][1](model, "a", *read(adapter, method))
    if merged:
        merge_deltas(model)
    METHODS[method][2](model, "a")
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[path] for path, m in model.named_modules())  # the very objects that went in
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6 if merged else 0, rtol=0, msg=k)
    assert attached_deltas(model) == {}


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_stacked_with_lora_matches_peft_mixed(method):
    """A LoRA and a LoHa/LoKr adapter on overlapping modules (q_proj and v_proj have both) against PEFT's mixed model, both active."""
    import peft

    base, ids = tiny_llama(), token_ids()
    lora = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    mixed, state = mixed_model(base, ("lora", peft.LoraConfig(**lora)), ("other", getattr(peft, METHODS[method][3])(**CASES[(method, "llama")])))
    model = copy.deepcopy(base)
    attach_lora(model, "lora", LoraConfig(**lora), state["lora"])
    METHODS[method][1](model, "other", METHODS[method][0](**CASES[(method, "llama")]), state["other"])
    torch.testing.assert_close(logits(model, ids), logits(mixed, ids), atol=1e-5, rtol=0)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, DeltaLayer) and type(q_proj.base_layer).__name__ == "LoraLayer"

    merge_deltas(model)  # the delta into W, the LoRA still on top
    torch.testing.assert_close(logits(model, ids), logits(mixed, ids), atol=1e-5, rtol=0)
    METHODS[method][2](model, "other")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "LoraLayer"


def test_loha_and_lokr_on_one_module_match_peft_mixed():
    """Delta adapters of different methods at one module share its DeltaLayer; their deltas add, as in PEFT's mixed model."""
    import peft

    base, ids = tiny_llama(), token_ids()
    loha, lokr = CASES[("loha", "llama")], CASES[("lokr", "llama")] | {"target_modules": ["q_proj", "o_proj"], "rank_pattern": {"o_proj": 1}}
    mixed, state = mixed_model(base, ("loha", peft.LoHaConfig(**loha)), ("lokr", peft.LoKrConfig(**lokr)))
    model = copy.deepcopy(base)
    attach_loha(model, "loha", LoHaConfig(**loha), state["loha"])
    attach_lokr(model, "lokr", LoKrConfig(**lokr), state["lokr"])
    torch.testing.assert_close(logits(model, ids), logits(mixed, ids), atol=1e-5, rtol=0)
    assert list(model.model.layers[0].self_attn.q_proj.adapters) == ["loha", "lokr"]
    merge_deltas(model)
    torch.testing.assert_close(logits(model, ids), logits(mixed, ids), atol=1e-5, rtol=0)
    detach_loha(model)  # unmerges LoHa's delta only
    q_proj = model.model.layers[0].self_attn.q_proj
    assert list(q_proj.adapters) == q_proj.merged == ["lokr"]
    expected = base.model.layers[0].self_attn.q_proj.weight + q_proj.adapters["lokr"].delta_weight()
    torch.testing.assert_close(q_proj.base_weight(), expected, atol=1e-6, rtol=0)


def mixed_model(base: nn.Module, *adapters) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
    """PEFT's mixed model over a copy of `base` with `adapters` ((name, peft config), …) all active and every trained
    tensor random, and each adapter's tensors as the engine takes them."""
    import peft

    (first, config), *rest = adapters
    mixed = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=first, mixed=True)
    for name, config in rest:
        mixed.add_adapter(name, config)
    mixed.set_adapter([name for name, _ in adapters])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in mixed.named_parameters():
            if any(s in name for s in ("lora_", "hada_", "lokr_")):
                p.copy_(0.3 * torch.randn_like(p))
    # a nested adapter's keys run through the outer layer's base_layer
    strip = lambda k: k.removeprefix("base_model.model.").replace(".base_layer", "")  # noqa: E731
    return mixed.eval(), {n: {strip(k): v for k, v in peft.get_peft_model_state_dict(mixed, adapter_name=n).items()} for n, _ in adapters}


def test_vera_stacked_with_lora_adds_both_deltas(tmp_path):
    """PEFT has no mixed VeRA + LoRA model; written out, the pair is W + ΔW_vera + ΔW_lora, which PEFT builds by merging
    the VeRA adapter and then the LoRA one into the weights."""
    import peft

    base, ids = tiny_gpt2(), token_ids()
    _, _, vera = make_case(tmp_path, "vera", "gpt2")
    lora = random_peft_adapter(base, tmp_path / "lora", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "attn.c_proj"], fan_in_fan_out=True), seed=1)
    both_merged = peft_model(peft_model(base, vera).merge_and_unload(), lora).merge_and_unload()

    model = copy.deepcopy(base)
    lora_config = engine_config(LoraConfig, json.loads((lora / "adapter_config.json").read_text()) | {"init_lora_weights": None})  # True: the ordinary init
    attach_lora(model, "lora", lora_config, strip_prefix(load_file(lora / "adapter_model.safetensors")))
    attach_vera(model, "vera", *read(vera, "vera"))
    torch.testing.assert_close(logits(model, ids), logits(both_merged, ids), atol=1e-5, rtol=0)


def test_two_vera_adapters_stack_as_in_peft(tmp_path):
    base, ids = tiny_llama(), token_ids()
    _, _, a = make_case(tmp_path, "vera", "llama", seed=0)
    _, _, b = make_case(tmp_path, "vera", "llama", seed=1, target_modules=["o_proj", "down_proj"])  # same projection sizes, as PEFT needs
    ref = peft_model(base, a, name="a")
    ref.load_adapter(str(b), adapter_name="b")
    ref.base_model.set_adapter(["a", "b"])
    model = attached(base, "vera", a, "a")
    attach_vera(model, "b", *read(b, "vera"))
    torch.testing.assert_close(logits(model, ids), logits(ref.eval(), ids), atol=1e-5, rtol=0)
    detach_vera(model, "a")
    torch.testing.assert_close(logits(model, ids), logits(peft_model(base, b), ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_conversion_to_lora(tmp_path, method, arch):
    """At full rank the LoRA is the adapter (ΔW = B·A, and the same logits through compose.lora); truncated, it is
    PEFT's `convert_to_lora` and its error is the share of the dropped singular values."""
    import peft

    base, oracle_base, adapter = make_case(tmp_path, method, arch)
    ids = token_ids()
    model = attached(base, method, adapter)
    deltas = {path: m.adapters["a"].delta_weight() for path, m in model.named_modules() if isinstance(m, DeltaLayer)}

    config, state, errors = convert_to_lora(model, "a", 96)  # ≥ min(out, in) of every module: exact
    for path, delta in deltas.items():
        torch.testing.assert_close(state[f"{path}.lora_B.weight"] @ state[f"{path}.lora_A.weight"], delta, atol=1e-5, rtol=0)
        assert errors[path] < 1e-6
    as_lora = copy.deepcopy(base)
    attach_lora(as_lora, "a", config, state)  # BERT's classifier copy comes along
    torch.testing.assert_close(logits(as_lora, ids), logits(peft_model(oracle_base, adapter), ids), atol=1e-5, rtol=0)

    _, state, errors = convert_to_lora(model, "a", 1)
    _, theirs = peft.convert_to_lora(peft_model(oracle_base, adapter), 1)
    theirs = strip_prefix(theirs)
    for path, delta in deltas.items():
        ours = state[f"{path}.lora_B.weight"] @ state[f"{path}.lora_A.weight"]
        torch.testing.assert_close(ours, theirs[f"{path}.lora_B.weight"] @ theirs[f"{path}.lora_A.weight"], atol=1e-5, rtol=0)
        s = torch.linalg.svdvals(delta)
        assert errors[path] == pytest.approx((s[1:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-4)
        assert errors[path] > 0.05  # a real truncation
        assert errors[path] == pytest.approx((torch.linalg.norm(delta - ours) / torch.linalg.norm(delta)).item(), rel=1e-3)

    _, state, errors = convert_to_lora(model, "a", 0.9)  # PEFT's energy threshold: per-module ranks
    _, theirs = peft.convert_to_lora(peft_model(oracle_base, adapter), 0.9)
    assert {k: tuple(t.shape) for k, t in state.items()} == {k: tuple(t.shape) for k, t in strip_prefix(theirs).items()}
    assert all(e ** 2 <= 0.1 + 1e-6 for e in errors.values())


def test_refusals_leave_the_model_untouched(tmp_path):
    base, _, adapter = make_case(tmp_path, "loha", "llama")
    config, state = read(adapter, "loha")
    model = copy.deepcopy(base)

    def refused(match: str, *args) -> None:
        with pytest.raises(CompositionError, match=match):
            attach_loha(model, *args)
        assert not any(isinstance(m, DeltaLayer) for m in model.modules()) and attached_deltas(model) == {}

    refused(r"hada_w1_a' of LoHa adapter 'a' \(r=8\) has shape \(32, 4\) but its config makes it \(32, 8\)", "a", config.model_copy(update={"r": 8}), state)
    incomplete = {k: v for k, v in state.items() if not k.endswith("layers.1.mlp.down_proj.hada_w2_b")}
    refused("hada_w2_b' .* is missing", "a", config, incomplete)
    refused("module 'model.embed_tokens' is a Embedding; LoHa supports Linear", "a", config, state | {"model.embed_tokens.hada_w1_a": torch.zeros(1)})
    refused("has no 'hada_\\*' tensors", "a", config, {})
    ia3 = copy.deepcopy(base)
    attach_ia3(ia3, "s", IA3Config(), {"model.layers.0.self_attn.q_proj.ia3_l": torch.ones(32, 1)})
    with pytest.raises(CompositionError, match="module 'model.layers.0.self_attn.q_proj' is a IA3Layer; LoHa supports Linear"):
        attach_loha(ia3, "a", config, state)

    attach_loha(model, "a", config, state)
    with pytest.raises(CompositionError, match="'a' is already attached"):
        attach_vera(model, "a", VeraConfig(r=8), {"model.layers.0.self_attn.q_proj.vera_lambda_b": torch.zeros(32)})
    with pytest.raises(CompositionError, match="LoKr adapter 'a' is not attached"):
        detach_lokr(model, "a")

    _, _, vera = make_case(tmp_path, "vera", "llama")
    vera_config, vera_state = read(vera, "vera")
    with pytest.raises(CompositionError, match="'vera_A' .* is not one VeRA adapter 'v' \\(r=8\\) stores"):
        attach_vera(model, "v", vera_config.model_copy(update={"save_projection": False}), vera_state)
    small = vera_state | {"vera_B": vera_state["vera_B"][:16]}
    with pytest.raises(CompositionError, match="'vera_B' of VeRA adapter 'v' \\(r=8\\) has shape \\(16, 8\\) but its config makes it \\(32, 8\\)"):
        attach_vera(model, "v", vera_config, small)
    assert attached_deltas(model) == {"a": "loha"}
    with pytest.raises(CompositionError, match="is a DeltaLayer"):  # compose.lora wraps only plain modules: attach LoRA first
        attach_lora(model, "l", LoraConfig(r=1, lora_alpha=1), {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1, 32), "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 1)})


@pytest.mark.parametrize("method", METHODS)
def test_offloaded_base(tmp_path, method):
    """On a base accelerate offloads to disk the adapter gives what it gives on the base loaded whole (its tensors
    on the execution device, not beside the meta weights); merging into offloaded modules is refused."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    whole = LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu").eval()
    kwargs = {k: v for k, v in CASES[(method, "llama")].items() if k not in ("rank_pattern", "alpha_pattern")}
    adapter = random_peft_adapter(whole, tmp_path / "adapter", getattr(peft, METHODS[method][3])(**kwargs), seed=0)
    spread = LlamaForCausalLM.from_pretrained(
        tmp_path / "base", device_map="auto", max_memory={"cpu": "400KB"}, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert any(p.device.type == "meta" for p in spread.parameters())
    for model in (whole, spread):
        METHODS[method][1](model, "a", *read(adapter, method))
    torch.testing.assert_close(logits(spread, token_ids()), logits(whole, token_ids()), atol=1e-5, rtol=0)
    with pytest.raises(CompositionError, match="accelerate offloaded its weights"):
        merge_deltas(spread)
