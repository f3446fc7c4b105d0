"""Every PEFT method through the zoo: `zoo add` → registry → `zoo.load` equals peft; compositions that
make sense work, the others fail in one line."""

from __future__ import annotations


import pytest
import torch

import zoo
from compose.errors import CompositionError
from tiny import make_peft_adapter, peft_model, random_peft_adapter, tiny_llama, token_ids
from zoo.errors import ZooError

ATOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import peft

    root = tmp_path_factory.mktemp("methods")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    task = dict(task_type="CAUSAL_LM")
    folders = {
        "ada": random_peft_adapter(base, root / "ada", peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"], **task), 1),
        "ia3-a": random_peft_adapter(base, root / "ia3-a", peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], **task), 2),
        "ia3-b": random_peft_adapter(base, root / "ia3-b", peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], **task), 3),
        "prefix": random_peft_adapter(base, root / "prefix", peft.PrefixTuningConfig(num_virtual_tokens=3, **task), 4),
        "prompt": random_peft_adapter(base, root / "prompt", peft.PromptTuningConfig(num_virtual_tokens=4, **task), 5),
        "ptuning": random_peft_adapter(base, root / "ptuning", peft.PromptEncoderConfig(num_virtual_tokens=2, encoder_hidden_size=16, **task), 6),
        "lora": make_peft_adapter(base, root / "lora", seed=7, r=4, lora_alpha=8, target_modules=["o_proj"], **task),
    }
    return root, base, folders


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name, method", [("ada", "adalora"), ("ia3-a", "ia3"), ("prefix", "prefix"), ("prompt", "prompt"), ("ptuning", "ptuning")])
def test_add_then_load_equals_peft(setup, name, method):
    root, base, folders = setup
    manifest = zoo.add(folders[name], name=name)
    assert manifest.method.method == method and manifest.format == "peft"
    assert manifest.size.trainable_params == sum(p.numel() for p in peft_model(base, folders[name]).state_dict().values()) - sum(
        p.numel() for p in base.state_dict().values()
    ) or manifest.size.trainable_params > 0  # prompt learning: the stored embeddings only
    model = zoo.load(root / "base", adapters=[name])
    ids = token_ids()
    torch.testing.assert_close(logits(model, ids), logits(peft_model(base, folders[name]), ids), atol=ATOL, rtol=0)
    assert (logits(model, ids)[:, -ids.shape[1]:] - logits(base, ids)).abs().max() > 1e-3
    zoo.detach(model)
    torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=0, rtol=0)


def test_merges_of_adalora_and_ia3_equal_peft_merge_and_unload(setup):
    root, base, folders = setup
    ids = token_ids()
    for name in ("ada", "ia3-a"):
        merged = zoo.load(root / "base", adapters=[folders[name]], merge=True)
        reference = peft_model(base, folders[name]).merge_and_unload()
        torch.testing.assert_close(logits(merged, ids), logits(reference, ids), atol=ATOL, rtol=0)
        zoo.unmerge(merged)
        torch.testing.assert_close(logits(merged, ids), logits(peft_model(base, folders[name]), ids), atol=ATOL, rtol=0)


def test_streaming_merge_of_adalora_equals_peft(setup, tmp_path):
    root, base, folders = setup
    zoo.merge(folders["ada"], base=root / "base", out=tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, token_ids()), logits(peft_model(base, folders["ada"]).merge_and_unload(), token_ids()), atol=ATOL, rtol=0)
    with pytest.raises(ZooError, match="IA3 adapter 'ia3-a' scales weights"):
        zoo.merge(folders["ia3-a"], base=root / "base", out=tmp_path / "ia3")


def test_weighted_ia3_equals_peft_add_weighted_adapter(setup):
    root, base, folders = setup
    model = zoo.load(root / "base", adapters=[folders["ia3-a"], folders["ia3-b"]], fusion="weighted", weights=[0.7, -0.4])
    reference = peft_model(base, folders["ia3-a"], name="ia3-a")
    reference.load_adapter(str(folders["ia3-b"]), adapter_name="ia3-b")
    reference.add_weighted_adapter(["ia3-a", "ia3-b"], [0.7, -0.4], adapter_name="mix")
    reference.set_adapter("mix")
    ids = token_ids()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=ATOL, rtol=0)


def test_weighted_composition_of_ia3_is_registered_in_peft_format(setup):
    root, base, folders = setup
    zoo.add(folders["ia3-a"], name="wa")
    zoo.add(folders["ia3-b"], name="wb")
    entry = zoo.compose("wa+wb", fusion="weighted", weights=[0.5, 0.5], name="wab")
    assert entry.method.method == "ia3" and entry.source.recipe["weights"] == [0.5, 0.5]
    direct = zoo.load(root / "base", adapters="wa+wb", fusion="weighted", weights=[0.5, 0.5])
    ids = token_ids()
    torch.testing.assert_close(logits(zoo.load(root / "base", adapters="wab"), ids), logits(direct, ids), atol=ATOL, rtol=0)


def test_weighted_adalora_with_lora_is_one_lora(setup):
    root, base, folders = setup
    model = zoo.load(root / "base", adapters=[folders["ada"], folders["lora"]], fusion="weighted", method="cat")
    stacked = zoo.load(root / "base", adapters=[folders["ada"], folders["lora"]])
    ids = token_ids()
    torch.testing.assert_close(logits(model, ids), logits(stacked, ids), atol=ATOL, rtol=0)  # cat is exact


def test_stacks_across_methods_equal_their_parts(setup):
    """IA3 on k/down + LoRA on o: each acts on its own modules; prompts concatenate."""
    root, base, folders = setup
    ids = token_ids()
    both = zoo.load(root / "base", adapters=[folders["ia3-a"], folders["lora"]])
    reference = peft_model(base, folders["ia3-a"]).merge_and_unload()
    reference = peft_model(reference, folders["lora"])
    torch.testing.assert_close(logits(both, ids), logits(reference, ids), atol=ATOL, rtol=0)
    prompts = zoo.load(root / "base", adapters=[folders["prompt"], folders["ptuning"]])
    assert logits(prompts, ids).shape[1] == ids.shape[1] + 4 + 2


@pytest.mark.parametrize(
    "adapters, kwargs, message",
    [
        (["prefix"], dict(merge=True), "cannot merge prefix adapter 'prefix' into the weights"),
        (["prompt"], dict(merge=True), "cannot merge prompt adapter 'prompt'"),
        (["prompt", "ptuning"], dict(fusion="attention"), "cannot fuse prompt adapter 'prompt' with attention"),
        (["ia3-a", "ia3-b"], dict(fusion="attention"), "cannot fuse ia3 adapter 'ia3-a'"),
        (["prompt"], dict(drop=1), "AdapterDrop cannot skip prompt adapter 'prompt'"),
        (["ia3-a", "lora"], dict(fusion="weighted"), "a weighted sum combines LoRA/AdaLoRA adapters into one LoRA"),
        (["prefix", "prompt"], dict(), "prompt"),
    ],
)
def test_compositions_that_make_no_sense_fail_in_one_line(setup, adapters, kwargs, message):
    root, base, folders = setup
    with pytest.raises((ZooError, CompositionError), match=message) as error:
        zoo.load(root / "base", adapters=[folders[a] for a in adapters], **kwargs)
    assert "\n" not in str(error.value)


def test_cli_lists_and_inspects_every_method(setup, zoo_cli):
    root, base, folders = setup
    for name in ("ada", "ia3-a", "prefix", "prompt"):
        code, _, err = zoo_cli("add", folders[name], "--name", f"cli-{name}")
        assert code == 0, err
    code, out, err = zoo_cli("list")
    assert code == 0, err
    for shape in ("adalora", "r=4→2", "ia3", "prefix", "3 tokens", "prompt", "4 tokens"):
        assert shape in out


def test_weighted_ia3_refuses_lora_only_options(setup):
    root, base, folders = setup
    with pytest.raises(ZooError, match="IA3 vectors combine linearly"):
        zoo.load(root / "base", adapters=[folders["ia3-a"], folders["ia3-b"]], fusion="weighted", method="ties", density=0.5)


def test_lora_on_a_module_scaled_by_ia3_is_refused_clearly(setup):
    root, base, folders = setup
    with pytest.raises(CompositionError, match="already scaled by an IA3 adapter"):
        zoo.load(root / "base", adapters=[folders["ia3-b"], folders["ada"]])


def test_zoo_load_mixed_rows_equal_each_adapter_alone(setup):
    root, base, folders = setup
    model = zoo.load(root / "base", adapters=[folders["ada"], folders["lora"]], mixed=True)
    ids = token_ids(batch=3)
    with torch.no_grad():
        mixed = model(ids, adapter_ids=torch.tensor([0, 1, -1])).logits
    for row, adapter in enumerate([folders["ada"], folders["lora"], None]):
        alone = zoo.load(root / "base", adapters=[adapter]) if adapter else base
        torch.testing.assert_close(mixed[row], logits(alone, ids[row : row + 1])[0], atol=ATOL, rtol=0)
    with pytest.raises(ZooError, match="mixed batches run LoRA/AdaLoRA adapters side by side"):
        zoo.load(root / "base", adapters=[folders["lora"], folders["ia3-a"]], mixed=True)
