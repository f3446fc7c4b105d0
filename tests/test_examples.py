"""The shipped example adapters and registry.json: hashes hold, and loading them on the real
all-MiniLM-L6-v2 equals peft on the same weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import zoo
from zoo.errors import ZooError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.common import ADAPTERS, PROBE, minilm_path  # noqa: E402

SHIPPED = ROOT / "registry.json"


def test_shipped_registry_matches_the_example_files():
    results = {}
    for m in zoo.list_adapters(registry=SHIPPED):
        folder = zoo.api.adapter_folder(m, registry=SHIPPED)  # fetched from examples/ into an empty store
        results[m.name] = [r.problem for r in zoo.verify(m.ref, registry=SHIPPED)]
        for f in m.files:
            assert (folder / f.path).read_bytes() == (ADAPTERS / m.name / f.path).read_bytes()
    assert results == {folder.name: [None, None] for folder in ADAPTERS.iterdir()}


def test_a_changed_source_is_refused(tmp_path):
    import shutil

    registry = tmp_path / "registry.json"
    shutil.copytree(ADAPTERS / "minilm-topic", tmp_path / "topic")
    m = zoo.add(tmp_path / "topic", registry=registry)
    blob = zoo.api.open_store().blob_path(m.file("adapter_model.safetensors").sha256)
    blob.unlink()
    data = bytearray((tmp_path / "topic" / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (tmp_path / "topic" / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ZooError, match="changed since it was registered"):
        zoo.api.adapter_folder(m, registry=registry)


@pytest.mark.parametrize("adapters", [["minilm-sentiment"], ["minilm-sentiment", "minilm-topic"]])
def test_real_minilm_equals_peft(adapters):
    import peft
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    batch = tokenizer(["The soup was superb.", "What a miserable flight, honestly."], padding=True, return_tensors="pt")
    ours = zoo.load(minilm_path(), adapters=adapters, registry=SHIPPED)
    reference = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path()), str(ADAPTERS / adapters[0]), adapter_name=adapters[0])
    for name in adapters[1:]:
        reference.load_adapter(str(ADAPTERS / name), adapter_name=name)
    reference.base_model.set_adapter(adapters)
    with torch.no_grad():
        expected = reference.eval()(**batch).last_hidden_state
        torch.testing.assert_close(ours(**batch).last_hidden_state, expected, atol=1e-5, rtol=0)
        assert (expected - AutoModel.from_pretrained(minilm_path())(**batch).last_hidden_state).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["minilm-sentiment-adalora", "minilm-sentiment-ia3", "minilm-sentiment-prompt", "minilm-sentiment-ptuning"])
def test_shipped_peft_methods_equal_peft_on_real_minilm(name):
    import peft
    from transformers import AutoModel, AutoTokenizer

    batch = AutoTokenizer.from_pretrained(minilm_path())(PROBE, padding=True, return_tensors="pt")
    reference = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(minilm_path()), str(ADAPTERS / name)).eval()
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        torch.testing.assert_close(zoo.load(minilm_path(), adapters=name, registry=SHIPPED)(**batch).last_hidden_state, expected, atol=1e-5, rtol=0)
        bare = AutoModel.from_pretrained(minilm_path())(**batch).last_hidden_state
    assert (expected[:, -bare.shape[1] :] - bare).abs().max() > 1e-2  # the adapter changes the outputs


def test_shipped_adapterhub_methods_equal_adapterhub_on_real_minilm():
    """Outputs `adapters` 1.3.0 (transformers 4.57, eager attention) computed from the shipped files
    (examples/make_adapterhub_adapters.py); the two transformers already differ a little on the bare base."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    expected = load_file(ROOT / "tests/fixtures/minilm-adapterhub-expected.safetensors")
    batch = AutoTokenizer.from_pretrained(minilm_path())(PROBE, padding=True, return_tensors="pt")
    with torch.no_grad():
        floor = (zoo.load(minilm_path())(**batch).last_hidden_state - expected.pop("base")).abs().max().item()
        assert floor < 1e-4  # 1.4e-5 measured: transformers 4.57 vs 5.x on the same weights
        for name, reference in expected.items():
            ours = zoo.load(minilm_path(), adapters=name, registry=SHIPPED)(**batch).last_hidden_state
            torch.testing.assert_close(ours, reference, atol=1e-5 + floor, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert set(expected) == {"minilm-sentiment-pfeiffer", "minilm-topic-pfeiffer", "minilm-sentiment-houlsby", "minilm-sentiment-parallel",
                             "minilm-sentiment-prefix", "minilm-sentiment-mam"}


def test_cli_run_with_fusion_and_drop_equals_python(zoo_cli):
    import json

    from transformers import AutoTokenizer

    from examples.common import embed

    prompts = ["The soup was superb.", "What a miserable flight."]
    args = ["--adapters", "minilm-sentiment+minilm-topic", "--fusion", "attention", "--drop", "2", "--registry", SHIPPED]
    code, out, err = zoo_cli("run", minilm_path(), "-p", prompts[0], "-p", prompts[1], *args, "--json")
    assert code == 0, err
    model = zoo.load(minilm_path(), adapters="minilm-sentiment+minilm-topic", fusion="attention", drop=2, registry=SHIPPED)
    e = embed(model, AutoTokenizer.from_pretrained(minilm_path()), prompts)
    torch.testing.assert_close(torch.tensor(json.loads(out)["similarity"]), e @ e.T, atol=1e-5, rtol=0)
    undropped = zoo.load(minilm_path(), adapters="minilm-sentiment+minilm-topic", fusion="attention", registry=SHIPPED)
    u = embed(undropped, AutoTokenizer.from_pretrained(minilm_path()), prompts)
    assert (u - e).abs().max() > 1e-3  # the drop really removed work


def test_compose_attention_untrained_trained_and_pruned(tmp_path):
    """zoo compose --fusion attention end to end on the real base: registered, loadable, prunable."""
    import json

    from transformers import AutoTokenizer

    from examples.common import DATA, embed

    registry = tmp_path / "registry.json"
    for name in ("minilm-sentiment", "minilm-topic"):
        zoo.add(ADAPTERS / name, registry=registry)
    members = "minilm-sentiment+minilm-topic"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = ["The soup was superb.", "What a miserable flight."]

    untrained = zoo.compose(members, fusion="attention", name="avg", base=minilm_path(), registry=registry)
    assert untrained.kind == "composition" and [m.name for m in untrained.members] == ["minilm-sentiment", "minilm-topic"]
    on_the_fly = zoo.load(minilm_path(), adapters=members, fusion="attention", registry=registry)
    torch.testing.assert_close(embed(zoo.load(minilm_path(), adapters="avg", registry=registry), tokenizer, texts), embed(on_the_fly, tokenizer, texts), atol=1e-5, rtol=0)

    rows = [json.loads(line) for line in open(DATA / "reviews-train.jsonl")][:24]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trained = zoo.compose(members, fusion="attention", name="fused", base=minilm_path(), train=data, epochs=1, lr=1e-3, batch_size=8, prune_below=0.0, registry=registry)
    assert trained.fusion_config.members == ["minilm-sentiment", "minilm-topic"] and trained.source.recipe["epochs"] == 1
    assert (embed(zoo.load(minilm_path(), adapters="fused", registry=registry), tokenizer, texts) - embed(on_the_fly, tokenizer, texts)).abs().max() > 1e-4
    with pytest.raises(ZooError, match="would remove every member"):
        zoo.compose(members, fusion="attention", name="none-left", base=minilm_path(), train=data, batch_size=8, prune_below=1.01, registry=registry)
    with pytest.raises(ZooError, match="needs data"):
        zoo.compose(members, fusion="attention", name="no-data", base=minilm_path(), prune_below=0.2, registry=registry)
    assert {m.name for m in zoo.list_adapters(registry=registry)} == {"minilm-sentiment", "minilm-topic", "avg", "fused"}
