"""The Hugging Face Hub: `pull` an adapter repo into the registry, `push` an entry to a repo, `search` by base model.

    >>> zoo.hub.pull("org/llama-sql@main")                     # doctest: +SKIP
    >>> zoo.hub.push("llama-sql", "me/llama-sql", private=True)  # doctest: +SKIP
    >>> zoo.hub.search("meta-llama/Llama-3.1-8B", method="lora")  # doctest: +SKIP

Everything goes through the real `huggingface_hub` client, which brings resume, parallel downloads, progress
bars, the token (`HF_TOKEN` or `hf auth login`) and the endpoint (`HF_ENDPOINT`); the token never passes through
this module. The client checks only sizes, so `pull` checks every file against the Hub's own hashes (an LFS file's
sha256, a regular file's git blob sha1) before anything is registered, and pins the commit sha in the manifest.
`huggingface_hub` is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

from zoo.api import PathLike, adapter_folder, measure_size, open_registry, open_store, register, register_folder
from zoo.errors import ZooError
from zoo.formats import peft as peft_format
from zoo.formats.adapterhub import FUSION_CONFIG_NAME as ADAPTERHUB_FUSION_CONFIG
from zoo.formats.tensor_values import check_tensor_values
from zoo.formats.adapterhub import FUSION_WEIGHTS_NAMES as ADAPTERHUB_FUSION_WEIGHTS
from zoo.formats.folder import WEIGHTS_NAMES
from zoo.formats.peft import CONFIG_NAME
from zoo.loading import FUSION_WEIGHTS
from zoo.manifest import METHOD_TITLES, AdapterManifest, CompositionManifest, Manifest, Source, check_name, method_summary, parse_manifest
from zoo.store import CHUNK, sha256_file
from zoo.units import human_bytes

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

ZOO_MANIFEST = "zoo.json"  # the manifest as pushed: `pull` restores it
CARD_NAME = "README.md"
# What `pull` fetches when the repo has it (PEFT or AdapterHub files); a pickle only when there is no safetensors.
FETCHED = (
    CONFIG_NAME, *(name for names in WEIGHTS_NAMES.values() for name in names), FUSION_WEIGHTS,
    ADAPTERHUB_FUSION_CONFIG, *ADAPTERHUB_FUSION_WEIGHTS, ZOO_MANIFEST, CARD_NAME,
)
_SAFETENSORS_OF_PICKLE = {pickle: safetensors for safetensors, pickle in [*WEIGHTS_NAMES.values(), ADAPTERHUB_FUSION_WEIGHTS]}
# PEFT task types -> the Hub's pipeline tags.
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def split_hub_ref(ref: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); 'org/name' -> ('org/name', None). Revisions may hold '/'."""
    repo_id, sep, revision = ref.partition("@")
    if not repo_id or (sep and not revision):
        raise ZooError(f"invalid Hub reference {ref!r}", "write REPO_ID or REPO_ID@REVISION, e.g. org/my-lora@main")
    return repo_id, revision or None


#: Credentials a server (or a proxy in front of it) may quote back in an error: Hub tokens and bearer headers. The
#: bearer's separator may be any run of non-alphanumerics, URL-encoded ones (`%20`) included; `hf_…` is hidden
#: wherever it stands, glued to other text or not.
_SECRETS = re.compile(
    r"(?i)(bearer(?:%[0-9a-f]{2}|[^a-z0-9%])+)\S+|hf_[A-Za-z0-9]{6,}[A-Za-z0-9_]*"
    r"|(token[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"
)


def redact(text: str) -> str:
    """`text` with every token in it replaced by `***` (`hf_…`, `Bearer …`, `token=…`, and the caller's own token,
    `HF_TOKEN` or the stored login, with or without its `hf_` prefix): what a server answers is printed, and a proxy
    that echoes the request's headers would otherwise print the caller's token."""
    def hide(m: re.Match) -> str:
        kept = m.group(1) or m.group(2)  # "Bearer " or "token=": kept, the secret after it hidden
        return f"{kept}***" if kept else "hf_***"

    text = _SECRETS.sub(hide, text)
    for secret in _own_token_forms():
        text = text.replace(secret, "***")
    return text


def _own_token_forms() -> list[str]:
    """The caller's token as it may appear in text: whole and without its `hf_` prefix (too short a one is left
    alone, as replacing it would garble ordinary words)."""
    from huggingface_hub import get_token

    token = (get_token() or "").strip()
    forms = [token, token.removeprefix("hf_")]
    return [form for form in dict.fromkeys(forms) if len(form) >= 6]


@contextmanager
def quiet_client(progress: bool = False) -> Iterator[None]:
    """The client's own output off while it works: its retry log lines (the one-line error says what failed) and,
    unless `progress`, its progress bars (not wanted in logs, pipes or --json output)."""
    import logging

    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    logger = logging.getLogger("huggingface_hub")
    level, bars_were_off = logger.level, are_progress_bars_disabled()
    logger.setLevel(logging.ERROR)
    if not progress:
        disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not progress and not bars_were_off:
            enable_progress_bars()


@contextmanager
def hub_errors(what: str, revision: str | None = None, *, progress: bool = False) -> Iterator[None]:
    """The client's errors as one-line `ZooError`s (with the client's own log lines and, unless `progress`, bars off).
    They name the endpoint, repo and revision, never a token: what the server says is redacted first."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HFValidationError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import httpx  # httpx2 in huggingface_hub 2.x, httpx in 1.x

    endpoint = constants.ENDPOINT
    login = "set HF_TOKEN or run `hf auth login`"
    unreachable = ZooError(f"cannot reach {endpoint}", "check the network, or HF_ENDPOINT; or set HF_HUB_OFFLINE=1 to work offline from the cache")

    def server_error(e: HfHubHTTPError, status: int) -> ZooError:
        return ZooError(f"the Hub at {endpoint} had a server error (HTTP {status}) on {what}: {_first_line(e.server_message)}", "retry later; nothing was changed")

    try:
        with quiet_client(progress):
            yield
    except OfflineModeIsEnabled:
        raise ZooError("the Hub client is offline (HF_HUB_OFFLINE=1)", "unset HF_HUB_OFFLINE to reach the Hub") from None
    except RevisionNotFoundError:
        raise ZooError(f"revision {revision!r} not found in {what}", "use a branch, a tag or a full 40-hex commit sha of the repo") from None
    except RemoteEntryNotFoundError as e:
        raise ZooError(f"a file is missing from {what}@{revision or 'main'}: {_first_line(e.server_message)}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):  # checked first: on huggingface.co an anonymous 401 can come as RepositoryNotFoundError
            raise ZooError(f"authentication failed at {endpoint} for {what} (HTTP {status})", f"{login} (pushing needs a token with write access)") from None
        if isinstance(e, RepositoryNotFoundError):
            raise ZooError(f"repo {what} not found on {endpoint} (or private)", f"check the id; for a private repo {login}") from None
        if status is not None and status >= 500:
            raise server_error(e, status) from None
        raise ZooError(f"{endpoint} answered HTTP {status} for {what}: {_first_line(e.server_message)}", "retry later") from None
    except LocalEntryNotFoundError as e:  # snapshot_download's answer when a download failed and the cache lacks the files
        cause = e.__cause__
        if isinstance(cause, HfHubHTTPError) and cause.response is not None and cause.response.status_code >= 500:
            raise server_error(cause, cause.response.status_code) from None
        raise ZooError(f"{unreachable.message}, and {what} is not in the local cache", unreachable.hint) from None
    except httpx.TransportError as e:
        raise ZooError(f"{unreachable.message} ({type(e).__name__})", unreachable.hint) from None
    except HFValidationError as e:
        raise ZooError(f"invalid repo id {what!r}: {_first_line(str(e))}", "write ORG/NAME") from None
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates, which no URL can carry
        raise ZooError(f"{what!r} or its revision holds bytes that are not UTF-8", "write the repo id and revision in plain text") from None


def _first_line(text: str | None) -> str:
    """The first line of what a server said, tokens redacted."""
    return redact((text or "").strip().splitlines()[0]) if (text or "").strip() else "no details"


# --- pull ------------------------------------------------------------------------------------------------


def pull(
    ref: str, *, name: str | None = None, allow_pickle: bool = False, progress: bool = False, registry: PathLike | None = None
) -> Manifest:
    """Download an adapter repo at a revision, verify every file against the Hub's hashes, and register it.

    The revision (branch, tag or commit; default `main`) is resolved to its commit sha, which the manifest pins.
    The same commit again returns the existing entry; a new commit of the same repo becomes the next version of the
    same name. A repo pushed by `push` brings its `zoo.json`, restored as it was (but for `source` and `version`).

    Args:
        ref (`str`): `REPO_ID` or `REPO_ID@REVISION`, e.g. `org/llama-sql@v2` or `org/llama-sql@<40-hex sha>`.
        name (`str`, *optional*): registry name; default the name in `zoo.json`, else the repo's name part.
        allow_pickle (`bool`): accept a repo whose only weights are `adapter_model.bin` (loaded with
            `torch.load(weights_only=True)` and stored as safetensors).
        progress (`bool`): show the client's download progress bars (on stderr).
        registry: the registry (default `$ZOO_REGISTRY`, else `<ZOO_HOME>/registry.db`).

    Returns:
        The registered manifest.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    repo_id, revision = split_hub_ref(ref)
    if name is not None:
        check_name(name)
    api = HfApi()
    with hub_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision)
    repo_id, sha = info.id, info.sha
    where = f"{repo_id}@{sha[:12]}"
    pulled = [m for m in open_registry(registry).from_source("hub", repo_id, sha) if name in (None, m.name)]
    if pulled:
        return pulled[-1]
    with hub_errors(repo_id, sha, progress=progress):
        tree = {f.path: f for f in api.list_repo_tree(repo_id, revision=sha, recursive=True) if isinstance(f, RepoFile)}
        if not {CONFIG_NAME, ZOO_MANIFEST, ADAPTERHUB_FUSION_CONFIG} & tree.keys():
            raise ZooError(f"{where} holds neither {CONFIG_NAME} nor {ZOO_MANIFEST}", "is it an adapter repo? (see its files on the Hub)")
        wanted = [p for p in FETCHED if p in tree and _SAFETENSORS_OF_PICKLE.get(p) not in tree]
        folder = Path(snapshot_download(repo_id, revision=sha, allow_patterns=wanted))
    for path in wanted:
        _check_against_hub(folder / path, tree[path], where)

    source = Source(kind="hub", repo_id=repo_id, revision=sha)
    if ZOO_MANIFEST in tree:
        from zoo.gc import adding

        with adding(open_store()):  # a concurrent `zoo gc` keeps the blobs until the entry is in
            manifest = _restore(folder, source, name, where, registry)
            return register(manifest, new_version_of_same_source=True, registry=registry)
    if ADAPTERHUB_FUSION_CONFIG in tree:
        from zoo.composition import register_fusion_folder

        return register_fusion_folder(folder, name=name or repo_id.split("/")[-1], source=source, allow_pickle=allow_pickle, registry=registry)
    return register_folder(
        folder, name=name or repo_id.split("/")[-1], source=source, allow_pickle=allow_pickle,
        new_version_of_same_source=True, registry=registry,
    )


def git_blob_sha1(path: Path) -> str:
    """Git's object id of a file, which the Hub lists as a regular file's oid: sha1 of `blob <size>\\0` + bytes."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_against_hub(local: Path, entry: Any, where: str) -> None:
    """`local` must hash to what the Hub lists for `entry` (a `RepoFile`); a bad copy is dropped from the
    client's cache, else the next pull would take it from there again without downloading."""
    if not local.is_file():
        raise ZooError(f"{where}: {entry.path} was not downloaded", "retry the pull")
    size = local.stat().st_size
    if entry.lfs is not None:
        algo, got, expected = "sha256", sha256_file(local)[0], entry.lfs.sha256
    else:
        algo, got, expected = "git sha1", git_blob_sha1(local), entry.blob_id
    if (got, size) != (expected, entry.size):
        blob = local.resolve()
        local.unlink()
        blob.unlink(missing_ok=True)
        raise ZooError(
            f"{where}: {entry.path} does not match the Hub's {algo} ({got[:12]}…, {size:,} bytes != {expected[:12]}…, {entry.size:,} bytes)",
            "the download is corrupt and was dropped from the cache; nothing was registered: retry the pull",
        )


def _restore(folder: Path, source: Source, name: str | None, where: str, registry: PathLike | None) -> Manifest:
    """The pushed `zoo.json`, re-verified against the downloaded files, its files put in the store."""
    data = peft_format.read_json_config(folder / ZOO_MANIFEST, ZOO_MANIFEST)
    manifest = parse_manifest(data, f"{ZOO_MANIFEST} of {where}")
    for f in manifest.files:
        local = folder / f.path
        got = sha256_file(local) if local.is_file() else ("missing", 0)
        if got != (f.sha256, f.size):
            raise ZooError(
                f"{where}: {ZOO_MANIFEST} lists {f.path} with sha256 {f.sha256[:12]}… ({f.size:,} bytes), the repo has {got[0][:12]}… ({got[1]:,} bytes)",
                "the repo's files changed after `zoo push`: push the adapter again",
            )
    for f in manifest.files:  # the values `zoo add` refuses (NaN, ±Inf, integer weights) are refused here too
        if f.path.endswith(".safetensors"):
            check_tensor_values(folder / f.path)
    if isinstance(manifest, AdapterManifest):
        _check_against_files(manifest, folder, where)
    if isinstance(manifest, AdapterManifest):  # sizes and ranks are measured, never taken from input
        if manifest.weights is None or measure_size(folder / manifest.weights.path, manifest.method) != manifest.size:
            raise ZooError(f"{where}: the sizes in {ZOO_MANIFEST} are not those of its weights", "push the adapter again")
    update: dict[str, Any] = {"name": name or manifest.name, "version": 1, "source": source}
    if isinstance(manifest, CompositionManifest):
        update["members"] = _local_members(manifest, where, registry)
    store = open_store()
    for f in manifest.files:
        store.put(folder / f.path, f.path)
    return manifest.model_copy(update=update)


def _check_against_files(manifest: AdapterManifest, folder: Path, where: str) -> None:
    """`zoo.json` must say what the repo's own adapter config says: the files are what PEFT, vLLM and `zoo load`
    read, so a `zoo.json` claiming another `lora_alpha` (say) would make the registry lie about the adapter."""
    import warnings

    from zoo.formats.folder import attention_layout, read_adapter_folder

    with tempfile.TemporaryDirectory() as work, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys: compared below
        files = read_adapter_folder(folder, workdir=Path(work), model_config=attention_layout(manifest.method))
    claimed = {"format": manifest.format, "task_type": manifest.task_type, "extra_config": manifest.extra_config, **manifest.method.model_dump()}
    found = {"format": files.format, "task_type": files.task_type, "extra_config": files.unknown_keys, **files.config.model_dump()}
    for key in dict.fromkeys([*claimed, *found]):
        if claimed.get(key) != found.get(key):
            raise ZooError(
                f"{where}: {ZOO_MANIFEST} says {key}={claimed.get(key)!r:.60} but {CONFIG_NAME} says {found.get(key)!r:.60}",
                "the repo's files are what loads; its zoo.json was edited after `zoo push`: push the adapter again",
            )


def _local_members(composition: CompositionManifest, where: str, registry: PathLike | None):
    """A composition's members, found locally by name and weights sha256 (versions are local numbering)."""
    reg = open_registry(registry)
    members = []
    for member in composition.members:
        local = [m for m in reg.versions(member.name) if isinstance(m, AdapterManifest) and (w := m.weights) and w.sha256 == member.sha256]
        if not local:
            raise ZooError(
                f"{where}: composition member {member.name!r} (weights sha256 {member.sha256[:12]}…) is not in the registry",
                f"pull or add that adapter as {member.name!r} first (push members before their composition)",
            )
        members.append(member.model_copy(update={"version": local[-1].version}))
    return members


# --- push ------------------------------------------------------------------------------------------------


def push(
    name_or_ref: str, repo_id: str, *, private: bool = False, branch: str | None = None, progress: bool = False,
    registry: PathLike | None = None,
) -> str:
    """Upload a registry entry to a Hub repo in one commit: its files, `zoo.json` and a model card (`README.md`).

    The repo is created if needed (`private` applies only then); `branch` is created from `main` if needed.
    A composition (stack/attention) names its members by name and weights sha256: push them too, since `pull`
    of a composition needs its members in the local registry.

    Args:
        name_or_ref (`str`): `NAME` (latest version) or `NAME@VERSION`.
        repo_id (`str`): `ORG/NAME`, or `NAME` for the token's user.
        progress (`bool`): show the client's upload progress bars (on stderr).

    Returns:
        The commit's URL (it ends with the commit sha, for `pull REPO_ID@SHA`).
    """
    from huggingface_hub import HfApi

    manifest = open_registry(registry).resolve(name_or_ref)
    source = adapter_folder(manifest, registry=registry)  # every blob hash-checked: a corrupt one is never pushed
    api = HfApi()
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        for f in manifest.files:
            shutil.copyfile(source / f.path, folder / f.path)
        published = published_manifest(manifest)
        (folder / ZOO_MANIFEST).write_text(json.dumps(published, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        with hub_errors(repo_id, branch, progress=progress):
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            model_card(manifest, repo_id, branch).save(folder / CARD_NAME)
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=branch, commit_message=f"zoo push {manifest.ref}")
    return commit.commit_url


def published_manifest(manifest: Manifest) -> dict[str, Any]:
    """The manifest as `push` publishes it (`zoo.json`): no local path, which means nothing on the Hub and may name
    the user's home — not the source folder, not a file a composition was trained on (its name stays), not a
    base model loaded from a folder."""
    published = manifest.model_dump(mode="json")
    published["source"]["path"] = None
    published["source"]["recipe"] = _without_paths(published["source"]["recipe"])
    if not is_hub_id(published["base_model"]["name_or_path"]):
        published["base_model"]["name_or_path"] = None
    return published


def _without_paths(value: Any) -> Any:
    """`value` (a recipe, at any depth: `extract.base`, `resize.from`) with each path-like string cut to its name."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    if isinstance(value, str) and ("/" in value or "\\" in value or value.startswith("~")):
        return PureWindowsPath(value).name  # splits at / and \ alike
    return value


def is_hub_id(name_or_path: str | None) -> bool:
    """A Hub model id (`gpt2`, `org/name`) rather than a local path."""
    return bool(name_or_path) and _REPO_ID.fullmatch(name_or_path) is not None and ".." not in name_or_path


def model_card(manifest: Manifest, repo_id: str, branch: str | None = None) -> ModelCard:
    """A model card following the Hub's conventions for adapters: `library_name: peft` for PEFT-format files,
    `base_model` (a Hub id, never a local path), tags with the method, `adapter-zoo` and `base_model:adapter:<id>`."""
    from huggingface_hub import ModelCard, ModelCardData

    base = manifest.base_model.name_or_path if is_hub_id(manifest.base_model.name_or_path) else None
    tags = [manifest.label, "adapter-zoo", *manifest.tags, *([f"base_model:adapter:{base}"] if base else [])]
    data = ModelCardData(
        library_name=({"peft": "peft", "adapterhub": "adapter-transformers"}[manifest.format] if isinstance(manifest, AdapterManifest) else None),
        base_model=base,
        base_model_relation="adapter" if base else None,
        pipeline_tag=PIPELINE_TAGS.get(getattr(manifest, "task_type", None) or ""),
        license=manifest.license,
        tags=list(dict.fromkeys(tags)),
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_body(manifest, repo_id, base, branch)}")


def _card_body(m: Manifest, repo_id: str, base: str | None, branch: str | None) -> str:
    on = f" for [{base}](https://huggingface.co/{base})" if base else ""  # a local base's path is not published
    pull_ref = f"{repo_id}@{branch}" if branch else repo_id
    lines = [f"# {m.name}", ""]
    if isinstance(m, AdapterManifest):
        c = m.method
        targets = getattr(c, "target_modules", None)
        targets = targets if isinstance(targets, str) or targets is None else ", ".join(sorted(targets))
        library = "AdapterHub `adapters`" if m.format == "adapterhub" else "PEFT"
        lines += [
            f"A {METHOD_TITLES[c.method]} adapter{on} ({library} format), pushed by adapter-zoo from `{m.ref}`.", "",
            "| | |", "|---|---|",
            f"| method | {c.method} {method_summary(c)} |",
            f"| target modules | {targets or '-'} |",
        ]
    else:
        members = ", ".join(f"`{x.name}` (weights sha256 `{x.sha256}`)" for x in m.members)
        lines += [
            f"A `{m.fusion}` composition of adapters{on}, pushed by adapter-zoo from `{m.ref}`.", "",
            "| | |", "|---|---|", f"| members | {members} |",
        ]
    lines += [
        f"| task | {m.task or '-'} |",
        f"| trainable parameters | {m.size.trainable_params:,} |",
        f"| size | {human_bytes(m.size.bytes)} |",
        "", "Files (checked by `zoo pull` against `zoo.json` and the Hub's own hashes):", "",
        *[f"- `{f.path}`: {f.size:,} bytes, sha256 `{f.sha256}`" for f in m.files],
        "", "## Use it", "", "With adapter-zoo:", "", "```bash", f"zoo pull {pull_ref}", "```", "",
    ]
    if isinstance(m, CompositionManifest):
        lines += ["`zoo pull` needs the members above in the local registry first, under those names and with those weights.", ""]
    q = json.dumps  # Python string literals in the snippets
    lines += ["```python", "import zoo", "", f"model = zoo.load({q(base or 'BASE_MODEL')}, {q(m.name)})", "```", ""]
    if isinstance(m, AdapterManifest) and m.format == "adapterhub":
        lines += [
            "With AdapterHub `adapters` (its folder layout, as saved by `save_adapter`):", "", "```python", "import adapters", "",
            "adapters.init(model)", f"name = model.load_adapter({q(repo_id)})", "model.set_active_adapters(name)", "```", "",
        ]
    elif isinstance(m, AdapterManifest):
        revision = f", revision={q(branch)}" if branch else ""
        lines += [
            "With PEFT:", "", "```python", "from peft import PeftModel", "from transformers import AutoModel", "",
            f"base = AutoModel.from_pretrained({q(base or 'BASE_MODEL')})  # or the class of your task",
            f"model = PeftModel.from_pretrained(base, {q(repo_id)}{revision})", "```", "",
        ]
    return "\n".join(lines)


# --- search ----------------------------------------------------------------------------------------------


def search(base: str, *, method: str | None = None, limit: int | None = 50) -> list[dict[str, Any]]:
    """Adapters of `base` on the Hub (the `base_model:adapter:<base>` tag), most downloaded first.

    Args:
        base (`str`): the base model's Hub id.
        method (`str`, *optional*): keep repos tagged with this method, e.g. `lora`.
        limit (`int`, *optional*): at most this many (None: all).

    Returns:
        One dict per repo: `id`, `sha`, `library_name`, `tags`, `last_modified` (ISO 8601 or None), `private`.
    """
    from huggingface_hub import HfApi

    if limit is not None and limit < 1:
        raise ZooError(f"limit {limit} is not a positive number", "pass --limit 1 or more")
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session

    filters = [f"base_model:adapter:{base}", *([method] if method else [])]
    with hub_errors(base):
        if not constants.HF_HUB_OFFLINE:  # one request the client does not retry: an unreachable Hub fails now, not after 23 s of backoff
            get_session().head(constants.ENDPOINT, headers=build_hf_headers(), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        found = list(HfApi().list_models(filter=filters, sort="downloads", limit=limit))
    return [
        {
            "id": m.id,
            "sha": m.sha,
            "library_name": m.library_name,
            "tags": list(m.tags or []),
            "last_modified": m.last_modified.isoformat() if m.last_modified else None,
            "private": m.private,
        }
        for m in found
    ]
