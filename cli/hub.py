"""`zoo pull`, `zoo push`, `zoo search`: the Hugging Face Hub.

`huggingface_hub` (and `zoo.hub`) are imported inside the commands, so `zoo --help` and the other commands
start without them. The client takes its token from `HF_TOKEN` or `hf auth login` and its endpoint from
`HF_ENDPOINT`; nothing here reads or prints either token.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Optional

import typer

RegistryOpt = Annotated[
    Optional[str],
    typer.Option("--registry", envvar="ZOO_REGISTRY", help="Registry: a *.db file (SQLite), a *.json file, or postgresql://user@host:port/db (default: $ZOO_HOME/registry.db).", show_envvar=True),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def pull(
    repo_id: Annotated[str, typer.Argument(help="REPO_ID[@REVISION]: a Hub repo at a branch, tag or commit sha (default: main).")],
    name: Annotated[Optional[str], typer.Option(help="Registry name (default: the pushed name, else the repo's name).")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Accept an adapter_model.bin pickle (loaded with weights_only=True, stored as safetensors).")] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download an adapter from the Hub, verify every file against the Hub's hashes, and register it pinned to its commit."""
    from zoo import hub
    from zoo.units import human_bytes

    m = hub.pull(repo_id, name=name, allow_pickle=allow_pickle, progress=not as_json and sys.stderr.isatty(), registry=registry)
    if as_json:
        return _print_json(m.model_dump(mode="json"))
    typer.echo(
        f"pulled {m.source.repo_id}@{m.source.revision[:12]} as {m.ref}: {m.label}, "
        f"{m.size.trainable_params:,} params, {human_bytes(m.size.bytes)}"
    )


def push(
    name: Annotated[str, typer.Argument(help="NAME or NAME@VERSION of a registered adapter or composition.")],
    repo_id: Annotated[str, typer.Argument(help="ORG/NAME on the Hub (created if needed), or NAME for your own user.")],
    private: Annotated[bool, typer.Option(help="Create the repo private (an existing repo keeps its visibility).")] = False,
    branch: Annotated[Optional[str], typer.Option(help="Commit to this branch (created from main if needed).")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload an entry's files, its manifest (zoo.json) and a model card to a Hub repo, in one commit."""
    from zoo import hub

    url = hub.push(name, repo_id, private=private, branch=branch, progress=not as_json and sys.stderr.isatty(), registry=registry)
    if as_json:
        return _print_json({"pushed": name, "commit_url": url})
    typer.echo(f"pushed {name}: {url}")


def search(
    base: Annotated[str, typer.Option(help="The base model's Hub id, e.g. meta-llama/Llama-3.1-8B.")],
    method: Annotated[Optional[str], typer.Option(help="Only repos tagged with this method, e.g. lora.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many results.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Find adapters of a base model on the Hub (repos tagged base_model:adapter:BASE)."""
    from zoo import hub

    found = hub.search(base, method=method, limit=limit)
    if as_json:
        return _print_json(found)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(found)} adapter repo(s) of {base}")
    for col in ("repo", "library", "tags", "updated"):
        table.add_column(col, overflow="fold")
    for r in found:
        tags = [t for t in r["tags"] if not t.startswith(("base_model:", "license:", "region:")) and t != r["library_name"]]
        table.add_row(r["id"], r["library_name"] or "-", ", ".join(tags) or "-", (r["last_modified"] or "-")[:10])
    Console(soft_wrap=False, markup=False, highlight=False).print(table)  # tags come from the Hub: shown, never parsed as markup


def register_hub_commands(app: typer.Typer) -> None:
    """Add `pull`, `push` and `search` to the `zoo` app."""
    for command in (pull, push, search):
        app.command()(command)
