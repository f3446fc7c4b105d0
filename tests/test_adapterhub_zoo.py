"""AdapterHub folders through the zoo: `zoo add` (adapters and fusions) → registry → `zoo.load` equals
the outputs `adapters` 1.3.0 computed (tests/fixtures/adapterhub, see test_adapterhub.py); compose, drop,
and a Hub round trip keep AdapterHub's file layout."""

from __future__ import annotations

import warnings

import pytest
import torch

import zoo
from tests.test_adapterhub import ROOT, base, expected, run
from compose.errors import CompositionError
from zoo.errors import ZooError

TOL = 1e-5


def add(family: str, name: str, **kwargs):
    with warnings.catch_warnings():  # "seq" carries a prediction head, which is skipped with a warning
        warnings.simplefilter("ignore")
        return zoo.add(ROOT / family / "adapters" / name, name=name, allow_pickle=True, **kwargs)


def close(model, tensors, case: str) -> None:
    diff = (run(model, tensors) - tensors[case]).abs().max().item()
    assert diff < TOL, f"{case}: {diff}"


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_added_bottlenecks_prefix_and_mam_load_like_adapterhub(family):
    tensors = expected(family)
    for name, method in (("seq", "bottleneck"), ("dbl", "bottleneck"), ("par", "bottleneck")):
        manifest = add(family, name)
        assert manifest.format == "adapterhub" and manifest.method.method == method
        assert manifest.weights.path == "adapter.safetensors"
        close(zoo.load(base(family), adapters=[name]), tensors, name)
    with pytest.raises(ZooError, match="attention layout"):
        add(family, "prefix")
    for name in ("prefix", "mam"):
        add(family, name, base=ROOT / family / "base")
        close(zoo.load(base(family), adapters=[name]), tensors, name)
    close(zoo.load(base(family), adapters="seq+dbl"), tensors, "stack_seq_dbl")
    close(zoo.load(base(family), adapters="dbl", drop=1), tensors, "drop_dbl")


def test_added_fusion_loads_like_adapterhub_and_composes():
    tensors = expected("bert")
    with pytest.raises(ZooError, match=r"members \['seq', 'seq2'\] are not in the registry"):
        zoo.add(ROOT / "bert" / "fusions" / "seq_seq2", name="fuse")
    add("bert", "seq")
    add("bert", "seq2")
    fusion = zoo.add(ROOT / "bert" / "fusions" / "seq_seq2", name="fuse")
    assert fusion.kind == "composition" and fusion.format == "adapterhub" and [m.name for m in fusion.members] == ["seq", "seq2"]
    close(zoo.load(base("bert"), adapters=["fuse"]), tensors, "fuse")
    close(zoo.load(base("bert"), adapters=["fuse"], drop=1), tensors, "drop_fuse")
    # an untrained attention fusion over the same members is their average at every site
    stacked = zoo.compose("seq+seq2", fusion="stack", name="both")
    assert stacked.fusion == "stack"
    untrained = zoo.load(base("bert"), adapters="seq+seq2", fusion="attention")
    assert run(untrained, tensors).shape == tensors["fuse"].shape
    with pytest.raises(CompositionError, match="cannot merge bottleneck adapter .seq."):
        zoo.load(base("bert"), adapters="seq", merge=True)


def test_list_shows_adapterhub_shapes(zoo_cli):
    add("bert", "par")
    code, out, err = zoo_cli("list")
    assert code == 0, err
    assert "bottleneck" in out and "parallel ÷2" in out
    code, out, err = zoo_cli("show", "par")
    assert code == 0 and "is_parallel" in out


def test_hub_round_trip_keeps_the_adapterhub_layout(server):
    add("bert", "par")
    zoo.push("par", "org/bert-par")
    zoo.remove("par")
    pulled = zoo.pull("org/bert-par")
    assert pulled.format == "adapterhub" and pulled.weights.path == "adapter.safetensors"
    close(zoo.load(base("bert"), adapters=[pulled.name]), expected("bert"), "par")


def test_untrained_bottleneck_fusion_is_the_members_average():
    tensors = expected("bert")
    add("bert", "seq")
    add("bert", "seq2")
    fused = run(zoo.load(base("bert"), adapters="seq+seq2", fusion="attention"), tensors)
    assert not torch.allclose(fused, tensors["seq"], atol=1e-3) and not torch.allclose(fused, tensors["seq2"], atol=1e-3)


def test_pull_of_a_plain_adapterhub_repo(server):
    """A repo as AdapterHub's `push_adapter_to_hub` leaves it (no zoo.json): pulled, checked, registered as AdapterHub."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("org/bert-dbl")
    api.upload_folder(repo_id="org/bert-dbl", folder_path=ROOT / "bert" / "adapters" / "dbl")
    pulled = zoo.pull("org/bert-dbl", allow_pickle=True)
    assert pulled.format == "adapterhub" and pulled.method.mh_adapter and pulled.source.repo_id == "org/bert-dbl"
    close(zoo.load(base("bert"), adapters=[pulled.name]), expected("bert"), "dbl")
