"""`zoo pull` / `zoo push` / `zoo search` with the real `huggingface_hub` client against tests/hubserver.py.

No mocks: the client talks HTTP to a Hub-compatible server on 127.0.0.1. In-process calls use
`server.configure_client` (it patches the constants the client read at import); the CLI round trip runs
`python -m cli.main` in subprocesses with `server.client_env`. The server's token is a planted one, checked
to appear nowhere but in the Authorization header.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from tests.hubserver import PLANTED_TOKEN, HubServer
from tests.tiny import make_peft_adapter, peft_model, tiny_llama, token_ids
from zoo import hub
from zoo.errors import ZooError
from zoo.formats.peft import CONFIG_NAME, PICKLE_NAME, SAFETENSORS_NAME

REPO = Path(__file__).resolve().parents[1]
BASE_ID = "test-org/tiny-llama"


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> list[Path]:
    """Two PEFT LoRA folders for the same base (seeds 0 and 1): old and new commits of one repo.

    Their base is recorded as the Hub id BASE_ID (written into the config afterwards: a model named so when
    saved would make PEFT look the base up on the Hub)."""
    root = tmp_path_factory.mktemp("adapters")
    folders = []
    for seed in (0, 1):
        folder = make_peft_adapter(base, root / f"lora{seed}", seed=seed, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        config = json.loads((folder / CONFIG_NAME).read_text()) | {"base_model_name_or_path": BASE_ID}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        folders.append(folder)
    return folders


def files_of(folder: Path, names=(CONFIG_NAME, SAFETENSORS_NAME)) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


def stored(ref: str) -> dict[str, bytes]:
    """The files of a registered entry, read through the store."""
    return files_of(zoo.api.adapter_folder(zoo.show(ref)), [f.path for f in zoo.show(ref).files])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids()).logits


def resolve_gets(server: HubServer, path: str) -> list[tuple[str | None, int | None]]:
    return [(r.headers.get("range"), r.status) for r in server.requests if r.method == "GET" and r.path.endswith("/" + path)]


def one_line_error(code: int, out: str, err: str, expected: str) -> None:
    """Exit code 2 and one line `error: ...` on stderr (besides the client's progress bars)."""
    assert code == 2, (out, err)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], err
    assert "Traceback" not in out + err and PLANTED_TOKEN not in out + err


# --- pull ------------------------------------------------------------------------------------------------


def test_pull_pins_the_commit_and_a_new_commit_is_the_next_version(server, base, adapters, zoo_cli):
    old, new = adapters
    sha1 = server.commit("org/sql", files_of(old))
    first = hub.pull("org/sql")
    assert (first.ref, first.source.kind, first.source.repo_id, first.source.revision) == ("sql@1", "hub", "org/sql", sha1)
    assert stored("sql@1") == files_of(old)

    n_requests = len(server.requests)
    assert hub.pull("org/sql@main") == first  # the same commit: nothing downloaded, nothing registered
    assert not any("/resolve/" in r.path for r in server.requests[n_requests:])
    assert len(zoo.list_adapters()) == 1

    sha2 = server.commit("org/sql", files_of(new))
    second = hub.pull("org/sql")
    assert (second.ref, second.source.revision) == ("sql@2", sha2)
    assert hub.pull(f"org/sql@{sha1}") == first  # an old commit by sha: already there
    assert stored("sql") == files_of(new) and stored("sql@1") == files_of(old)

    # sql@1 still loads the old adapter: its outputs are PEFT's on the old folder
    expected = logits(peft_model(base, old))
    assert torch.allclose(logits(zoo.load(copy.deepcopy(base), "sql@1")), expected, atol=1e-5)
    assert not torch.allclose(logits(zoo.load(copy.deepcopy(base), "sql")), expected, atol=1e-3)

    code, out, _ = zoo_cli("list", "--json")
    assert code == 0 and [(e["name"], e["version"], e["source"]["revision"]) for e in json.loads(out)] == [("sql", 1, sha1), ("sql", 2, sha2)]


def test_pull_by_branch_and_by_commit_sha(server, adapters):
    from huggingface_hub import HfApi

    old, new = adapters
    sha_main = server.commit("org/sql", files_of(old))
    HfApi().create_branch("org/sql", branch="exp/v2")
    sha_exp = server.commit("org/sql", files_of(new), branch="exp/v2")

    exp = hub.pull("org/sql@exp/v2", name="sql-exp")
    assert (exp.ref, exp.source.revision) == ("sql-exp@1", sha_exp) and stored("sql-exp") == files_of(new)
    pinned = hub.pull(f"org/sql@{sha_main}", name="sql-main")
    assert (pinned.ref, pinned.source.revision) == ("sql-main@1", sha_main) and stored("sql-main") == files_of(old)
    assert zoo.show("sql-exp").method == pinned.method  # same config, different weights


def test_corrupted_file_is_detected_by_its_hash_and_nothing_is_registered(server, adapters, isolated_zoo, tmp_path):
    server.commit("org/sql", files_of(adapters[0]))
    server.corrupt("org/sql", SAFETENSORS_NAME)  # LFS: the sha256 catches it
    server.commit("org/cfg", files_of(adapters[0]))
    server.corrupt("org/cfg", CONFIG_NAME)  # a regular file: its git blob sha1 catches it
    store_before = sorted(p.relative_to(isolated_zoo) for p in (isolated_zoo / "zoo-home").rglob("*"))

    with pytest.raises(ZooError, match=r"org/sql@\w{12}: adapter_model.safetensors does not match the Hub's sha256"):
        hub.pull("org/sql")
    with pytest.raises(ZooError, match=r"adapter_config.json does not match the Hub's git sha1"):
        hub.pull("org/cfg")

    assert zoo.list_adapters() == []
    assert sorted(p.relative_to(isolated_zoo) for p in (isolated_zoo / "zoo-home").rglob("*")) == store_before
    snapshots = {s.parent.parent.name: s for s in (tmp_path / "hf-home" / "hub").glob("models--org--*/snapshots/*")}
    assert set(snapshots) == {"models--org--sql", "models--org--cfg"}
    assert not (snapshots["models--org--sql"] / SAFETENSORS_NAME).exists()  # the bad copies left the client's cache
    assert not (snapshots["models--org--cfg"] / CONFIG_NAME).exists() and (snapshots["models--org--cfg"] / SAFETENSORS_NAME).exists()


def test_interrupted_pull_resumes_and_verifies(server, tmp_path):
    """A weights file over one 10 MiB download chunk, dropped once mid-body: the client resumes with Range."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    folder = tmp_path / "big"
    folder.mkdir()
    r, width = 8, 196_608  # two fp32 tensors of 6 MiB: 12 MiB of random weights
    g = torch.Generator().manual_seed(0)
    prefix = "base_model.model.model.layers.0.mlp.down_proj"
    tensors = {f"{prefix}.lora_A.weight": torch.randn(r, width, generator=g), f"{prefix}.lora_B.weight": torch.randn(width, r, generator=g)}
    save_file(tensors, folder / SAFETENSORS_NAME)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["down_proj"], "task_type": "CAUSAL_LM"}
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    server.commit("org/big", files_of(folder))
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    assert (folder / SAFETENSORS_NAME).stat().st_size > chunk + (1 << 20)
    server.fail_after("org/big", SAFETENSORS_NAME, chunk + 4096)

    m = hub.pull("org/big")
    assert resolve_gets(server, SAFETENSORS_NAME) == [(None, 200), (f"bytes={chunk}-", 206)]
    assert stored(m.ref) == files_of(folder)
    assert [v.problem for v in zoo.verify(m.ref)] == [None, None]


def test_pickle_repo_needs_allow_pickle(server, adapters, zoo_cli):
    from safetensors.torch import load_file

    state = load_file(adapters[0] / SAFETENSORS_NAME)
    buffer = adapters[0].parent / "state.bin"
    torch.save(state, buffer)
    pickle = buffer.read_bytes()
    server.commit("org/old", {CONFIG_NAME: (adapters[0] / CONFIG_NAME).read_bytes(), PICKLE_NAME: pickle})

    one_line_error(*zoo_cli("pull", "org/old"), "--allow-pickle")
    assert zoo.list_adapters() == []
    code, out, err = zoo_cli("pull", "org/old", "--allow-pickle", "--json")
    assert code == 0, err
    m = json.loads(out)
    assert [f["path"] for f in m["files"]] == [CONFIG_NAME, SAFETENSORS_NAME]
    assert m["source"]["original_files"] == [{"path": PICKLE_NAME, "sha256": hashlib.sha256(pickle).hexdigest(), "size": len(pickle)}]
    converted = load_file(zoo.api.adapter_folder(zoo.show("old")) / SAFETENSORS_NAME)
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], state[k]) for k in state)


# --- push ------------------------------------------------------------------------------------------------


def test_model_card_follows_hub_conventions(server, adapters):
    from huggingface_hub import HfApi, ModelCard, hf_hub_download

    m = zoo.add(adapters[0], name="sql", task="text-to-sql", tags=["demo"], license="apache-2.0")
    url = hub.push("sql", "org/sql-lora")
    sha = url.rsplit("/", 1)[-1]
    assert url == f"{server.endpoint}/org/sql-lora/commit/{sha}"

    card = ModelCard.load("org/sql-lora")
    assert card.data.library_name == "peft" and card.data.base_model == BASE_ID and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation"
    assert {"lora", "adapter-zoo", "demo", f"base_model:adapter:{BASE_ID}"} <= set(card.data.tags)
    weights = m.file(SAFETENSORS_NAME)
    assert weights.sha256 in card.text and "r=4" in card.text and "q_proj, v_proj" in card.text
    assert 'PeftModel.from_pretrained(base, "org/sql-lora")' in card.text and "A LoRA adapter for [test-org/tiny-llama]" in card.text
    info = HfApi().model_info("org/sql-lora")
    assert f"base_model:adapter:{BASE_ID}" in info.tags and info.library_name == "peft"  # what the Hub derives

    published = json.loads(Path(hf_hub_download("org/sql-lora", "zoo.json", revision=sha)).read_text())
    assert published == {**m.model_dump(mode="json"), "source": {**m.source.model_dump(mode="json"), "path": None}}
    assert sorted(s.rfilename for s in info.siblings) == [".gitattributes", "README.md", CONFIG_NAME, SAFETENSORS_NAME, "zoo.json"]

    # a base known only as a local path is not a Hub id: no base_model, no base_model:adapter tag
    local = adapters[0].parent / "local-base"
    local.mkdir()
    (local / SAFETENSORS_NAME).write_bytes((adapters[0] / SAFETENSORS_NAME).read_bytes())
    config = json.loads((adapters[0] / CONFIG_NAME).read_text()) | {"base_model_name_or_path": str(local / "base")}
    (local / CONFIG_NAME).write_text(json.dumps(config))
    zoo.add(local, name="local")
    hub.push("local", "org/local", branch="dev")
    card = ModelCard.load(hf_hub_download("org/local", "README.md", revision="dev"))
    assert card.data.base_model is None and not any(t.startswith("base_model:") for t in card.data.tags)
    assert {b.name for b in HfApi().list_repo_refs("org/local").branches} == {"main", "dev"}


def test_zoo_json_is_checked_against_the_files(server, adapters):
    zoo.add(adapters[0], name="sql")
    hub.push("sql", "org/sql")
    server.commit("org/sql", {SAFETENSORS_NAME: (adapters[1] / SAFETENSORS_NAME).read_bytes()})  # weights swapped by hand
    zoo.remove("sql")
    with pytest.raises(ZooError, match=r"zoo.json lists adapter_model.safetensors with sha256 \w{12}…"):
        hub.pull("org/sql")
    assert zoo.list_adapters() == []


def test_push_then_pull_round_trip_through_the_cli(server, adapters, isolated_zoo, tmp_path):
    """Push from one registry, pull into another, in subprocesses: byte-identical files, the manifest restored,
    search finds it; the planted token shows up nowhere but in the Authorization header."""
    pushed = zoo.add(adapters[0], name="sql", task="text-to-sql", tags=["demo"], license="apache-2.0")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "ZOO_"))}

    def cli(home: Path, *args: str) -> tuple[dict | list | None, str]:
        env = {**clean, **server.client_env(tmp_path / "hf-cli"), "ZOO_HOME": str(home)}
        run = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert PLANTED_TOKEN not in run.stdout + run.stderr
        return (json.loads(run.stdout) if "--json" in args else None), run.stdout

    out, _ = cli(isolated_zoo / "zoo-home", "push", "sql", "org/sql-lora", "--json")
    sha = out["commit_url"].rsplit("/", 1)[-1]
    puller = tmp_path / "other-machine"
    pulled, _ = cli(puller, "pull", "org/sql-lora", "--json")

    assert pulled["source"] == {"kind": "hub", "path": None, "repo_id": "org/sql-lora", "revision": sha, "original_files": [], "members": [], "recipe": {}}
    mine = pushed.model_dump(mode="json")
    assert {k: v for k, v in pulled.items() if k not in ("source", "version")} == {k: v for k, v in mine.items() if k not in ("source", "version")}
    folder = puller / "adapters" / "sql" / str(pulled["version"])
    assert files_of(folder) == files_of(adapters[0])

    found, _ = cli(puller, "search", "--base", BASE_ID, "--method", "lora", "--json")
    assert [r["id"] for r in found] == ["org/sql-lora"]
    _, table = cli(puller, "search", "--base", BASE_ID)
    assert "org/sql-lora" in table and "adapter-zoo" in table

    # the token: in no file the zoo or the client wrote, not in the card, and in no request but its Authorization header
    for root in (isolated_zoo / "zoo-home", puller, tmp_path / "hf-cli"):
        for p in root.rglob("*"):
            assert not p.is_file() or PLANTED_TOKEN.encode() not in p.read_bytes(), p
    requests = server.requests
    assert all(PLANTED_TOKEN not in r.path and not any(PLANTED_TOKEN in v for v in r.headers.values()) for r in requests)
    assert all(r.authorized for r in requests if not r.path.startswith("/_lfs/"))  # the LFS href carries a ticket


# --- search ----------------------------------------------------------------------------------------------


def test_search_by_base_and_method(server, adapters):
    zoo.add(adapters[0], name="sql")
    other = adapters[0].parent / "other-base"
    other.mkdir()
    (other / SAFETENSORS_NAME).write_bytes((adapters[0] / SAFETENSORS_NAME).read_bytes())
    (other / CONFIG_NAME).write_text(json.dumps(json.loads((adapters[0] / CONFIG_NAME).read_text()) | {"base_model_name_or_path": "org/other"}))
    zoo.add(other, name="other")
    hub.push("sql", "org/sql")
    hub.push("other", "org/other-lora")
    server.commit("org/tuned", {"README.md": f"---\nbase_model: {BASE_ID}\nlibrary_name: transformers\n---\n".encode()})

    assert [r["id"] for r in hub.search(BASE_ID)] == ["org/sql"]
    assert [r["id"] for r in hub.search(BASE_ID, method="lora")] == ["org/sql"]
    assert hub.search(BASE_ID, method="ia3") == []
    found = hub.search("org/other")
    assert [r["id"] for r in found] == ["org/other-lora"] and found[0]["library_name"] == "peft" and len(found[0]["sha"]) == 40


# --- compositions ----------------------------------------------------------------------------------------


def test_compositions_round_trip_and_a_stack_needs_its_members(server, base, adapters, tmp_path, monkeypatch):
    from zoo.composition import compose

    zoo.add(adapters[0], name="sql")
    zoo.add(adapters[1], name="chat")
    compose("sql+chat", fusion="stack", name="duo")
    mix = compose("sql+chat", fusion="weighted", weights=[0.7, 0.3], method="cat", name="mix")
    expected = {ref: logits(zoo.load(copy.deepcopy(base), ref)) for ref in ("duo", "mix")}
    old_chat = hub.push("sql", "org/chat").rsplit("/", 1)[-1]  # org/chat's first commit holds other weights
    for name in ("sql", "chat", "duo", "mix"):
        hub.push(name, f"org/{name}")

    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "fresh"))  # another machine
    monkeypatch.setenv("ZOO_REGISTRY", str(tmp_path / "fresh" / "registry.json"))
    with pytest.raises(ZooError, match="composition member 'sql' .* is not in the registry"):
        hub.pull("org/duo")
    assert zoo.list_adapters() == []

    pulled_mix = hub.pull("org/mix")  # a weighted composition is a plain PEFT adapter: no members needed
    assert pulled_mix.kind == "adapter" and pulled_mix.files == mix.files
    hub.pull("org/sql")
    hub.pull(f"org/chat@{old_chat}", name="chat")
    with pytest.raises(ZooError, match="composition member 'chat'"):  # chat@1 here has other weights
        hub.pull("org/duo")
    assert hub.pull("org/chat").ref == "chat@2"
    duo = hub.pull("org/duo")  # members are found by name and weights sha256; versions are local numbering
    assert duo.fusion == "stack" and [(m.name, m.version) for m in duo.members] == [("sql", 1), ("chat", 2)]
    for ref in ("duo", "mix"):
        assert torch.allclose(logits(zoo.load(copy.deepcopy(base), ref)), expected[ref], atol=1e-5)


# --- errors ----------------------------------------------------------------------------------------------


def test_hub_errors_are_one_line_with_exit_2(server, adapters, zoo_cli):
    server.commit("org/sql", files_of(adapters[0]))
    server.commit("org/notes", {"notes.txt": b"not an adapter"})
    one_line_error(*zoo_cli("pull", "org/missing"), "repo org/missing not found")
    one_line_error(*zoo_cli("pull", "org/sql@nope"), "revision 'nope' not found in org/sql")
    one_line_error(*zoo_cli("pull", f"org/sql@{'f' * 40}"), f"revision '{'f' * 40}' not found in org/sql")
    one_line_error(*zoo_cli("pull", "org/sql@"), "invalid Hub reference")
    one_line_error(*zoo_cli("pull", "org/notes"), "holds neither adapter_config.json nor zoo.json")
    one_line_error(*zoo_cli("push", "nobody", "org/x"), "no adapter named 'nobody'")
    assert zoo_cli("add", adapters[1], "--name", "sql")[0] == 0  # the name is taken by a local folder
    one_line_error(*zoo_cli("pull", "org/sql"), "an adapter named 'sql' already exists from another source")
    assert len(zoo.list_adapters()) == 1


def test_auth_and_connection_errors(adapters, zoo_cli, tmp_path, monkeypatch):
    zoo.add(adapters[0], name="sql")
    with HubServer(token=PLANTED_TOKEN, require_token_for_reads=True) as server:
        server.commit("org/sql", files_of(adapters[0]))
        server.configure_client(monkeypatch, tmp_path / "hf-anon", token="")  # no token at all
        one_line_error(*zoo_cli("push", "sql", "org/new"), "authentication failed")
        one_line_error(*zoo_cli("pull", "org/sql"), "authentication failed")
        server.configure_client(monkeypatch, tmp_path / "hf-wrong", token=PLANTED_TOKEN[:-4] + "beef")  # a wrong (planted) token
        code, out, err = zoo_cli("pull", "org/sql")
        one_line_error(code, out, err, "authentication failed")
        assert PLANTED_TOKEN[:-4] not in out + err and "HF_TOKEN" in err
    assert zoo.list_adapters()[0].source.kind == "local" and len(zoo.list_adapters()) == 1
    with HubServer() as gone:  # a server never called: no pooled keep-alive connection outlives it
        gone.configure_client(monkeypatch, tmp_path / "hf-gone")
        endpoint = gone.endpoint
    one_line_error(*zoo_cli("pull", "org/sql"), f"cannot reach {endpoint}")
