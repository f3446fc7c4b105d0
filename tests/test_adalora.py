"""AdaLoRA through the LoRA engine vs PEFT's own AdaLoRA: pruned adapters saved by PEFT, loaded without it."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compose.adalora.config import AdaLoraConfig
from compose.adalora.model import adalora_to_lora, attach_adalora, detach_adalora
from compose.errors import CompositionError
from compose.lora.layer import LoraLayer
from compose.lora.model import attach_lora, attached_adapters, set_active_adapters
from compose.lora.state import lora_state
from compose.modules import get_module
from tests.tiny import (
    make_peft_adapter,
    peft_model,
    read_peft_adapter,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
pytestmark = [  # PEFT's notices about rank-0 modules and about AdaLoRA's masks not being LoRA rank patterns
    pytest.mark.filterwarnings("ignore:.*invalid shape"),
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys"),
]


def make_peft_adalora(base, out_dir, seed: int = 0, prune: bool = True, **kwargs) -> Path:
    """Save a PEFT AdaLoRA adapter for `base` whose A, E, B are random (PEFT starts E at 0) and, with
    `prune`, whose rank_pattern prunes each module differently: the first to rank 0, the second not at
    all, the rest by random masks (as `update_and_allocate` leaves it after its final budget step)."""
    import peft

    torch.manual_seed(seed)
    kwargs = {"init_r": 4, "target_r": 2, "lora_alpha": 8, "total_step": 10, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out / r notices
        model = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.3)
            elif "modules_to_save" in name:  # else the saved copy equals the original
                p.add_(0.1 * torch.randn_like(p))
    if prune:
        generator = torch.Generator().manual_seed(seed)
        names = sorted(n.removeprefix("base_model.model.").removesuffix(".default") for n, _ in model.named_parameters() if ".lora_E." in n)
        init_r = kwargs["init_r"]
        masks = [[False] * init_r, [True] * init_r] + [(torch.rand(init_r, generator=generator) < 0.6).tolist() for _ in names[2:]]
        model.peft_config["default"].rank_pattern = dict(zip(names, masks))
    model.save_pretrained(out_dir)
    return Path(out_dir)


def ours(base, adapter_dir: Path, name: str = "default"):
    model = copy.deepcopy(base)
    attach_adalora(model, name, *read_peft_adapter(adapter_dir, AdaLoraConfig))
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def merge_all(model) -> None:
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.merge()


@pytest.mark.parametrize("lora_alpha", [8, 0])  # 0: PEFT scales by the module's rank instead of alpha
def test_llama_pruned_matches_peft(tmp_path, lora_alpha):
    base, ids = tiny_llama(), token_ids()
    adapter = make_peft_adalora(base, tmp_path / "a", target_modules=LLAMA_TARGETS, lora_alpha=lora_alpha)
    config, _state = read_peft_adapter(adapter, AdaLoraConfig)
    ranks = {m: sum(mask) for m, mask in config.masks().items()}
    assert min(set(ranks.values())) == 0 and max(ranks.values()) == 4 and len(set(ranks.values())) >= 3

    model = ours(base, adapter)
    expected = logits(peft_model(base, adapter), ids)
    assert not torch.allclose(expected, logits(base, ids), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)
    for path, rank in ranks.items():  # pruned to rank 0: no layer; the others keep exactly their kept rows
        layer = get_module(model, path)
        assert (rank == 0) != isinstance(layer, LoraLayer)
        if rank:
            assert layer.adapters["default"].lora_A.shape[0] == rank


def test_unpruned_adapter_matches_peft(tmp_path):
    """No rank_pattern (saved before the budget was allocated): every module at init_r."""
    base, ids = tiny_llama(), token_ids()
    adapter = make_peft_adalora(base, tmp_path / "a", prune=False, target_modules=LLAMA_TARGETS, init_r=3)
    assert read_peft_adapter(adapter, AdaLoraConfig)[0].rank_pattern is None
    torch.testing.assert_close(logits(ours(base, adapter), ids), logits(peft_model(base, adapter), ids), atol=1e-5, rtol=0)


def test_gpt2_conv1d_matches_peft(tmp_path):
    base, ids = tiny_gpt2(), token_ids()
    adapter = make_peft_adalora(base, tmp_path / "a", target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True)
    expected = logits(peft_model(base, adapter), ids)
    assert not torch.allclose(expected, logits(base, ids), atol=1e-3)
    torch.testing.assert_close(logits(ours(base, adapter), ids), expected, atol=1e-5, rtol=0)


def test_bert_seq_cls_with_saved_head_matches_peft(tmp_path):
    base, ids = tiny_bert(), token_ids()
    adapter = make_peft_adalora(base, tmp_path / "a", target_modules=["query", "value", "intermediate.dense"], task_type="SEQ_CLS")
    config, state = read_peft_adapter(adapter, AdaLoraConfig)
    assert "classifier.weight" in state and "classifier" in config.modules_to_save
    torch.testing.assert_close(logits(ours(base, adapter), ids), logits(peft_model(base, adapter), ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make_base, targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "mlp.c_proj"])])
def test_merge_matches_peft_merge_and_unload(tmp_path, make_base, targets):
    base, ids = make_base(), token_ids()
    adapter = make_peft_adalora(base, tmp_path / "a", target_modules=targets)
    merged_by_peft = peft_model(base, adapter).merge_and_unload()
    model = ours(base, adapter)
    unmerged = logits(model, ids)
    merge_all(model)
    torch.testing.assert_close(logits(model, ids), logits(merged_by_peft, ids), atol=1e-5, rtol=0)
    ours_weights = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    for name, p in merged_by_peft.named_parameters():
        torch.testing.assert_close(ours_weights[name], p, atol=1e-6, rtol=0)
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.unmerge()
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)


def test_two_adalora_adapters_stack_as_in_peft(tmp_path):
    base, ids = tiny_llama(), token_ids()
    first = make_peft_adalora(base, tmp_path / "a", seed=0, target_modules=LLAMA_TARGETS)
    second = make_peft_adalora(base, tmp_path / "b", seed=1, target_modules=["q_proj", "up_proj"], init_r=3)
    reference = peft_model(base, first)
    reference.load_adapter(str(second), adapter_name="b")
    reference.base_model.set_adapter(["default", "b"])
    model = ours(base, first)
    attach_adalora(model, "b", *read_peft_adapter(second, AdaLoraConfig))
    expected = logits(reference, ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)
    set_active_adapters(model, ["default"])  # it is a LoRA adapter to compose.lora
    assert not torch.allclose(logits(model, ids), expected, atol=1e-3)


def test_stacks_with_plain_lora_and_detaches_alone(tmp_path):
    """An AdaLoRA and a LoRA adapter on the same modules add up (oracle: PEFT's LoRA over PEFT's AdaLoRA
    merged into the base); detach_adalora(model) then takes the AdaLoRA off and leaves the LoRA."""
    from compose.lora.config import LoraConfig

    base, ids = tiny_llama(), token_ids()
    ada = make_peft_adalora(base, tmp_path / "ada", target_modules=LLAMA_TARGETS)
    lora_dir = make_peft_adapter(base, tmp_path / "lora", target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4)
    lora_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    lora_tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(lora_dir / "adapter_model.safetensors").items()}

    model = ours(base, ada, name="ada")
    attach_lora(model, "lora", lora_config, lora_tensors)
    expected = logits(peft_model(peft_model(base, ada).merge_and_unload(), lora_dir), ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)

    detach_adalora(model)
    assert attached_adapters(model) == ["lora"]
    torch.testing.assert_close(logits(model, ids), logits(peft_model(base, lora_dir), ids), atol=1e-5, rtol=0)
    detach_adalora(model)  # nothing left to detach: a no-op
    with pytest.raises(CompositionError, match="'ada' is not attached"):
        detach_adalora(model, "ada")


def test_detach_restores_the_model(tmp_path):
    base, ids = tiny_llama(), token_ids()
    adapter = make_peft_adalora(base, tmp_path / "a", target_modules=LLAMA_TARGETS)
    model = ours(base, adapter)
    assert detach_adalora(model, "default") is model
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=0, rtol=0)


def test_conversion_is_lora_with_scaled_rows(tmp_path):
    """Written out: A' = E⊙A, B' = B, scaling = alpha/(init_r + 1e-5) whatever the kept rank."""
    adapter = make_peft_adalora(tiny_llama(), tmp_path / "a", target_modules=LLAMA_TARGETS)
    config, state = read_peft_adapter(adapter, AdaLoraConfig)
    lora_config, lora = adalora_to_lora(config, state)
    for module, mask in config.masks().items():
        if not any(mask):
            assert f"{module}.lora_A.weight" not in lora
            continue
        A, E, B = (state[f"{module}.{f}"] for f in ("lora_A", "lora_E", "lora_B"))
        torch.testing.assert_close(lora[f"{module}.lora_A.weight"], E * A, atol=0, rtol=0)
        assert lora[f"{module}.lora_B.weight"] is B
        assert lora_config.rank_for(module) == sum(mask)
        assert lora_config.scaling_for(module) == pytest.approx(8 / (4 + 1e-5), rel=1e-12)


def _pruned(tmp_path):
    adapter = make_peft_adalora(tiny_llama(), tmp_path / "a", target_modules=LLAMA_TARGETS)
    config, state = read_peft_adapter(adapter, AdaLoraConfig)
    module = next(m for m, mask in config.masks().items() if 0 < sum(mask) < config.init_r)
    return config, state, module


def test_rank_disagreeing_with_rank_pattern_is_refused(tmp_path):
    config, state, _module = _pruned(tmp_path)
    full = config.model_copy(update={"rank_pattern": {k: [True] * 4 for k in config.rank_pattern}})
    with pytest.raises(CompositionError, match="do not have rank 4 .rank_pattern keeps 4 of 4"):
        adalora_to_lora(full, state)
    with pytest.raises(CompositionError, match="not in rank_pattern, so it has init_r=4"):
        adalora_to_lora(config.model_copy(update={"rank_pattern": None}), state)


def test_bad_config_and_tensors_are_refused(tmp_path):
    config, state, module = _pruned(tmp_path)
    key = f"{module}.lora_E"
    with pytest.raises(CompositionError, match="has 3 entries but init_r is 4"):
        adalora_to_lora(config.model_copy(update={"rank_pattern": {key: [True] * 3}}), state)
    with pytest.raises(CompositionError, match="does not name a module's lora_E"):
        adalora_to_lora(config.model_copy(update={"rank_pattern": {module: [True] * 4}}), state)
    with pytest.raises(CompositionError, match=rf"module '{module}' lacks \['lora_E'\]"):
        adalora_to_lora(config, {k: v for k, v in state.items() if k != key})


def test_wrong_model_is_refused_and_leaves_it_untouched(tmp_path):
    config, state, _ = _pruned(tmp_path)
    wider = tiny_llama(hidden=64)
    with pytest.raises(CompositionError, match="do not fit the base"):
        attach_adalora(wider, "a", config, state)
    assert not any(isinstance(m, LoraLayer) for m in wider.modules()) and not getattr(wider, "_compose_adalora", None)
    with pytest.raises(CompositionError, match="not found in GPT2LMHeadModel"):
        attach_adalora(tiny_gpt2(), "a", config, state)


def test_adapter_pruned_to_nothing_is_refused(tmp_path):
    config, state, _ = _pruned(tmp_path)
    nothing = config.model_copy(update={"rank_pattern": {k: [False] * 4 for k in config.rank_pattern}})
    empty = {k: (v[:0] if k.endswith(("lora_A", "lora_E")) else v[:, :0]) for k, v in state.items()}
    with pytest.raises(CompositionError, match="no module left with rank > 0"):
        attach_adalora(tiny_llama(), "a", nothing, empty)


def test_saved_tensors_round_trip_as_lora(tmp_path):
    """`lora_state` of an attached AdaLoRA adapter is the converted LoRA (what a LoRA export would write)."""
    config, state, _ = _pruned(tmp_path)
    model = tiny_llama()
    attach_adalora(model, "a", config, state)
    _, lora = adalora_to_lora(config, state)
    exported = lora_state(model, "a")
    assert exported.keys() == lora.keys()
    for k in lora:
        torch.testing.assert_close(exported[k], lora[k].float(), atol=0, rtol=0)
