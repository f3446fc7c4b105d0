"""Manifests, the store and the registry: add / list / show / remove / verify, measured not trusted."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

import zoo
from zoo.errors import ZooError
from zoo.manifest import manifest_schema, parse_manifest
from zoo.registry import Registry


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory) -> Path:
    """A PEFT LoRA folder on a tiny Llama (rank pattern: q_proj of layer 1 has r=2)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2}, init_lora_weights=False)
    folder = tmp_path_factory.mktemp("adapters") / "tiny-llama-lora"
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_add_measures_sizes_and_hashes(peft_adapter):
    m = zoo.add(peft_adapter, name="tiny", task="demo", tags=["x", "y"])
    # ranks 4,4 / 2,4 over hidden 32 -> q_proj 32x32, v_proj 32->16 (2 kv heads of dim 8)
    expected = 4 * (32 + 32) + 4 * (32 + 16) + 2 * (32 + 32) + 4 * (32 + 16)
    assert m.size.trainable_params == expected
    assert m.size.bytes == expected * 4
    assert m.size.by_dtype["F32"].params == expected
    weights = m.file("adapter_model.safetensors")
    assert weights.sha256 == sha256(peft_adapter / "adapter_model.safetensors")
    assert weights.size == (peft_adapter / "adapter_model.safetensors").stat().st_size
    assert m.method.rank_pattern == {"layers.1.self_attn.q_proj": 2}
    assert m.ref == "tiny@1"
    # the store holds the files under their hashes, and a loadable folder links to them
    folder = zoo.api.open_store().adapter_dir(m)
    assert sha256(folder / "adapter_model.safetensors") == weights.sha256
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4


def test_add_of_the_same_files_keeps_the_first(peft_adapter):
    first = zoo.add(peft_adapter, name="tiny")
    assert zoo.add(peft_adapter, name="tiny", task="other") == first
    assert zoo.list_adapters() == [first]


def test_list_filters_show_and_remove(peft_adapter):
    zoo.add(peft_adapter, name="a", task="sql")
    zoo.add(peft_adapter, name="b", task="chat")
    assert [m.name for m in zoo.list_adapters(task="sql")] == ["a"]
    assert [m.name for m in zoo.list_adapters(method="lora")] == ["a", "b"]
    assert zoo.list_adapters(method="ia3") == []
    assert zoo.show("b@1").task == "chat"
    with pytest.raises(ZooError, match="no version 7"):
        zoo.show("b@7")
    assert [m.ref for m in zoo.remove("a")] == ["a@1"]
    assert [m.name for m in zoo.list_adapters()] == ["b"]
    with pytest.raises(ZooError, match="no adapter named 'a'"):
        zoo.show("a")


def test_verify_finds_corruption(peft_adapter):
    m = zoo.add(peft_adapter, name="tiny")
    assert all(r.problem is None for r in zoo.verify())
    blob = zoo.api.open_store().blob_path(m.file("adapter_model.safetensors").sha256)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    problems = {r.path: r.problem for r in zoo.verify("tiny")}
    assert problems["adapter_config.json"] is None
    assert "sha256" in problems["adapter_model.safetensors"]


def test_unknown_config_keys_are_kept_with_a_warning(peft_adapter, tmp_path):
    folder = tmp_path / "newer-peft"
    shutil.copytree(peft_adapter, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["some_future_option"] = {"enabled": True}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="some_future_option"):
        m = zoo.add(folder)
    assert m.extra_config == {"some_future_option": {"enabled": True}}


def test_unsupported_feature_is_refused(peft_adapter, tmp_path):
    folder = tmp_path / "replicated"
    shutil.copytree(peft_adapter, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["layer_replication"] = [[0, 2]]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ZooError, match="layer_replication"):
        zoo.add(folder)
    assert zoo.list_adapters() == []


def test_rank_pattern_that_does_not_match_the_weights_is_refused(peft_adapter, tmp_path):
    folder = tmp_path / "bad-pattern"
    shutil.copytree(peft_adapter, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ZooError, match="layers.1.self_attn.q_proj"):
        zoo.add(folder)


class _Evil:
    def __reduce__(self):
        return (Path("pwned").touch, ())


def test_pickle_rule(peft_adapter, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "bin-adapter"
    folder.mkdir()
    shutil.copy(peft_adapter / "adapter_config.json", folder)
    state = load_file(peft_adapter / "adapter_model.safetensors")
    torch.save(state, folder / "adapter_model.bin")
    with pytest.raises(ZooError, match="pickle"):
        zoo.add(folder)
    m = zoo.add(folder, allow_pickle=True)
    stored = load_file(zoo.api.open_store().adapter_dir(m) / "adapter_model.safetensors")
    assert stored.keys() == state.keys() and all(torch.equal(stored[k], state[k]) for k in state)
    assert m.source.original_files[0].path == "adapter_model.bin"
    # a pickle that would run code is refused even when pickles are allowed
    monkeypatch.chdir(tmp_path)
    with zipfile.ZipFile(folder / "adapter_model.bin") as z:  # torch's zip archive, its data.pkl swapped for the evil one
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(folder / "adapter_model.bin", "w") as z:
        for name, data in members:
            z.writestr(name, pickle.dumps({"x": _Evil()}) if name.endswith("/data.pkl") else data)
    with pytest.raises(ZooError, match="weights-only"):
        zoo.add(folder, name="evil", allow_pickle=True)
    assert not (tmp_path / "pwned").exists()


def test_not_an_adapter_folder(tmp_path):
    with pytest.raises(ZooError, match="does not exist"):
        zoo.add(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZooError, match="adapter_config.json"):
        zoo.add(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ZooError, match="not valid JSON"):
        zoo.add(tmp_path / "empty")


def test_invalid_manifest_names_the_field():
    with pytest.raises(ZooError, match=r"field 'adapter\.method\.lora\.r'"):
        parse_manifest(
            {
                "name": "x", "method": {"method": "lora", "r": 0, "lora_alpha": 8},
                "size": {"trainable_params": 0, "bytes": 0}, "files": [], "source": {"kind": "local"},
            }
        )
    with pytest.raises(ZooError, match=r"field 'adapter\.files\.0\.path'.*invalid file path"):
        parse_manifest(
            {
                "name": "x", "method": {"method": "lora", "r": 8, "lora_alpha": 8},
                "size": {"trainable_params": 0, "bytes": 0}, "source": {"kind": "local"},
                "files": [{"path": "../../etc/passwd", "sha256": "0" * 64, "size": 1}],
            }
        )
    assert "method" in manifest_schema()["$defs"]["AdapterManifest"]["properties"]


def test_broken_registry_file_is_reported_not_overwritten(tmp_path):
    path = tmp_path / "registry.json"
    path.write_text('{"format": "adapter-zoo/registry", "adapters": [{"name": 1}]}')
    with pytest.raises(ZooError, match="registry"):
        Registry(path).read()
    assert path.read_text().startswith('{"format"')


def _add_many(args):
    folder, registry, home, worker, count = args
    import os

    os.environ["ZOO_HOME"] = home
    for i in range(count):
        zoo.add(folder, name=f"w{worker}-{i}", registry=registry)


def test_concurrent_adds_all_land(peft_adapter, tmp_path):
    registry, home = str(tmp_path / "shared.json"), str(tmp_path / "home")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_add_many, [(peft_adapter, registry, home, w, 5) for w in range(4)])
    names = {m.name for m in zoo.list_adapters(registry=registry)}
    assert names == {f"w{w}-{i}" for w in range(4) for i in range(5)}


@pytest.mark.parametrize(
    "location, expected",
    [
        ("postgresql:/u@h/db", "invalid registry URL"),
        ("postgresql:user@h/db", "invalid registry URL"),
        ("postgresql+psycopg2://u@h/db", "invalid registry URL"),
        ("mysql://u@h/db", "invalid registry URL"),
        (" postgresql://u@h/db", "starts or ends with a space"),
        ("reg.db ", "starts or ends with a space"),
        ("-", "invalid registry '-'"),
        ("  ", "invalid registry"),
        (":memory:", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("no/such/folder/reg.db", "does not exist"),
        ("fifo.json", "not a regular file"),
    ],
)
def test_a_registry_location_that_cannot_be_one_is_refused_in_one_line(location, expected, tmp_path, monkeypatch, zoo_cli):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "fifo.json")
    code, _, err = zoo_cli("list", "--registry", location)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "zoo-home") == ["fifo.json"]  # no `postgresql:` folder, nothing made


def test_versions_task_and_tags_are_bounded_in_one_line(peft_adapter):
    for fields, expected in [({"task": "t" * 1001}, "task"), ({"tags": [f"t{i}" for i in range(65)]}, "tags"), ({"tags": ["x" * 101]}, "tags")]:
        with pytest.raises(ZooError, match=expected) as e:
            zoo.add(peft_adapter, name="tiny", **fields)
        assert "\n" not in str(e.value)
    entry = json.loads(zoo.add(peft_adapter, name="tiny").model_dump_json())
    for version in (2**31, 2**63, True, "1"):
        with pytest.raises(ZooError, match="version"):
            parse_manifest({**entry, "version": version})
    assert zoo.list_adapters() and zoo.show("tiny").version == 1


def test_registry_files_respect_the_umask_and_keep_their_mode(peft_adapter, tmp_path):
    path = tmp_path / "reg.json"
    old = os.umask(0o022)
    try:
        zoo.add(peft_adapter, name="a", registry=path)
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        zoo.remove("a", registry=path)
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
