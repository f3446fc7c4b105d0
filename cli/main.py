"""`zoo`: the command line.

Start-up stays fast: torch and transformers are imported only inside the commands that compute.
Anticipated errors print one line (`error: ...`) and exit with 2; `--json` on read commands prints
machine-readable output.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from zoo.errors import USER_ERRORS, one_line

app = typer.Typer(
    name="zoo",
    help="A model-zoo registry and composition tool for parameter-efficient adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        import zoo

        try:
            installed = version("adapter-zoo")
        except PackageNotFoundError:  # run from a checkout without `pip install -e`
            installed = zoo.__version__
        typer.echo(f"zoo {installed}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """A model-zoo registry and composition tool for parameter-efficient adapters."""


RegistryOpt = Annotated[  # a str, not a Path: Path would fold postgresql:// into postgresql:/
    Optional[str],
    typer.Option("--registry", envvar="ZOO_REGISTRY", help="Registry: a *.db file (SQLite), a *.json file, or postgresql://user@host:port/db (default: $ZOO_HOME/registry.db).", show_envvar=True),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def console():
    from rich.console import Console

    return Console(soft_wrap=False, markup=False, highlight=False)  # names, tasks, tensor names: shown as they are, never parsed as markup, nor scanned by rich's highlighter (quadratic in a long task)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


@app.command()
def schema() -> None:
    """Print the JSON Schema of an adapter manifest."""
    from zoo.manifest import manifest_schema

    print_json(manifest_schema())


@app.command()
def add(
    path: Annotated[Path, typer.Argument(help="An adapter folder saved by PEFT or AdapterHub, or an AdapterHub fusion folder.")],
    name: Annotated[Optional[str], typer.Option(help="Registry name (default: the folder's name).")] = None,
    task: Annotated[Optional[str], typer.Option(help="What the adapter does, e.g. 'sentiment'.")] = None,
    tag: Annotated[Optional[list[str]], typer.Option(help="A tag (repeatable).")] = None,
    license: Annotated[Optional[str], typer.Option(help="License id, e.g. apache-2.0.")] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Accept a .bin pickle (loaded with weights_only=True, stored as safetensors).")] = False,
    base: Annotated[Optional[Path], typer.Option(help="The base's config.json or folder: AdapterHub prefix/MAM adapters need its attention layout.")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import an adapter folder into the store and register it (hashes and sizes are measured).
    Under a NAME added from the same folder, changed files become its next version (NAME@2); the same files change nothing."""
    from zoo import api
    from zoo.units import human_bytes

    known = {m.version for m in api.open_registry(registry).versions(api.entry_name(path, name))}
    m = api.add(path, name=name, task=task, tags=tag or (), license=license, allow_pickle=allow_pickle, base=base, registry=registry)
    if as_json:
        return print_json(m.model_dump(mode="json"))
    if m.version in known:
        return typer.echo(f"unchanged: {m.ref} already holds these files (nothing was added)")
    weights = m.weights if m.kind == "adapter" else m.files[-1] if m.files else None
    typer.echo(
        f"added {m.ref}: {m.label} {_shape(m)}, {m.size.trainable_params:,} params, "
        f"{human_bytes(m.size.bytes)}" + (f", sha256 {weights.sha256[:12]}" if weights else "")
    )


def _shape(m) -> str:
    """An adapter's shape ('r=8 α=16'), a composition's members ('a+b')."""
    from zoo.manifest import method_summary

    return method_summary(m.method) if m.kind == "adapter" else "+".join(x.name for x in m.members)


LIST_COLUMNS = [("name", "left"), ("ver", "right"), ("method", "left"), ("shape", "left"), ("base", "left"),
                ("task", "left"), ("params", "right"), ("size", "right")]
FLEXIBLE_COLUMNS = ("shape", "base", "task")  # free text: shortened (…) to fit a terminal; the rest is always whole
OPTIONAL_COLUMNS = ("base", "params")  # left out, in this order, where the others would not fit


def _fit_columns(rows: list[list[str]], room: int) -> tuple[dict[tuple[str, str], int], list[list[str]]]:
    """The columns (with widths) and rows that fit `room` characters, one line per row."""
    columns = {col: max([len(col[0]), *(len(row[i]) for row in rows)]) for i, col in enumerate(LIST_COLUMNS)}
    natural = lambda: sum(columns.values()) + 2 * (len(columns) - 1)  # noqa: E731  (two spaces between columns)
    for name in OPTIONAL_COLUMNS:
        if natural() > room:
            del columns[next(col for col in columns if col[0] == name)]
    flexible = sorted((col for col in columns if col[0] in FLEXIBLE_COLUMNS), key=columns.get)
    spare = room - natural() + sum(columns[col] for col in flexible)
    for n, col in enumerate(flexible):  # the narrowest first: what it leaves goes to the wider ones
        columns[col] = max(4, min(columns[col], spare // (len(flexible) - n)))
        spare -= columns[col]
    kept = [i for i, col in enumerate(LIST_COLUMNS) if col in columns]
    return columns, [[row[i] for i in kept] for row in rows]


def _manifest_row(m, short_base: bool) -> list[str]:
    """One entry as table cells; `short_base`: the base's last path part ('all-MiniLM-L6-v2'), `zoo show` has it whole."""
    from zoo.units import human_bytes

    base = m.base_model.name_or_path or "-"
    return [
        m.name, str(m.version), m.label, _shape(m), base.rstrip("/").rsplit("/", 1)[-1] if short_base else base,
        m.task or "-", f"{m.size.trainable_params:,}", human_bytes(m.size.bytes),
    ]


LIST_ROWS = 50  # a table longer than a screen or two is read with filters, --limit or --json


@app.command("list")
def list_(
    base: Annotated[Optional[str], typer.Option(help="Only adapters of this base model (substring).")] = None,
    method: Annotated[Optional[str], typer.Option(help="Only this method, e.g. lora.")] = None,
    task: Annotated[Optional[str], typer.Option(help="Only this task.")] = None,
    limit: Annotated[Optional[int], typer.Option(help=f"Show at most this many (table default {LIST_ROWS}; 0: all; --json default: all).")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List registered adapters (every version), oldest first: a table on a terminal, one line per entry in a pipe."""
    from zoo import api
    from zoo.errors import ZooError

    if limit is not None and not 0 <= limit < 2**63:  # the registry's SQL takes a 64-bit count
        raise ZooError(f"--limit {limit} is {'negative' if limit < 0 else 'too large'}", "give a count, or 0 for all")
    reg = api.open_registry(registry)
    if as_json:  # streamed as stored, one entry per line: 100,000 entries never sit in memory
        out, first = sys.stdout, True
        out.write("[")
        for line in reg.json_lines(base=base, method=method, task=task, limit=limit or None):
            out.write(("\n" if first else ",\n") + line.decode())
            first = False
        out.write("]\n" if first else "\n]\n")
        out.flush()
        return
    shown = LIST_ROWS if limit is None else limit or None
    found = reg.select(base=base, method=method, task=task, limit=shown)
    total = reg.count(base=base, method=method, task=task) if shown is not None and len(found) == shown else len(found)
    more = f"… {total - len(found):,} more: filter (--base, --method, --task), or --limit 0 for all, --json for JSON" if total > len(found) else None
    if not sys.stdout.isatty():  # for grep, cut and friends: a header and aligned columns, never wrapped; notes on stderr
        rows = [[name for name, _ in LIST_COLUMNS], *(_manifest_row(m, short_base=False) for m in found)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(LIST_COLUMNS))]
        for row in rows:
            cells = (cell.rjust(w) if justify == "right" else cell.ljust(w) for cell, w, (_, justify) in zip(row, widths, LIST_COLUMNS))
            typer.echo("  ".join(cells).rstrip())
        if more:
            typer.echo(f"{total:,} adapter version(s) in {reg.location}; {more}", err=True)
        return
    from rich.table import Table

    c = console()
    columns, rows = _fit_columns([_manifest_row(m, short_base=True) for m in found], c.width)
    hidden = [name for name, justify in LIST_COLUMNS if (name, justify) not in columns]
    table = Table(title=f"{total:,} adapter version(s) in {reg.location}", box=None, pad_edge=False, padding=(0, 1),
                  caption=f"not shown at this width: {', '.join(hidden)} (zoo show NAME, zoo list --json)" if hidden else None)
    for (col, justify), width in columns.items():
        table.add_column(col, justify=justify, no_wrap=True, overflow="ellipsis", width=width)
    for row in rows:
        table.add_row(*row)
    c.print(table)
    if more:
        typer.echo(more)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="NAME or NAME@VERSION.")],
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one adapter's manifest."""
    from zoo import api

    m = api.show(name, registry=registry)
    if as_json:
        return print_json(m.model_dump(mode="json"))
    from rich.table import Table

    from zoo.units import human_bytes

    c = console()
    c.print(f"{m.ref}  {m.label}  base={m.base_model.name_or_path or '-'}  task={m.task or '-'}")
    if arch := m.base_model.architecture or m.base_model.model_type:
        c.print(f"architecture: {arch}" + (f" ({m.base_model.model_type})" if m.base_model.architecture and m.base_model.model_type else ""))
    if m.kind == "adapter":
        c.print(f"config: {m.method.model_dump(exclude_defaults=True)}  task_type={m.task_type or '-'}")
    else:
        c.print(f"members: {', '.join(f'{x.name}@{x.version}' for x in m.members)}")
    if m.source.kind == "composition":
        c.print(f"composed from {', '.join(x.name for x in m.source.members)}: {m.source.recipe}")
    c.print(f"size: {m.size.trainable_params:,} params, {human_bytes(m.size.bytes)}; source: {m.source.kind} {m.source.path or m.source.repo_id or ''}")
    if m.files:  # a stack has none of its own
        files = Table("file", "bytes", "sha256")
        for f in m.files:
            files.add_row(f.path, f"{f.size:,}", f.sha256)
        c.print(files)


@app.command()
def remove(
    name: Annotated[str, typer.Argument(help="NAME (every version) or NAME@VERSION.")],
    cascade: Annotated[bool, typer.Option("--cascade", help="Also remove the compositions that use it (refused otherwise).")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Unregister an adapter (its blobs stay in the store until `zoo gc`)."""
    from zoo import api

    for m in api.remove(name, cascade=cascade, registry=registry):
        typer.echo(f"removed {m.ref}")


@app.command()
def gc(
    yes: Annotated[bool, typer.Option("--yes", help="Delete them (default: only list them, a dry run).")] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Free the store's blobs no registry entry names (left by `zoo remove`); a dry run unless --yes."""
    from zoo import api
    from zoo.units import human_bytes

    garbage = api.gc(delete=yes, registry=registry)
    if as_json:
        return print_json([g.__dict__ for g in garbage])
    for g in garbage:
        typer.echo(f"{'deleted' if g.deleted else 'unused'} {g.sha256} {human_bytes(g.size)}")
    total = human_bytes(sum(g.size for g in garbage))
    if yes:
        typer.echo(f"freed {total} ({len(garbage)} blob(s))")
    else:
        typer.echo(f"{len(garbage)} unused blob(s), {total}" + ("; `zoo gc --yes` deletes them" if garbage else ""))


@app.command("export")
def export(
    name: Annotated[Optional[str], typer.Argument(help="One adapter (NAME[@VERSION] or a folder) to export for a runtime. Without it: the whole registry.")] = None,
    to: Annotated[Optional[str], typer.Option(help="With NAME: gguf (llama.cpp --lora) | peft (a folder for vLLM / LoRAX; the default).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Without NAME: the registry.json to write (default: stdout). With NAME: the .gguf file or a new folder.")] = None,
    base: Annotated[Optional[Path], typer.Option(help="--to gguf: the base's config.json or folder (only the config is read).")] = None,
    outtype: Annotated[Optional[str], typer.Option(help="--to gguf: f32 (default) | f16 | bf16 | q8_0.")] = None,
    rank: Annotated[Optional[int], typer.Option(help="--to peft: resize every module to this rank first.")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the registry as a registry.json file (the interchange format), e.g. to move it to a team database;
    or, with NAME, one adapter in the form a runtime takes: a GGUF LoRA for llama.cpp, or a clean PEFT folder for vLLM."""
    from zoo.errors import ZooError

    if name is not None:
        return _export_adapter(name, to or "peft", out, base, outtype, rank, registry, as_json)
    given = [opt for opt, value in (("--to", to), ("--base", base), ("--outtype", outtype), ("--rank", rank)) if value is not None]
    if given:
        raise ZooError(f"{given[0]} applies to exporting one adapter", "give its NAME, e.g. zoo export my-lora --to gguf --base BASE --out my-lora.gguf")
    from zoo.interchange import export_registry

    count = export_registry(out, registry=registry)
    if out is not None:
        typer.echo(f"exported {count:,} entries to {out}", err=True)


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="A registry.json file (from `zoo export`, or the repo's catalogue).")],
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register every entry of a registry.json file, names and versions kept; blobs come from the store or from each
    entry's recorded source, hash-checked. Conflicting entries are reported (exit code 1) and skipped."""
    from zoo.interchange import import_registry

    report = import_registry(path, registry=registry, progress=_interactive(as_json))
    if as_json:
        print_json(report.__dict__)
    else:
        for ref, why in report.conflicts:
            typer.echo(f"conflict {ref}: {why}")
        typer.echo(f"imported {report.added:,} entries from {path}; {report.unchanged:,} already there; {len(report.conflicts):,} conflict(s)")
    if report.conflicts:
        raise typer.Exit(1)


@app.command()
def verify(
    name: Annotated[Optional[str], typer.Argument(help="NAME or NAME@VERSION (default: everything).")] = None,
    repair: Annotated[bool, typer.Option("--repair", help="Fetch missing or corrupt files again from their recorded source (hash-checked).")] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash stored files against their manifests; exit code 1 when anything is missing or corrupt.
    With --repair, fetch them again; what cannot be repaired is an error (exit code 2)."""
    from zoo import api

    if repair:
        return _repair(name, registry, as_json)
    results = api.verify(name, registry=registry)
    bad = [r for r in results if r.problem]
    if as_json:
        print_json([r.__dict__ for r in results])
    else:
        for r in results:
            typer.echo(f"{'ok ' if not r.problem else 'BAD'} {r.ref} {r.path}{'' if not r.problem else ': ' + r.problem}")
        typer.echo(f"{len(results) - len(bad)}/{len(results)} files intact")
    if bad:
        raise typer.Exit(1)


def _repair(name: str | None, registry: str | None, as_json: bool) -> None:
    from zoo.errors import ZooError
    from zoo.repair import repair

    results = repair(name, registry=registry)
    if as_json:
        print_json([r.__dict__ for r in results])
    else:
        for r in results:
            if r.error is None:
                typer.echo(f"repaired {r.ref} {r.path} ({r.problem}) from {r.repaired_from}")
        typer.echo(f"{sum(r.error is None for r in results)}/{len(results)} damaged files repaired" if results else "every stored file is intact")
    if failed := [r for r in results if r.error]:
        more = f" (+{len(failed) - 1} more: {', '.join(f'{r.ref} {r.path}' for r in failed[1:])})" if len(failed) > 1 else ""
        raise ZooError(failed[0].error + more)


@app.command()
def inspect(
    adapter: Annotated[str, typer.Argument(help="A registered NAME[@VERSION], an adapter folder (PEFT or AdapterHub), or a .safetensors file.")],
    base: Annotated[Optional[str], typer.Option(help="Base model folder or config.json, for the share of the base.")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What an adapter holds — method, ranks or sites, virtual tokens, sizes — from the safetensors header only."""
    from zoo import api
    from zoo.inspect import inspect_adapter, render_inspect

    from zoo.refs import is_path

    # a bare name is the registry entry, never a file of that name in the working directory (write ./NAME for that)
    if is_path(adapter):
        path = Path(adapter)
    else:
        m = api.lookup(adapter, registry=registry)
        if m.kind == "composition":  # a stack or an AdapterFusion: its members hold the adapter weights
            from zoo.errors import ZooError

            members = [f"{r.name}@{r.version}" for r in m.members]
            what = "an AdapterFusion" if m.fusion == "attention" else "a stack"
            raise ZooError(f"{m.ref} is {what} of {len(members)} adapters ({', '.join(members)}), not one adapter",
                           f"inspect a member, e.g. `zoo inspect {members[0]}`; `zoo show {m.ref}` describes the composition")
        path = api.adapter_folder(m, registry=registry)
    report = inspect_adapter(path, base=base)
    if as_json:
        return print_json(report.model_dump(mode="json"))
    render_inspect(report, console())


@app.command()
def estimate(
    base: Annotated[str, typer.Option(help="The base's config.json, or a folder holding it (and zoo-architecture.json for remote-code models).")],
    method: Annotated[str, typer.Option(help="lora | adalora | ia3 | prefix | prompt | ptuning | bottleneck | mam.")] = "lora",
    rank: Annotated[Optional[int], typer.Option(help="lora: rank r (default 8).")] = None,
    targets: Annotated[Optional[str], typer.Option(help="lora, adalora, ia3: comma-separated module names, or all-linear (default: PEFT's defaults for the model type).")] = None,
    init_r: Annotated[Optional[int], typer.Option(help="adalora: every module's starting rank (default 12).")] = None,
    target_r: Annotated[Optional[int], typer.Option(help="adalora: average rank after pruning (default 8).")] = None,
    feedforward: Annotated[Optional[str], typer.Option(help="ia3: comma-separated feed-forward targets, whose input is scaled (default: PEFT's).")] = None,
    num_virtual_tokens: Annotated[Optional[int], typer.Option(help="prefix, prompt, ptuning, mam: virtual tokens (mam default 30).")] = None,
    prefix_projection: Annotated[Optional[bool], typer.Option("--prefix-projection/--no-prefix-projection", help="prefix, mam: train the prefix through an MLP (PEFT saves its output; AdapterHub, mam's default, the MLP).")] = None,
    encoder_hidden_size: Annotated[Optional[int], typer.Option(help="prefix, mam: that MLP's width (mam default 800); ptuning: its encoder's.")] = None,
    encoder_type: Annotated[Optional[str], typer.Option(help="ptuning: MLP or LSTM encoder (training only; default MLP).")] = None,
    encoder_num_layers: Annotated[Optional[int], typer.Option(help="ptuning: LSTM layers (default 2).")] = None,
    num_transformer_submodules: Annotated[Optional[int], typer.Option(help="prompt, ptuning: 2 for encoder-decoders (default: from the config).")] = None,
    variant: Annotated[Optional[str], typer.Option(help="bottleneck: pfeiffer (after the FFN, default) | houlsby (after attention and FFN) | parallel.")] = None,
    reduction_factor: Annotated[Optional[float], typer.Option(help="bottleneck, mam: hidden size ÷ bottleneck width (default: the variant's, 16 or 2).")] = None,
    sites: Annotated[Optional[str], typer.Option(help="bottleneck: comma-separated attention,ffn (overrides the variant's).")] = None,
    dtype: Annotated[str, typer.Option(help="fp16, bf16 or fp32.")] = "fp16",
    as_json: JsonOpt = False,
) -> None:
    """Exact size of an adapter of any method from the base's config alone (no weights are read or downloaded)."""
    from zoo.estimate import estimate_adapter, render_estimate

    def names(text: Optional[str]) -> Optional[list[str]]:
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    report = estimate_adapter(
        base, method=method, dtype=dtype, rank=rank, targets=names(targets), init_r=init_r, target_r=target_r,
        feedforward=names(feedforward), num_virtual_tokens=num_virtual_tokens, prefix_projection=prefix_projection,
        encoder_hidden_size=encoder_hidden_size, encoder_type=encoder_type, encoder_num_layers=encoder_num_layers,
        num_transformer_submodules=num_transformer_submodules, variant=variant, reduction_factor=reduction_factor,
        sites=names(sites),
    )
    if as_json:
        return print_json(report.model_dump(mode="json"))
    render_estimate(report, console())


@app.command()
def compose(
    adapters: Annotated[str, typer.Argument(help="Registered adapters joined by '+', e.g. sql+chat.")],
    name: Annotated[str, typer.Option(help="Name of the new registry entry.")],
    fusion: Annotated[str, typer.Option(help="stack (outputs add) | weighted (one new LoRA) | attention (AdapterFusion).")] = "stack",
    weights: Annotated[Optional[str], typer.Option(help="weighted: comma-separated weights, may be negative (default: all 1).")] = None,
    method: Annotated[Optional[str], typer.Option(help="weighted LoRA: cat | svd (default) | linear | ties | dare_linear | dare_ties | magnitude_prune | *_svd; IA3 sums linearly.")] = None,
    rank: Annotated[Optional[int], typer.Option(help="weighted, svd methods: rank of the result.")] = None,
    density: Annotated[Optional[float], typer.Option(help="weighted, ties/dare/magnitude_prune: fraction kept.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for DARE masks and fusion initialisation.")] = 0,
    base: Annotated[Optional[str], typer.Option(help="attention: the base model (default: the members' base).")] = None,
    train: Annotated[Optional[Path], typer.Option(help="attention: JSONL training data ({\"text\"} or {\"text\", \"label\"}).")] = None,
    epochs: Annotated[int, typer.Option(help="attention: training epochs.")] = 1,
    lr: Annotated[float, typer.Option(help="attention: learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="attention: batch size.")] = 16,
    drop_train: Annotated[bool, typer.Option(help="attention: random AdapterDrop while training (robust to --drop at inference).")] = False,
    prune_below: Annotated[Optional[float], typer.Option(help="attention: remove members whose mean fusion attention is below this.")] = None,
    temperature: Annotated[float, typer.Option(help="attention: softmax temperature.")] = 1.0,
    task: Annotated[Optional[str], typer.Option(help="Task label of the new entry.")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compose registered adapters into a new entry: stack, weighted LoRA sum, or AdapterFusion."""
    from zoo.composition import compose as compose_adapters
    from zoo.units import human_bytes

    weight_list = _floats(weights, "--weights") if weights else None
    m = compose_adapters(
        adapters, fusion=fusion, name=name, weights=weight_list, method=method, rank=rank, density=density, seed=seed,
        base=base, train=train, epochs=epochs, lr=lr, batch_size=batch_size, drop_train=drop_train, prune_below=prune_below,
        temperature=temperature, progress=_interactive(as_json), task=task, registry=registry,
    )
    if as_json:
        return print_json(m.model_dump(mode="json"))
    members = m.members if m.kind == "composition" else m.source.members
    typer.echo(f"composed {m.ref} ({fusion}) from {'+'.join(x.name for x in members)}: {m.size.trainable_params:,} params, {human_bytes(m.size.bytes)}")


@app.command()
def merge(
    adapters: Annotated[str, typer.Argument(help="Registered adapter(s) or a stack/weighted composition, e.g. sql or sql+chat.")],
    base: Annotated[Path, typer.Option(help="The base model's local folder (safetensors, one file or sharded).")],
    out: Annotated[Path, typer.Option(help="Folder to write (must not exist or be empty).")],
    dtype: Annotated[Optional[str], typer.Option(help="Output dtype: fp32 | bf16 | fp16 (default: the base's).")] = None,
    quantize: Annotated[Optional[str], typer.Option(help="nf4 | fp4 | int8: the base as QLoRA trained on it (bitsandbytes).")] = None,
    dequantize: Annotated[bool, typer.Option(help="With --quantize: write deq(Q(W)) + ΔW in full precision (the exact QLoRA merge).")] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fold LoRA deltas into the base and write a transformers checkpoint, streaming shard by shard."""
    from zoo.merge import merge_adapters
    from zoo.units import human_bytes

    report = merge_adapters(adapters, base=base, out=out, dtype=dtype, quantize=quantize, dequantize=dequantize, progress=_interactive(as_json), registry=registry)
    if as_json:
        import dataclasses

        return print_json(dataclasses.asdict(report))
    from rich.table import Table

    c = console()
    typer.echo(  # one line, never wrapped: paths are long
        f"merged {adapters} into {base} → {out}: {len(report.modules)} modules in {len(report.shards)} shard(s), "
        f"{human_bytes(report.bytes_written)} written in {report.seconds:.1f} s, {_merge_memory(report, base)}"
    )
    if quantize or dtype:
        what = f"{quantize} requantization" if quantize and not dequantize else f"cast to {dtype or 'the base dtype'}"
        table = Table(title=f"error of the written weights vs the exact merge ({what}), per module")
        for col in ("module", "max abs", "mean abs"):
            table.add_column(col, justify="left" if col == "module" else "right")
        for path, m in report.modules.items():
            table.add_row(path, f"{m.error.max_abs:.2e}", f"{m.error.mean_abs:.2e}")
        c.print(table)


def _merge_memory(report, base: Path) -> str:
    """What the merge added to the process's memory at its peak, beside the largest shard (as the docs measure)."""
    from zoo.units import human_bytes

    if report.extra_peak_bytes is None:
        return f"peak memory of the process {human_bytes(report.peak_rss_bytes)} (imports included)"
    largest = max((base / shard).stat().st_size for shard in report.shards)
    return f"extra peak memory {human_bytes(report.extra_peak_bytes)} ({report.extra_peak_bytes / largest:.2f}× the largest shard)"


@app.command()
def run(
    base: Annotated[str, typer.Argument(help="Base model: a local folder or a Hub id.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Input text (repeatable).")],
    adapters: Annotated[Optional[str], typer.Option(help="Adapters / compositions joined by '+'.")] = None,
    fusion: Annotated[Optional[str], typer.Option(help="stack | weighted | attention (for several adapters).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="fusion weighted: comma-separated weights.")] = None,
    method: Annotated[Optional[str], typer.Option(help="fusion weighted: combination method (LoRA default svd; IA3 sums linearly).")] = None,
    rank: Annotated[Optional[int], typer.Option(help="fusion weighted, svd methods: rank.")] = None,
    drop: Annotated[int, typer.Option(help="AdapterDrop: no adapter computation in the first K layers.")] = 0,
    quantize: Annotated[Optional[str], typer.Option(help="nf4 | fp4 | int8: load the base quantized (bitsandbytes).")] = None,
    merge: Annotated[bool, typer.Option(help="Fold the LoRA deltas into the weights first.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Causal LMs: tokens to generate (greedy).")] = 32,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run the base's own code (its auto_map); never implied.")] = False,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Load a base with adapters and run it: a causal LM generates; an encoder prints sentence-embedding similarities."""
    from zoo.runner import run_prompts

    result = run_prompts(
        base, prompt, adapters=adapters, fusion=fusion, weights=_floats(weights, "--weights") if weights else None, method=method,
        rank=rank, drop=drop, quantize=quantize, merge=merge, max_new_tokens=max_new_tokens, registry=registry,
        trust_remote_code=trust_remote_code,
    )
    if as_json:
        return print_json(result)
    if "generated" in result:
        for p, text in zip(prompt, result["generated"]):
            typer.echo(f"> {p}\n{text}\n")
        return
    from rich.table import Table

    table = Table(title=f"cosine similarity of the sentence embeddings ({result['seconds'] * 1e3:.0f} ms)")
    table.add_column("")
    for i in range(len(prompt)):
        table.add_column(str(i + 1), justify="right")
    for i, (p, row) in enumerate(zip(prompt, result["similarity"])):
        table.add_row(f"{i + 1}. {p}", *(f"{x:.2f}" for x in row))
    console().print(table)


def _interactive(as_json: bool) -> bool:
    """Progress bars go to a terminal only: not into --json output, logs or pipes."""
    return not as_json and sys.stderr.isatty()


def _floats(text: str, option: str) -> list[float]:
    from zoo.errors import ZooError

    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ZooError(f"{option} {text!r} is not a comma-separated list of numbers", "e.g. --weights 0.7,0.3") from None


from cli.hub import register_hub_commands; register_hub_commands(app)  # noqa: E402,E702  (pull, push, search)


# ---- serving: check, export, extract, resize ------------------------------------------------------------


@app.command("check")
def check_(
    name: Annotated[str, typer.Argument(help="A registered NAME[@VERSION] or an adapter folder.")],
    runtime: Annotated[str, typer.Option("--for", help="vllm | llama.cpp | peft.")],
    base: Annotated[Optional[Path], typer.Option(help="The base's config.json or folder: which modules exist (required for llama.cpp).")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What a runtime would refuse or silently ignore in an adapter, rule by rule, with the fix.
    Exit code 0 when ready, 1 when a rule is refused or ignored, 2 for bad input."""
    from zoo.check import check, render_check

    report = check(name, runtime=runtime, base=base, registry=registry)
    if as_json:
        print_json(report.to_json())
    else:
        render_check(report, console())
    if not report.ready:
        raise typer.Exit(1)


def _export_adapter(name: str, to: str, out: Path | None, base: Path | None, outtype: str | None, rank: int | None, registry: Path | None, as_json: bool) -> None:
    """`zoo export NAME`: the adapter as a GGUF file or a PEFT folder (zoo.export)."""
    from zoo.errors import ZooError
    from zoo.units import human_bytes

    if out is None:
        raise ZooError("zoo export NAME needs --out", "a .gguf file for --to gguf, a new folder for --to peft")
    if to == "gguf":
        from zoo.export import export_gguf

        if base is None:
            raise ZooError("--to gguf needs --base", "the base's config.json or folder: GGUF tensor names depend on its architecture")
        if rank is not None:
            raise ZooError("--rank applies to --to peft", "resize first: zoo resize NAME --rank R --name NEW, then export NEW")
        report = export_gguf(name, base=base, out=out, outtype=outtype or "f32", registry=registry)
    elif to == "peft":
        from zoo.export import export_peft

        if outtype is not None:
            raise ZooError("--outtype applies to --to gguf", "a PEFT folder keeps the adapter's dtype; drop --outtype")
        if base is not None:
            raise ZooError("--base applies to --to gguf", "vLLM and LoRAX read the base themselves; drop --base (zoo check NAME --for vllm --base BASE checks the fit)")
        report = export_peft(name, out=out, rank=rank, registry=registry)
    else:
        raise ZooError(f"unknown --to {to!r}", "use gguf or peft")
    if as_json:
        import dataclasses

        return print_json(dataclasses.asdict(report))
    typer.echo(f"exported {name} → {report.out} ({report.to}): {report.modules} modules, rank {report.rank}, {human_bytes(report.bytes)}")
    for note in report.notes:
        typer.echo(f"  {note}")


@app.command()
def extract(
    base: Annotated[Path, typer.Option(help="The base model's folder (safetensors + config.json).")],
    tuned: Annotated[Path, typer.Option(help="The fine-tuned model's folder.")],
    name: Annotated[str, typer.Option(help="Registry name of the extracted adapter.")],
    rank: Annotated[Optional[int], typer.Option(help="Keep the top R singular components of every ΔW.")] = None,
    sv_threshold: Annotated[Optional[float], typer.Option(help="Instead keep σᵢ > E·σ₁ per module (the rank varies).")] = None,
    save_changed: Annotated[bool, typer.Option(help="Keep changed embeddings / norms whole (modules_to_save).")] = False,
    task: Annotated[Optional[str], typer.Option(help="Task label of the new entry.")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A LoRA from a fully fine-tuned model: per Linear module a truncated SVD of W_tuned − W_base, streamed shard by shard."""
    from zoo.extract import extract as extract_lora
    from zoo.units import human_bytes

    with _progress("extracting", as_json) as on_tensor:
        report = extract_lora(base, tuned, name=name, rank=rank, sv_threshold=sv_threshold, save_changed=save_changed, task=task,
                              progress=on_tensor, registry=registry)
    if as_json:
        return print_json(report.to_json())
    from rich.table import Table

    table = Table(title=f"extracted {report.ref}: {len(report.modules)} modules from {report.tensors} tensors in {report.shards} shard(s)")
    for col in ("module", "rank", "‖ΔW‖", "captured", "rel. error"):
        table.add_column(col, justify="left" if col == "module" else "right", overflow="fold")
    for m in report.modules:
        table.add_row(m.module, str(m.rank), f"{m.norm:.3g}", f"{m.captured:.2%}", f"{m.error / m.norm if m.norm else 0:.1e}")
    c = console()
    c.print(table)
    if report.saved:
        c.print(f"kept whole (modules_to_save): {', '.join(report.saved)}")
    if report.not_captured:
        c.print(f"changed but not captured ({len(report.not_captured)}): {', '.join(report.not_captured[:4])}{' …' if len(report.not_captured) > 4 else ''} — --save-changed keeps them")
    c.print(f"{report.unchanged} tensors unchanged; {report.seconds:.1f} s, peak memory {human_bytes(report.peak_rss_bytes)}")


@app.command()
def resize(
    name: Annotated[str, typer.Argument(help="A registered LoRA NAME[@VERSION] or an adapter folder.")],
    new_name: Annotated[str, typer.Option("--name", help="Registry name of the resized adapter.")],
    rank: Annotated[Optional[int], typer.Option(help="The new rank of every module.")] = None,
    sv_ratio: Annotated[Optional[float], typer.Option(help="Per module keep σᵢ ≥ σ₁ / X.")] = None,
    sv_fro: Annotated[Optional[float], typer.Option(help="Per module keep the fewest components holding this share of ‖ΔW‖_F.")] = None,
    registry: RegistryOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A LoRA at a lower rank (best approximation per module, via the low-rank SVD of B·A), with its error."""
    from zoo.resize import resize as resize_lora

    report = resize_lora(name, name=new_name, rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro, registry=registry)
    if as_json:
        return print_json(report.to_json())
    from rich.table import Table

    table = Table(title=f"resized {name} → {report.ref}: {report.params_before:,} → {report.params_after:,} params")
    for col in ("module", "rank", "rel. error"):
        table.add_column(col, justify="left" if col == "module" else "right", overflow="fold")
    for m in report.modules:
        table.add_row(m.module, f"{m.old_rank} → {m.rank}", f"{m.relative_error:.1e}")
    console().print(table)


def _progress(label: str, as_json: bool):
    """A context giving an `on(name, done, total)` callback that drives a progress bar on a terminal (else a no-op)."""
    import contextlib

    if not _interactive(as_json):
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    @contextlib.contextmanager
    def bar():
        with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                      console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("", total=None)
            yield lambda name, done, total: progress.update(task, completed=done, total=total, description=name)

    return bar()


def _no_kernel_hub_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes logs on every import, on CPUs with AVX512-BF16, that its optional kernel from the Hub did not
    load; its built-in kernel computes the same, so the line only alarms. (transformers' load report: zoo.bases.)"""
    return "kernels-community" not in record.getMessage()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors with exit code 2, never a traceback for bad input."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_no_kernel_hub_notice)
    logging.getLogger("kernels._internals.hf_hub").addFilter(_no_kernel_hub_notice)  # offline: "Skipping publisher trust check for 'kernels-community/…'"
    # LLM.int8 computes in fp16 by design; bitsandbytes says so at every layer of every forward (448 lines for 32 tokens)
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    from zoo.interrupts import Terminated, install

    install()  # SIGTERM / Ctrl-C unwind: what was being written is removed, a commit finishes first
    try:
        code = app(args=argv, prog_name="zoo", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(n) comes back as a return value here
            sys.exit(code)
    except USER_ERRORS as e:
        typer.echo(f"error: {one_line(str(e))}", err=True)  # a CompositionError may quote input too
        sys.exit(2)
    except OSError as e:  # what the system refused (a name too long, no permission, a full disk): its own words
        typer.echo(f"error: {one_line(str(e))}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Terminated:
        typer.echo("error: terminated (SIGTERM); nothing half-written was left", err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        typer.echo("error: interrupted; nothing half-written was left", err=True)
        sys.exit(130)
    except typer.TyperException as e:  # usage errors (typer's click): its own one-line message, exit 2
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
