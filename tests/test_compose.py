"""`zoo compose` / `zoo.load(fusion=...)`: stack and weighted sums, registered and loaded, vs peft."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
from tiny import make_peft_adapter, peft_model, tiny_llama, token_ids
from zoo.composition import compose
from zoo.errors import ZooError

ATOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    common = dict(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    a = make_peft_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, **common)
    b = make_peft_adapter(base, root / "b", seed=2, r=4, lora_alpha=4, use_rslora=True, **common)
    c = make_peft_adapter(base, root / "c", seed=3, r=2, lora_alpha=2, target_modules=["o_proj", "q_proj"], task_type="CAUSAL_LM")
    return root, base, {"a": a, "b": b, "c": c}


@pytest.fixture
def registered(setup):
    root, base, folders = setup
    for name, folder in folders.items():
        zoo.add(folder, name=name)
    return root, base, folders


def logits(model, ids=None):
    with torch.no_grad():
        return model(token_ids() if ids is None else ids).logits


def peft_stack(base, folders, names):
    model = peft_model(base, folders[names[0]], names[0])
    for n in names[1:]:
        model.load_adapter(str(folders[n]), adapter_name=n)
    model.base_model.set_adapter(names)
    return model


def test_stack_equals_peft_with_all_active(registered):
    root, base, folders = registered
    m = compose("a+b+c", fusion="stack", name="abc")
    assert m.kind == "composition" and [x.name for x in m.members] == ["a", "b", "c"]
    torch.testing.assert_close(logits(zoo.load(root / "base", adapters="abc")), logits(peft_stack(base, folders, ["a", "b", "c"])), atol=ATOL, rtol=0)


def test_weighted_cat_is_exact_and_loads_in_peft(registered):
    root, base, folders = registered
    m = compose("a+b+c", fusion="weighted", method="cat", weights=[0.7, -0.4, 1.5], name="w")
    assert m.kind == "adapter" and m.source.kind == "composition" and m.source.recipe["method"] == "cat"
    ours = logits(zoo.load(root / "base", adapters="w"))
    # the written folder is a PEFT adapter: peft loads it to the same outputs
    folder = zoo.api.adapter_folder(m)
    torch.testing.assert_close(logits(peft_model(base, folder)), ours, atol=ATOL, rtol=0)
    # and it equals peft's own add_weighted_adapter(cat) on the same adapters
    reference = peft_stack(base, folders, ["a", "b", "c"])
    reference.add_weighted_adapter(["a", "b", "c"], [0.7, -0.4, 1.5], "w", combination_type="cat")
    reference.set_adapter("w")
    torch.testing.assert_close(ours, logits(reference), atol=ATOL, rtol=0)


def test_weighted_cat_with_unit_weights_equals_stack(registered):
    root, _, _ = registered
    stacked = logits(zoo.load(root / "base", adapters="a+b"))
    torch.testing.assert_close(logits(zoo.load(root / "base", adapters="a+b", fusion="weighted", method="cat")), stacked, atol=ATOL, rtol=0)


def test_weighted_svd_full_rank_is_exact_and_truncation_matches_peft(registered):
    root, base, folders = registered
    cat = logits(zoo.load(root / "base", adapters="a+b", fusion="weighted", method="cat", weights=[0.5, 2.0]))
    full = logits(zoo.load(root / "base", adapters="a+b", fusion="weighted", method="svd", rank=8, weights=[0.5, 2.0]))
    torch.testing.assert_close(full, cat, atol=ATOL, rtol=0)
    ours = logits(zoo.load(root / "base", adapters="a+b", fusion="weighted", method="svd", rank=3, weights=[0.5, 2.0]))
    reference = peft_stack(base, folders, ["a", "b"])
    reference.add_weighted_adapter(["a", "b"], [0.5, 2.0], "s", combination_type="svd", svd_rank=3)
    reference.set_adapter("s")
    torch.testing.assert_close(ours, logits(reference), atol=1e-4, rtol=0)
    assert (ours - cat).abs().max() > 1e-4  # rank 3 really truncates


@pytest.mark.parametrize("method, extra", [("linear", {}), ("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.5})])
def test_factor_methods_equal_peft(registered, method, extra):
    root, base, folders = registered
    m = compose("a+b", fusion="weighted", method=method, weights=[0.6, 0.9], name=f"m-{method}", **extra)
    reference = peft_stack(base, folders, ["a", "b"])
    reference.add_weighted_adapter(["a", "b"], [0.6, 0.9], "m", combination_type=method, **extra)
    reference.set_adapter("m")
    # peft copies use_rslora from adapter a (False here), so its scaling is 1 like ours
    torch.testing.assert_close(logits(zoo.load(root / "base", adapters=m.name)), logits(reference), atol=ATOL, rtol=0)


def test_members_must_fit_each_other(registered, tmp_path):
    root, _, _ = registered
    wide = tiny_llama(hidden=64)
    zoo.add(make_peft_adapter(wide, tmp_path / "wide", r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"), name="wide")
    with pytest.raises(ZooError, match=r"wide and a disagree on module model\.layers\.0\.self_attn\.q_proj: in/out 64/64 vs 32/32"):
        compose("a+wide", fusion="stack", name="bad")
    with pytest.raises(ZooError, match="already exists"):
        compose("a+b", fusion="stack", name="a")
    with pytest.raises(ZooError, match=r"module model\.layers\.0\.self_attn\.q_proj \(a, c\): 'linear' needs equal ranks"):
        compose("a+c", fusion="weighted", method="linear", name="lin")
    assert [m.name for m in zoo.list_adapters()] == ["a", "b", "c", "wide"]


def test_cli_compose_and_list(registered, zoo_cli):
    code, out, err = zoo_cli("compose", "a+b", "--fusion", "weighted", "--method", "svd", "--rank", "4", "--weights", "0.7,0.3", "--name", "ab")
    assert code == 0, err
    assert out.startswith("composed ab@1 (weighted) from a+b")
    entry = json.loads(zoo_cli("show", "ab", "--json")[1])
    assert entry["method"]["r"] == 4 and entry["source"]["recipe"]["weights"] == [0.7, 0.3]
    code, _, err = zoo_cli("compose", "a+b", "--weights", "x,y", "--fusion", "weighted", "--name", "bad")
    assert code == 2 and "comma-separated" in err
    assert zoo_cli("compose", "a+b", "--name", "stacked")[0] == 0
    code, out, _ = zoo_cli("list", "--method", "stack")
    assert "stacked" in out and "a+b" in out


def test_cli_merge_of_a_stack_equals_the_unmerged_stack(registered, zoo_cli, tmp_path):
    from transformers import LlamaForCausalLM

    root, _, _ = registered
    assert zoo_cli("compose", "a+b", "--name", "ab")[0] == 0
    code, out, err = zoo_cli("merge", "ab", "--base", root / "base", "--out", tmp_path / "merged")
    assert code == 0, err
    assert out.startswith("merged ab into")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), logits(zoo.load(root / "base", adapters="ab")), atol=ATOL, rtol=0)
    code, _, err = zoo_cli("merge", "ab", "--base", root / "base", "--out", tmp_path / "merged")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1  # refuses to overwrite
