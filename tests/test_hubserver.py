"""The test Hub server, driven only by the real `huggingface_hub` client (no mocks).

`huggingface_hub` reads its settings into `huggingface_hub.constants` once, at import; conftest.py sets
`HF_HUB_OFFLINE=1` for every test, which only takes effect if the client is imported after it. So the `hub` fixture
patches the constants that matter in-process (`HF_HUB_OFFLINE`, `HF_HUB_DISABLE_XET`) besides the environment, and
every call passes `endpoint=` and `cache_dir=` explicitly. `test_configure_client_*` and `test_subprocess_*` cover
the two other ways of pointing the client at the server (see tests/hubserver.py).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCardData,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hubserver import HubServer, card_tags, git_blob_sha1, parse_front_matter

TOKEN = "hf_test_token_0123456789abcdef"
CARD = "---\nbase_model: org/base\nlibrary_name: peft\ntags:\n- lora\n---\n# An adapter\n"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A server that requires TOKEN for writes and private repos, and a client configured for it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # read at import: else uploads try Xet storage
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read at import: else every request is refused
    with HubServer(token=TOKEN) as server:
        yield server
    assert server.errors == [], server.errors[0]


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    """A small PEFT-style adapter folder: safetensors weights (LFS), a JSON config and a card (regular files)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({"lora_A": np.arange(32, dtype=np.float32).reshape(4, 8)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (folder / "README.md").write_text(CARD)
    return folder


def _download(hub, repo_id, filename, tmp_path, **kwargs) -> bytes:
    kwargs.setdefault("token", TOKEN)
    path = hf_hub_download(repo_id, filename, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", **kwargs)
    return Path(path).read_bytes()


def _snapshot(hub, repo_id, tmp_path, **kwargs) -> dict[str, bytes]:
    kwargs.setdefault("token", TOKEN)
    root = Path(snapshot_download(repo_id, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", **kwargs))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_create_repo_conflicts_unless_exist_ok(api):
    assert api.create_repo("org/a").repo_id == "org/a"
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("org/a")
    assert e.value.response.status_code == 409
    assert api.create_repo("org/a", exist_ok=True).repo_id == "org/a"
    assert api.create_repo("bare").repo_id == "tester/bare"  # no namespace: the token's user
    assert api.repo_exists("tester/bare") and not api.repo_exists("org/nope")


def test_upload_folder_uses_lfs_for_weights_and_regular_files_for_the_rest(hub, api, adapter_dir, tmp_path):
    api.create_repo("org/ad")
    commit = api.upload_folder(repo_id="org/ad", folder_path=adapter_dir)
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    card = (adapter_dir / "README.md").read_bytes()

    files = {f.path: f for f in api.list_repo_tree("org/ad", recursive=True)}
    assert files["adapter_model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert files["adapter_model.safetensors"].size == len(weights)
    assert files["README.md"].lfs is None and files["README.md"].blob_id == git_blob_sha1(card)
    methods = [(r.method, r.path.split("?")[0]) for r in hub.requests]
    assert ("POST", "/org/ad.git/info/lfs/objects/batch") in methods
    assert sum(m == "PUT" for m, _ in methods) == 1  # only the weights went through the LFS href

    # What hf_hub_download sees in the HEAD answer: the sha256 as ETag for LFS files, the git sha1 otherwise.
    def metadata(name):
        url = hf_hub_url("org/ad", name, endpoint=hub.endpoint)
        return get_hf_file_metadata(url, token=TOKEN, endpoint=hub.endpoint)

    assert metadata("adapter_model.safetensors").etag == hashlib.sha256(weights).hexdigest()
    assert metadata("README.md").etag == git_blob_sha1(card)
    assert metadata("README.md").commit_hash == commit.oid and metadata("README.md").size == len(card)
    assert _download(hub, "org/ad", "adapter_model.safetensors", tmp_path) == weights

    again = api.upload_folder(repo_id="org/ad", folder_path=adapter_dir)  # unchanged files: no new commit
    assert again.oid == commit.oid


def test_old_commit_still_served_after_a_commit_with_a_deletion(hub, api, adapter_dir, tmp_path):
    api.create_repo("org/ad")
    first = api.upload_folder(repo_id="org/ad", folder_path=adapter_dir)
    ops = [CommitOperationDelete("adapter_config.json"), CommitOperationAdd("notes.txt", b"v2")]
    second = api.create_commit("org/ad", operations=ops, commit_message="v2")
    assert second.oid != first.oid and len(second.oid) == 40

    main = _snapshot(hub, "org/ad", tmp_path)
    old = _snapshot(hub, "org/ad", tmp_path, revision=first.oid)
    assert "adapter_config.json" not in main and main["notes.txt"] == b"v2"
    assert old["adapter_config.json"] == (adapter_dir / "adapter_config.json").read_bytes() and "notes.txt" not in old
    assert not any(f"/revision/{first.oid}" in r.path for r in hub.requests)  # a sha needs no resolving

    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit("org/ad", operations=[CommitOperationDelete("nope.txt")], commit_message="x")
    with pytest.raises(HfHubHTTPError) as e:
        stale = [CommitOperationAdd("notes.txt", b"v3")]
        api.create_commit("org/ad", operations=stale, commit_message="stale", parent_commit=first.oid)
    assert e.value.response.status_code == 412


def test_branches_are_independent(hub, api, adapter_dir, tmp_path):
    api.create_repo("org/ad")
    first = api.upload_folder(repo_id="org/ad", folder_path=adapter_dir)
    api.create_branch("org/ad", branch="exp/v2", revision=first.oid)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id="org/ad", revision="exp/v2")
    with pytest.raises(HfHubHTTPError) as e:
        api.create_branch("org/ad", branch="exp/v2")
    assert e.value.response.status_code == 409
    api.create_branch("org/ad", branch="exp/v2", exist_ok=True)

    assert {b.name for b in api.list_repo_refs("org/ad").branches} == {"main", "exp/v2"}
    assert _snapshot(hub, "org/ad", tmp_path, revision="exp/v2")["dev.txt"] == b"dev"
    assert "dev.txt" not in _snapshot(hub, "org/ad", tmp_path, revision="main")
    assert api.model_info("org/ad", revision="main").sha == first.oid


def test_search_by_base_model_tags_and_model_info(hub, api, adapter_dir):
    api.create_repo("org/ad")
    head = api.upload_folder(repo_id="org/ad", folder_path=adapter_dir).oid
    hub.commit("org/tuned", {"README.md": b"---\nbase_model: org/base\nlibrary_name: transformers\n---\n"})
    hub.commit("other/ad", {"README.md": CARD.replace("org/base", "org/other").encode()})
    hub.commit("org/plain", {"config.json": b"{}"})

    def ids(**kwargs):
        return sorted(m.id for m in api.list_models(**kwargs))

    assert ids(filter="base_model:adapter:org/base") == ["org/ad"]
    assert ids(filter="base_model:finetune:org/base") == ["org/tuned"]
    assert ids(filter="base_model:adapter:org/other") == ["other/ad"]  # card only: `library_name: peft` decides
    assert ids(filter="base_model:org/base") == ["org/ad", "org/tuned"]
    assert ids(filter=["peft", "lora"]) == ["org/ad", "other/ad"]
    assert ids(author="org", search="ad") == ["org/ad"]
    assert ids() == ["org/ad", "org/plain", "org/tuned", "other/ad"]

    info = api.model_info("org/ad")
    assert info.sha == head and info.library_name == "peft" and info.private is False
    assert "base_model:adapter:org/base" in info.tags and "lora" in info.tags
    assert info.card_data.base_model == "org/base"
    assert {s.rfilename for s in info.siblings} == {".gitattributes", *(p.name for p in adapter_dir.iterdir())}


def test_front_matter_subset_matches_yaml_for_cards_the_client_writes():
    data = ModelCardData(
        base_model=["org/a", "org/b"],
        library_name="peft",
        tags=["lora", "base_model:adapter:org/a"],
        pipeline_tag="text-generation",
        license="apache-2.0",
        datasets=["d1"],
        inference=False,
    )
    text = data.to_yaml()
    assert parse_front_matter(f"---\n{text}\n---\nbody") == yaml.safe_load(text)
    nested = "---\nmodel-index:\n- name: x\n  results: []\nlibrary_name: 'peft'\ntags: [a, b]\n---\n"
    assert parse_front_matter(nested) == {"library_name": "peft", "tags": ["a", "b"]}
    assert card_tags(yaml.safe_load(text), set())[-1] == "base_model:merge:org/b"  # two base models: a merge
    assert "base_model:adapter:x" in card_tags({"base_model": "x"}, {"adapter_config.json"})


def test_writes_need_the_token_and_private_repos_are_hidden(hub, api, adapter_dir, tmp_path):
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(HfHubHTTPError) as e:
        anonymous.create_repo("org/x")
    assert e.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").model_info("org/x")
    assert e.value.response.status_code == 401 and not isinstance(e.value, RepositoryNotFoundError)

    api.create_repo("org/secret", private=True)
    api.upload_folder(repo_id="org/secret", folder_path=adapter_dir)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info("org/secret")
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, "org/secret", "README.md", tmp_path, token=False)
    with pytest.raises(RepositoryNotFoundError):
        _snapshot(hub, "org/secret", tmp_path, token=False)
    assert [m.id for m in anonymous.list_models()] == []
    assert [m.id for m in api.list_models()] == ["org/secret"]
    assert _download(hub, "org/secret", "README.md", tmp_path) == CARD.encode()


def test_require_token_for_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with HubServer(token=TOKEN, require_token_for_reads=True) as server:
        server.commit("org/pub", {"a.txt": b"a"})
        with pytest.raises(HfHubHTTPError) as e:
            HfApi(endpoint=server.endpoint, token=False).model_info("org/pub")
        assert e.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as e:
            _snapshot(server, "org/pub", tmp_path, token=False)
        assert e.value.response.status_code == 401
        assert _snapshot(server, "org/pub", tmp_path)["a.txt"] == b"a"


def test_missing_repo_revision_and_file_raise_typed_errors(hub, api, tmp_path):
    hub.commit("org/a", {"a.txt": b"a"})
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        _download(hub, "org/missing", "a.txt", tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/a", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, "org/a", "a.txt", tmp_path, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        _snapshot(hub, "org/a", tmp_path, revision="f" * 40)
    with pytest.raises(RemoteEntryNotFoundError):
        _download(hub, "org/a", "missing.txt", tmp_path)


def test_corrupted_file_downloads_with_same_size_but_different_sha256(hub, api, adapter_dir, tmp_path):
    api.create_repo("org/ad")
    api.upload_folder(repo_id="org/ad", folder_path=adapter_dir)
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    hub.corrupt("org/ad", "adapter_model.safetensors")

    served = _download(hub, "org/ad", "adapter_model.safetensors", tmp_path)
    assert len(served) == len(weights) and served != weights
    advertised = api.list_repo_tree("org/ad")
    etag = next(f.lfs.sha256 for f in advertised if f.path == "adapter_model.safetensors")
    assert etag == hashlib.sha256(weights).hexdigest() != hashlib.sha256(served).hexdigest()


def test_dropped_download_resumes_with_a_range_request(hub, api, tmp_path):
    # The client buffers 10 MiB (constants.DOWNLOAD_CHUNK_SIZE) before writing: it resumes from whole chunks only.
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    big = hashlib.sha256(b"seed").digest() * ((chunk + (1 << 20)) // 32)
    small = b"0123456789" * 10
    hub.commit("org/big", {"weights.bin": big, "small.txt": small})
    hub.fail_after("org/big", "weights.bin", chunk + 4096)
    hub.fail_after("org/big", "small.txt", 5)

    assert _download(hub, "org/big", "weights.bin", tmp_path) == big
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/weights.bin")]
    assert [(r.headers.get("range"), r.status) for r in gets] == [(None, 200), (f"bytes={chunk}-", 206)]

    assert _download(hub, "org/big", "small.txt", tmp_path) == small  # under one chunk: starts over, no Range
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/small.txt")]
    assert [(r.headers.get("range"), r.status) for r in gets] == [(None, 200), (None, 200)]


def test_token_only_travels_in_the_authorization_header(hub, api, adapter_dir, tmp_path):
    api.create_repo("org/ad")
    api.upload_folder(repo_id="org/ad", folder_path=adapter_dir)
    _snapshot(hub, "org/ad", tmp_path)
    list(api.list_models(search="ad"))

    requests = hub.requests
    assert len(requests) > 10
    for r in requests:
        assert "authorization" not in r.headers
        assert TOKEN not in r.path and not any(TOKEN in v for v in r.headers.values())
        assert r.authorized == (r.method != "PUT")  # the LFS href is a one-time ticket: no token sent there


def test_configure_client_points_default_calls_at_the_server(hub, tmp_path, monkeypatch):
    hub.commit("org/a", {"a.txt": b"a"})
    hub.configure_client(monkeypatch, tmp_path / "home")
    assert HfApi().whoami()["name"] == "tester"
    path = Path(hf_hub_download("org/a", "a.txt"))  # no endpoint, token or cache_dir
    assert path.read_bytes() == b"a" and (tmp_path / "home" / "hub") in path.parents
    assert all(r.authorized for r in hub.requests)


def test_subprocess_client_reads_the_environment(hub, tmp_path):
    head = hub.commit("org/a", {"a.txt": b"a"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(hub.client_env(tmp_path / "home"))
    code = "from huggingface_hub import HfApi; print(HfApi().model_info('org/a').sha)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == head, out.stderr
    assert hub.requests[-1].authorized
