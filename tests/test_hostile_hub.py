"""A hostile or failing Hub: a zoo.json that disagrees with the repo's own files, non-finite numbers in it, a proxy that
echoes the caller's token, 5xx answers, an unreachable endpoint, and local paths that `zoo push` must not publish.
Against tests/hubserver.py with the real client (its `fail_with` hook plays the failing server)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import zoo
from tests.handmade import write_adapter
from tests.hubserver import PLANTED_TOKEN
from tests.test_hostile import one_line
from zoo.manifest import CompositionManifest, MemberRef, SizeInfo, Source

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def pushed_files(folder: Path, zoo_json: dict) -> dict[str, bytes]:
    return {CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: (folder / WEIGHTS).read_bytes(), "zoo.json": json.dumps(zoo_json).encode()}


def manifest_of(folder: Path) -> dict:
    """The zoo.json `zoo push` would write for `folder` (added, dumped, removed again)."""
    m = zoo.add(folder, name="a").model_dump(mode="json")
    zoo.remove("a")
    return m


@pytest.mark.parametrize("field, value, expected", [
    ("lora_alpha", 1600.0, "zoo.json says lora_alpha=1600.0 but adapter_config.json says 2.0"),
    ("r", 8, "zoo.json says r=8 but adapter_config.json says 1"),
    ("target_modules", ["v_proj"], "zoo.json says target_modules=['v_proj']"),
])
def test_a_zoo_json_that_disagrees_with_the_repos_config_is_refused(field, value, expected, server, tmp_path, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    m = manifest_of(folder)
    m["method"][field] = value
    server.commit("org/lies", pushed_files(folder, m))
    one_line(*zoo_cli("pull", "org/lies"), expected)  # before: the registry said lora_alpha 1600, the files (what loads) 16
    assert zoo.list_adapters() == []


def test_a_zoo_json_task_type_or_format_that_disagrees_is_refused(server, tmp_path, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    m = manifest_of(folder)
    server.commit("org/lies", pushed_files(folder, {**m, "task_type": "SEQ_CLS"}))
    one_line(*zoo_cli("pull", "org/lies"), "zoo.json says task_type='SEQ_CLS' but adapter_config.json says None")


def test_a_zoo_json_with_non_finite_numbers_is_refused_and_the_registry_stays_readable(server, tmp_path, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    assert zoo_cli("add", write_adapter(tmp_path / "keep", 2), "--name", "keep")[0] == 0
    text = json.dumps(manifest_of(folder)).replace('"lora_alpha": 2.0', '"lora_alpha": NaN')
    assert "NaN" in text
    server.commit("org/nan", {**pushed_files(folder, {}), "zoo.json": text.encode()})
    one_line(*zoo_cli("pull", "org/nan"), "NaN is not a number JSON allows")
    code, out, err = zoo_cli("list", "--json")
    assert code == 0 and [e["name"] for e in json.loads(out)] == ["keep"], err  # before: every command failed after this pull


def test_a_token_echoed_by_the_server_is_redacted(server, tmp_path, zoo_cli):
    folder = write_adapter(tmp_path / "a", 1)
    server.commit("org/sql", pushed_files(folder, manifest_of(folder)))
    server.fail_with(502, echo_headers=True)  # a proxy that quotes the request, Authorization: Bearer hf_… included
    for command in (["pull", "org/sql"], ["search", "--base", "x"]):
        code, out, err = zoo_cli(*command)
        one_line(code, out, err, "had a server error (HTTP 502)")
        assert PLANTED_TOKEN not in out + err and PLANTED_TOKEN[3:] not in out + err
        assert "Bearer ***" in err


def test_redact():
    from zoo.hub import redact

    text = f"authorization: Bearer {PLANTED_TOKEN}; token={PLANTED_TOKEN}, x-token: 'hf_abcdefgh123' hf_hub/2.4.0 {PLANTED_TOKEN}"
    assert redact(text) == "authorization: Bearer *** token=***, x-token: '***' hf_hub/2.4.0 hf_***"


@pytest.mark.parametrize("failing", ["", "/tree/", "/resolve/"])
def test_a_5xx_is_a_server_error_in_one_line_without_retry_logs_or_bars(failing, server, tmp_path, zoo_cli, monkeypatch):
    """Whichever request fails (repo info, the file list, a file): one line naming a server error. The client retries
    5xx answers with back-off (23 s in all), which the test skips by making its sleeps instant."""
    import huggingface_hub.utils._http as client_http

    monkeypatch.setattr(client_http.time, "sleep", lambda seconds: None)
    folder = write_adapter(tmp_path / "a", 1)
    server.commit("org/sql", pushed_files(folder, manifest_of(folder)))
    server.fail_with(503, path_contains=failing)
    code, out, err = zoo_cli("pull", "org/sql")
    assert code == 2 and err.count("\n") == 1, err  # exactly one line: no "Retrying in 1s", no "Fetching 2 files" bar
    assert err.startswith(f"error: the Hub at {server.endpoint} had a server error (HTTP 503) on org/sql") and "cannot reach" not in err
    server.fail_with(0)
    assert zoo_cli("pull", "org/sql")[0] == 0


def test_an_unreachable_endpoint_is_one_line_within_seconds(server, tmp_path, zoo_cli, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    for command in (["pull", "org/sql"], ["search", "--base", "org/base"]):
        start = time.perf_counter()
        code, out, err = zoo_cli(*command)
        one_line(code, out, err, "cannot reach http://127.0.0.1:9")
        assert "HF_HUB_OFFLINE=1" in err and "HF_ENDPOINT" in err  # the fixes
        assert time.perf_counter() - start < 5  # before: search retried for 23 s


def test_push_publishes_no_local_path(server, tmp_path, zoo_cli):
    secret = str(tmp_path / "home" / "me" / "private" / "train.jsonl")
    for name, seed in (("a", 1), ("b", 2)):
        folder = write_adapter(tmp_path / "home" / "me" / name, seed)
        (folder / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"],
                                                 "base_model_name_or_path": str(tmp_path / "home" / "me" / "base")}))
        assert zoo_cli("add", folder, "--name", name)[0] == 0
    members = [MemberRef(name=m.name, version=m.version, sha256=m.weights.sha256) for m in zoo.list_adapters()]
    zoo.api.register(CompositionManifest(  # what an attention fusion trained on a local file records
        name="duo", fusion="stack", members=members, size=SizeInfo(trainable_params=16, bytes=64), files=[],
        source=Source(kind="composition", members=members, recipe={"fusion": "attention", "train": secret, "epochs": 1}),
    ))
    for ref, repo in (("a", "org/a"), ("duo", "org/duo")):
        assert zoo_cli("push", ref, repo)[0] == 0
        published = server.repos[("model", repo)]
        head = published.commits[published.branches["main"]]
        zoo_json = head.tree["zoo.json"].data.decode()
        assert str(tmp_path) not in zoo_json and "/me/" not in zoo_json, zoo_json
        assert str(tmp_path) not in head.tree["README.md"].data.decode()
    assert json.loads(server.repos[("model", "org/duo")].commits[server.repos[("model", "org/duo")].branches["main"]].tree["zoo.json"].data)["source"]["recipe"]["train"] == "train.jsonl"


@pytest.mark.parametrize("separator", ["%20", "\u00a0", "%20%20", ":\t"])
def test_redact_hides_a_bearer_token_after_any_separator(separator):
    from zoo.hub import redact

    out = redact(f"Authorization: Bearer{separator}hf_abcdefghijkl")
    assert "abcdefghijkl" not in out and "***" in out


def test_redact_hides_hf_tokens_glued_to_text_and_the_callers_own_token(monkeypatch):
    from zoo.hub import redact

    monkeypatch.setenv("HF_TOKEN", "hf_Secret0wnToken99")
    out = redact("x=abchf_abcdefg1 / auth Secret0wnToken99 / hf_Secret0wnToken99 hf_hub/2.4.0")
    assert "abcdefg1" not in out and "Secret0wnToken99" not in out and "hf_hub/2.4.0" in out


def test_pull_of_a_repo_with_zoo_json_checks_tensor_values(server, tmp_path, zoo_cli):
    import hashlib

    from safetensors.torch import load_file, save_file

    folder = write_adapter(tmp_path / "a", 1)
    m = manifest_of(folder)
    tensors = load_file(folder / WEIGHTS)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone().fill_(float("nan"))
    save_file(tensors, folder / WEIGHTS)
    data = (folder / WEIGHTS).read_bytes()
    for f in m["files"]:
        if f["path"] == WEIGHTS:
            f.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    server.commit("org/nanw", pushed_files(folder, m))
    one_line(*zoo_cli("pull", "org/nanw"), "holds NaN")


def test_push_publishes_no_local_path_of_an_extracted_and_resized_adapter(tmp_path, zoo_cli):
    """Recipe dicts at any depth (extract.base/tuned, resize.from) and the adapter_config.json `extract` writes."""
    import torch

    from tests.tiny import tiny_llama
    from zoo.api import open_store
    from zoo.hub import published_manifest

    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    model.save_pretrained(tmp_path / "tuned")
    code, out, err = zoo_cli("extract", "--base", tmp_path / "base", "--tuned", tmp_path / "tuned", "--rank", "1", "--name", "x")
    assert code == 0, err
    code, out, err = zoo_cli("resize", "x", "--name", "y", "--rank", "1")
    assert code == 0, err
    for name in ("x", "y"):
        assert str(tmp_path) not in json.dumps(published_manifest(zoo.show(name)))
        config = next(f for f in zoo.show(name).files if f.path == CONFIG)
        assert str(tmp_path) not in open_store().blob_path(config.sha256).read_text(), name
