"""AdapterFusion over bottleneck adapters through the one fusion API (`compose.fusion.model`, `compose.fusion.train`,
`compose.methods`): an untrained fusion is the mean of its members' up-projections at every site (written out),
training moves the fusion alone, recording and pruning (pruned to one member = that member alone only while V = I),
saving and reloading, one fusion of either kind per model, and `zoo compose --fusion attention [--train]` on
AdapterHub members (tests/fixtures/adapterhub, see test_adapterhub.py) reloading to the trained model's outputs.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

import zoo
from compose.bottleneck.model import registry, sites
from compose.errors import CompositionError
from compose.fusion.config import FusionConfig
from compose.fusion.model import (
    attached_fusion, detach_fusion, fusion_attention, fusion_regularization, fusion_state, prune_fusion, record_attention,
)
from compose.fusion.train import train_fusion
from compose.lora.config import LoraConfig
from compose.methods import attach, attach_fusion, detach
from tests.test_adapterhub import ROOT, adapter, base, expected, run

TOL = 1e-5
VOCAB = 64  # the fixtures' bases

pytestmark = pytest.mark.filterwarnings("ignore")


def with_members(family: str, names: list[str]) -> torch.nn.Module:
    model = base(family)
    for name in names:
        config, state, _ = adapter(family, name)
        attach(model, name, config, state)
    return model


def fused(family: str, names: list[str], state: dict | None = None, **config) -> torch.nn.Module:
    model = with_members(family, names)
    attach_fusion(model, "f", FusionConfig(members=names, **config), state)
    return model


def site_calls(model, tensors) -> list[tuple]:
    """(site, h, x, norm, output) of every bottleneck site the forward runs."""
    calls = []
    hooks = [site.register_forward_hook(lambda s, args, out: calls.append((s, *args, out))) for _, site in sites(model)]
    run(model, tensors)
    for hook in hooks:
        hook.remove()
    return calls


def up(adapter, a: torch.Tensor) -> torch.Tensor:
    """u = s·(W_up·relu(W_down·a + b_down) + b_up): a Pfeiffer adapter's scaled up-projection, written out."""
    hidden = torch.relu(a @ adapter.adapter_down.weight.T + adapter.adapter_down.bias)
    return adapter.scaling * (hidden @ adapter.adapter_up.weight.T + adapter.adapter_up.bias)


def pfeiffer_site(h, x, norm, adapters: list, value: torch.Tensor | None = None) -> torch.Tensor:
    """A seq_bn site's output with ũ = V·mean_i(uᵢ) over `adapters` (V = I unless given) where one adapter's u would be.

    post-LN (BERT): a = LN(h + x), out = LN(ũ + h + x);  pre-LN (Llama, norm None): a = h + x, out = ũ + h (the block adds x).
    """
    ln = (lambda t: F.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, norm.eps)) if norm is not None else (lambda t: t)
    a = ln(h + x)
    u = sum(up(adapter, a) for adapter in adapters) / len(adapters)
    u = u if value is None else u @ value.T
    return ln(u + h + x) if norm is not None else u + h


def check_pfeiffer(config) -> None:
    """The written-out math above is seq_bn's: fail loudly if a fixture's config changes."""
    assert (config.original_ln_before, config.original_ln_after, config.residual_before_ln) == (True, True, True)
    assert not (config.is_parallel or config.ln_before or config.ln_after or config.use_gating or config.adapter_residual_before_ln)
    assert config.non_linearity == "relu"


# --- the untrained fusion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "llama"])
def test_untrained_fusion_is_the_mean_of_the_members_up_projections_at_each_site(family):
    names = ["seq", "seq2"]
    for name in names:
        check_pfeiffer(adapter(family, name)[0])
    model = fused(family, names)
    calls = site_calls(model, expected(family))
    assert len(calls) == 2  # the output site of each of the 2 layers
    for site, h, x, norm, out in calls:
        assert site.fused == tuple(names) and torch.equal(site.fusion.value.weight, torch.eye(32))
        with torch.no_grad():
            mean = pfeiffer_site(h, x, norm, [site.adapters[n] for n in names])
            torch.testing.assert_close(out, mean, atol=TOL, rtol=0)
            for n in names:  # and the mean is no member alone
                assert (pfeiffer_site(h, x, norm, [site.adapters[n]]) - mean).abs().max() > 100 * TOL


# --- training -------------------------------------------------------------------------------------------

def contrastive_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (6, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}


def test_training_lowers_the_loss_and_touches_only_the_fusion():
    model = fused("bert", ["seq", "seq2"])  # a bare BertModel: nothing but the fusion trains
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".fusion." not in k}
    before = fusion_state(model)
    assert before.keys() == {f"encoder.layer.{i}.output_adapter.fusion.{t}" for i in (0, 1) for t in
                             ("query.weight", "query.bias", "key.weight", "key.bias", "value.weight")}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    tensors = expected("bert")
    untrained = run(model, tensors)

    losses = train_fusion(model, [contrastive_batch()], objective="contrastive", epochs=6, lr=1e-2)
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # base and adapters bit-identical
    assert all(p.grad is None for p in model.parameters())
    state = fusion_state(model)  # every fusion tensor moved but the key bias (it cancels in the softmax: no gradient)
    assert all(torch.equal(state[k], v) == k.endswith("key.bias") for k, v in before.items())
    assert fusion_regularization(model).item() > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not model.training
    trained = run(model, tensors)
    assert (trained - untrained).abs().max() > 100 * TOL

    # the saved state reloads (through the generic attach) to the same outputs
    assert torch.equal(run(fused("bert", ["seq", "seq2"], state), tensors), trained)
    # robust AdapterDrop while training drops bottleneck sites too: other losses than without it
    dropped = train_fusion(fused("bert", ["seq", "seq2"]), [contrastive_batch()] * 2, objective="contrastive", lr=1e-2, drop_train=True, seed=1)
    plain = train_fusion(fused("bert", ["seq", "seq2"]), [contrastive_batch()] * 2, objective="contrastive", lr=1e-2, seed=1)
    assert dropped != plain


# --- recording and pruning ------------------------------------------------------------------------------

def random_state(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's fusion state redrawn (V = I + noise), so attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) / v.shape[-1] ** 0.5 for k, v in fusion_state(model).items()}
    for k, v in state.items():
        v += torch.eye(v.shape[0]) if k.endswith("value.weight") else 0
    return state


def test_record_and_prune_the_least_attended_member():
    names = ["par", "seq", "seq2"]
    placement = {"query_before_ln": True, "residual_before": True}  # AdapterHub's options, which pruning keeps
    state = random_state(fused("llama", names), seed=4)  # par ≈ 0.15, seq ≈ 0.34, seq2 ≈ 0.51
    model = fused("llama", names, state, **placement)
    tensors = expected("llama")
    record_attention(model)
    before = run(model, tensors)
    attention = fusion_attention(model)
    record_attention(model, False)
    assert list(attention) == names and abs(sum(attention.values()) - 1) < 1e-5
    low = min(attention, key=attention.get)
    keep = [n for n in names if n != low]
    assert all(attention[n] > attention[low] + 0.05 for n in keep), attention

    prune_fusion(model, keep)
    assert attached_fusion(model) == ("f", FusionConfig(members=keep, **placement)) and registry(model)["active"] == keep
    assert fusion_attention(model).keys() == set(keep)  # the kept members' records survive
    assert all(site.fused == tuple(keep) and site.query_before_ln and site.residual_before for _, site in sites(model))
    reference = fused("llama", keep, state, **placement)  # the same tensors over the kept members only
    torch.testing.assert_close(run(model, tensors), run(reference, tensors), atol=TOL, rtol=0)
    assert (run(reference, tensors) - before).abs().max() > 100 * TOL
    with pytest.raises(CompositionError, match="non-empty subset"):
        prune_fusion(model, [low])


def test_pruned_to_one_member_is_that_member_alone_only_while_v_is_the_identity():
    tensors = expected("llama")
    check_pfeiffer(adapter("llama", "seq")[0])
    # untrained (V = I): fusion(q, [u]) = V·u = u, so the site computes u + r as the adapter does alone
    model = fused("llama", ["seq", "seq2"])
    prune_fusion(model, ["seq"])
    torch.testing.assert_close(run(model, tensors), tensors["seq"], atol=TOL, rtol=0)  # AdapterHub's output of seq alone
    # trained (V ≠ I): one member gets p = 1 whatever Q and K, and the site computes V·u + r
    state = random_state(model, seed=2)
    model = fused("llama", ["seq", "seq2"], state)
    prune_fusion(model, ["seq"])
    for site, h, x, norm, out in site_calls(model, tensors):
        with torch.no_grad():
            written = pfeiffer_site(h, x, norm, [site.adapters["seq"]], site.fusion.value.weight)
            alone = pfeiffer_site(h, x, norm, [site.adapters["seq"]])
        torch.testing.assert_close(out, written, atol=TOL, rtol=0)
        assert (out - alone).abs().max() > 100 * TOL


def test_one_fusion_of_either_kind_per_model():
    model = fused("llama", ["seq", "seq2"])
    g = torch.Generator().manual_seed(0)
    lora = {f"model.layers.{i}.self_attn.q_proj.lora_{m}.weight": torch.randn(shape, generator=g)
            for i in (0, 1) for m, shape in (("A", (2, 32)), ("B", (32, 2)))}
    attach(model, "lo", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), lora)
    with pytest.raises(CompositionError, match="bottleneck fusion 'f' is already attached; detach_fusion"):
        attach_fusion(model, "g", FusionConfig(members=["lo"]))
    assert detach_fusion(model) is model and attached_fusion(model) is None
    assert all(site.fusion is None for _, site in sites(model))
    attach_fusion(model, "g", FusionConfig(members=["lo"]))  # the LoRA adapter alone is active now
    assert attached_fusion(model)[0] == "g" and all(".q_proj.fusion." in k for k in fusion_state(model))
    with pytest.raises(CompositionError, match="LoRA fusion 'g' is already attached"):
        attach_fusion(model, "f", FusionConfig(members=["seq", "seq2"]))
    detach_fusion(model)
    detach(model, "lo")  # what is left is the members, stacked again
    assert registry(model)["active"] == ["seq", "seq2"]
    tensors = expected("llama")
    torch.testing.assert_close(run(model, tensors), run(with_members("llama", ["seq", "seq2"]), tensors), atol=TOL, rtol=0)


# --- zoo compose --fusion attention over bottleneck members ------------------------------------------------

def base_with_tokenizer(family: str, folder):
    """The fixture's base plus a word-level tokenizer over its vocabulary ("w5" → 5; [PAD] = 0)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(ROOT / family / "base", folder)
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="w1", model_input_names=["input_ids", "attention_mask"]).save_pretrained(folder)
    return folder


def write_rows(path, labelled: bool):
    g = torch.Generator().manual_seed(3)
    rows = [{"text": " ".join(f"w{int(t)}" for t in torch.randint(1, VOCAB, (int(torch.randint(5, 10, (), generator=g)),), generator=g))}
            | ({"label": ["pos", "neg"][i % 2]} if labelled else {}) for i in range(8)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def add_members(family: str, names):
    with warnings.catch_warnings():  # "seq" carries a prediction head, which is skipped with a warning
        warnings.simplefilter("ignore")
        for name in names:
            zoo.add(ROOT / family / "adapters" / name, name=name, allow_pickle=True)


@pytest.fixture
def captured(monkeypatch):
    """The models `zoo.compose` trains, as they are when it saves their fusion."""
    import compose.fusion.train

    models = []
    train = compose.fusion.train.train_fusion

    def keep(model, *args, **kwargs):
        models.append(model)
        return train(model, *args, **kwargs)

    monkeypatch.setattr(compose.fusion.train, "train_fusion", keep)
    return models


def test_zoo_compose_trains_a_bottleneck_fusion_that_reloads_identically(tmp_path, captured):
    folder = base_with_tokenizer("bert", tmp_path / "bert")
    add_members("bert", ["seq", "seq2"])
    data = write_rows(tmp_path / "data.jsonl", labelled=True)  # a bare encoder: contrastive
    manifest = zoo.compose("seq+seq2", fusion="attention", name="fused", base=folder, train=data, epochs=2, lr=1e-2, batch_size=4, prune_below=0.0)
    assert manifest.fusion == "attention" and [m.name for m in manifest.members] == ["seq", "seq2"]
    assert manifest.fusion_config.members == ["seq", "seq2"] and manifest.source.recipe["train"] == str(data)
    [trained] = captured
    tensors = expected("bert")
    loaded = zoo.load(folder, adapters="fused")
    assert attached_fusion(loaded) == ("fused", manifest.fusion_config)
    assert torch.equal(run(loaded, tensors), run(trained, tensors))
    untrained = zoo.load(folder, adapters="seq+seq2", fusion="attention")
    assert (run(untrained, tensors) - run(loaded, tensors)).abs().max() > 100 * TOL


def test_cli_compose_attention_over_bottlenecks_without_and_with_training(tmp_path, captured, zoo_cli):
    folder = base_with_tokenizer("llama", tmp_path / "llama")
    add_members("llama", ["seq", "seq2"])
    tensors = expected("llama")
    code, out, err = zoo_cli("compose", "seq+seq2", "--fusion", "attention", "--base", folder, "--name", "avg")
    assert code == 0, err
    average = run(zoo.load(folder, adapters="avg"), tensors)
    torch.testing.assert_close(average, run(fused("llama", ["seq", "seq2"]), tensors), atol=TOL, rtol=0)

    data = write_rows(tmp_path / "data.jsonl", labelled=False)  # a causal LM: next-token loss
    code, out, err = zoo_cli("compose", "seq+seq2", "--fusion", "attention", "--base", folder, "--train", data,
                             "--name", "tuned", "--epochs", "2", "--lr", "0.05", "--batch-size", "4")
    assert code == 0, err
    assert "composed tuned@1 (attention) from seq+seq2" in out
    [trained] = captured
    tuned = run(zoo.load(folder, adapters="tuned"), tensors)
    assert torch.equal(tuned, run(trained, tensors)) and (tuned - average).abs().max() > 100 * TOL
