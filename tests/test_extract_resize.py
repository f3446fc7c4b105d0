"""`zoo extract` and `zoo resize` against the math written out.

Extract: a model that is exactly base + a rank-r LoRA (merged into a sharded checkpoint) is recovered at
rank r — the registered adapter on the base gives the tuned model's logits within 1e-5. Resize: each
module's new factors are the dense truncated SVD of s·B·A, and the reported error is the norm of the
singular values cut (Eckart–Young).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import load_adapter, make_peft_adapter, tiny_llama, token_ids

import zoo
from compose.lora.extract import extract_delta
from compose.lora.lowrank import keep_rank

pytestmark = pytest.mark.filterwarnings("ignore")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(base model, base folder, tuned folder): tuned = base + a rank-3 LoRA on every projection, merged, and a
    changed final norm; both saved in several shards."""
    import copy

    folder = tmp_path_factory.mktemp("extract")
    base = tiny_llama()
    base.save_pretrained(folder / "base", max_shard_size="40KB")
    config, state = load_adapter(make_peft_adapter(base, folder / "lora", r=3, lora_alpha=6, target_modules=TARGETS))
    model = copy.deepcopy(base)
    with torch.no_grad():  # W + s·B·A, written out
        for key, A in state.items():
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                model.get_submodule(module).weight += config.scaling_for(module) * state[f"{module}.lora_B.weight"] @ A
    model.save_pretrained(folder / "tuned", max_shard_size="40KB")
    with torch.no_grad():
        model.model.norm.weight.add_(0.1)
    model.save_pretrained(folder / "tuned-norm", max_shard_size="40KB")
    assert len(list((folder / "tuned").glob("*.safetensors"))) > 2
    return base, folder


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids()).logits


@pytest.mark.parametrize("rule", [["--rank", "3"], ["--sv-threshold", "1e-4"]])
def test_extract_recovers_a_merged_lora_exactly(tuned, zoo_cli, rule):
    from transformers import AutoModelForCausalLM

    base, folder = tuned
    code, out, err = zoo_cli("extract", "--base", folder / "base", "--tuned", folder / "tuned", *rule, "--name", "x", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert len(report["modules"]) == 2 * len(TARGETS) and {m["rank"] for m in report["modules"]} == {3}
    assert all(m["captured"] > 1 - 1e-9 for m in report["modules"]) and not report["not_captured"]
    target = logits(AutoModelForCausalLM.from_pretrained(folder / "tuned").eval())
    ours = logits(zoo.load(folder / "base", "x"))
    torch.testing.assert_close(ours, target, atol=1e-5, rtol=0)
    assert (target - logits(base)).abs().max() > 1e-2


def test_extract_keeps_changed_norms_when_asked(tuned, zoo_cli):
    from transformers import AutoModelForCausalLM

    _, folder = tuned
    code, out, _ = zoo_cli("extract", "--base", folder / "base", "--tuned", folder / "tuned-norm", "--rank", "3", "--name", "n", "--json")
    assert code == 0 and json.loads(out)["not_captured"] == ["model.norm.weight"]
    code, out, _ = zoo_cli("extract", "--base", folder / "base", "--tuned", folder / "tuned-norm", "--rank", "3", "--name", "s", "--save-changed", "--json")
    assert code == 0 and json.loads(out)["saved"] == ["model.norm"]
    assert zoo.show("s").method.modules_to_save == ["model.norm"]
    target = logits(AutoModelForCausalLM.from_pretrained(folder / "tuned-norm").eval())
    torch.testing.assert_close(logits(zoo.load(folder / "base", "s")), target, atol=1e-5, rtol=0)


def test_extract_bad_input(tuned, zoo_cli, tmp_path):
    _, folder = tuned
    for args, message in [
        (["--rank", "3", "--sv-threshold", "0.1"], "exactly one"),
        (["--rank", "0"], "positive"),
    ]:
        code, _, err = zoo_cli("extract", "--base", folder / "base", "--tuned", folder / "tuned", *args, "--name", "bad")
        assert code == 2 and message in err and err.count("\n") == 1
    other = tiny_llama(hidden=64)
    other.save_pretrained(tmp_path / "other")
    code, _, err = zoo_cli("extract", "--base", folder / "base", "--tuned", tmp_path / "other", "--rank", "2", "--name", "bad")
    assert code == 2 and "shape" in err
    assert zoo.list_adapters() == []


def test_extract_refuses_malformed_or_non_finite_checkpoints(tuned, zoo_cli, tmp_path):
    """Headers checked as `zoo merge` checks them (JSON, offsets covering dtype × shape) and non-finite
    weights refused in one line; a NaN both checkpoints share is not a change."""
    import shutil
    import struct

    from safetensors.torch import load_file, save_file

    base, folder = tuned
    base.save_pretrained(tmp_path / "b")
    weights = tmp_path / "b" / "model.safetensors"
    cases = {}
    for case, header in [("badjson", b"{bad"), ("list", b"[]"),
                         ("short", json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 4]}}).encode())]:
        shutil.copytree(tmp_path / "b", tmp_path / case)
        (tmp_path / case / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
        cases[case] = "safetensors"
    state = load_file(weights)
    for case, value in [("nan", float("nan")), ("inf", float("inf"))]:
        shutil.copytree(tmp_path / "b", tmp_path / case)
        changed = dict(state)
        changed["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"].clone()
        changed["model.layers.0.self_attn.q_proj.weight"][0, 0] = value
        save_file(changed, tmp_path / case / "model.safetensors", metadata={"format": "pt"})
        cases[case] = "NaN or ±Inf"
    for case, message in cases.items():
        code, _, err = zoo_cli("extract", "--base", tmp_path / "b", "--tuned", tmp_path / case, "--rank", "2", "--name", "bad")
        assert code == 2 and message in err and err.count("\n") == 1, (case, err)
    code, _, err = zoo_cli("extract", "--base", tmp_path / "nan", "--tuned", tmp_path / "nan", "--rank", "2", "--name", "same")
    assert code == 2 and "same weights" in err
    assert zoo.list_adapters() == []


def test_extract_rank_below_the_delta_is_the_best_approximation():
    torch.manual_seed(0)
    delta = torch.randn(96, 8) @ torch.randn(8, 80) + 0.01 * torch.randn(96, 80)
    got = extract_delta(delta, rank=5)
    S = torch.linalg.svdvals(delta.double())
    assert got.rank == 5 and got.error == pytest.approx(float(S[5:].norm()), rel=1e-3)


@pytest.fixture
def adapter(tmp_path) -> Path:
    """A rank-8 LoRA whose v_proj deltas have rank 2 (so per-module rules cut them more than q_proj's)."""
    model = tiny_llama()
    folder = make_peft_adapter(model, tmp_path / "a", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    for k in state:
        if "v_proj.lora_B" in k:
            state[k][:, 2:] = 0
    save_file(state, path)
    zoo.add(folder, name="a")
    return folder


def test_resize_matches_the_dense_truncated_svd(adapter, zoo_cli):
    code, out, err = zoo_cli("resize", "a", "--rank", "3", "--name", "a3", "--json")
    assert code == 0, err
    report = {m["module"]: m for m in json.loads(out)["modules"]}
    config, state = load_adapter(adapter)
    new_config, new_state = zoo.show("a3").method, _state("a3")
    for module, row in report.items():
        dense = config.scaling_for(module) * (state[f"{module}.lora_B.weight"].double() @ state[f"{module}.lora_A.weight"].double())
        U, S, Vh = torch.linalg.svd(dense)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        ours = new_config.scaling_for(module) * (new_state[f"{module}.lora_B.weight"].double() @ new_state[f"{module}.lora_A.weight"].double())
        torch.testing.assert_close(ours, best, atol=1e-5, rtol=0)
        assert row["error"] == pytest.approx(float(S[3:].norm()), rel=1e-5, abs=1e-6)
        assert row["error"] == pytest.approx(float((dense - ours).norm()), rel=1e-4, abs=1e-6)
    assert {row["rank"] for row in report.values()} == {3}


def test_resize_by_frobenius_share_gives_a_rank_pattern(adapter, zoo_cli):
    code, out, err = zoo_cli("resize", "a", "--sv-fro", "0.999", "--name", "af", "--json")
    assert code == 0, err
    ranks = {m["module"]: m["rank"] for m in json.loads(out)["modules"]}
    assert all(r <= 2 for m, r in ranks.items() if "v_proj" in m) and max(ranks.values()) > 2
    config, state = load_adapter(adapter)
    for module, r in ranks.items():
        dense = config.scaling_for(module) * (state[f"{module}.lora_B.weight"].double() @ state[f"{module}.lora_A.weight"].double())
        S = torch.linalg.svdvals(dense)
        assert r == keep_rank(S, "sv_fro", 0.999)
        assert float(S[:r].norm() / S.norm()) >= 0.999
    manifest = zoo.show("af")
    assert manifest.method.rank_pattern  # ranks vary per module
    zoo.load(tiny_llama(), "af")  # loads: every module's rank agrees with the config
    code, _, err = zoo_cli("resize", "a", "--sv-ratio", "0.5", "--name", "bad")
    assert code == 2 and "≥ 1" in err


def _state(name: str) -> dict[str, torch.Tensor]:
    from zoo.loading import resolve

    return resolve(name).adapters[0].state


def test_extract_from_gpt2_conv1d_loads_in_zoo_and_peft(tmp_path):
    """GPT-2 stores its projections (in, out): ΔW is transposed, the config says fan_in_fan_out, PEFT agrees."""
    import copy

    from tiny import peft_model, tiny_gpt2

    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith(("c_attn.weight", "c_fc.weight")):
                p += 0.05 * torch.randn(p.shape[0], 2, generator=gen) @ torch.randn(2, p.shape[1], generator=gen)
    tuned.save_pretrained(tmp_path / "tuned", max_shard_size="40KB")
    report = zoo.extract(tmp_path / "base", tmp_path / "tuned", rank=2, name="g")
    assert len(report.modules) == 4 and zoo.show("g").method.fan_in_fan_out and zoo.show("g").task_type == "CAUSAL_LM"
    target = logits(tuned)
    torch.testing.assert_close(logits(zoo.load(tmp_path / "base", "g")), target, atol=1e-5, rtol=0)
    from zoo.api import adapter_folder

    torch.testing.assert_close(logits(peft_model(base, adapter_folder(zoo.show("g")))), target, atol=1e-5, rtol=0)
