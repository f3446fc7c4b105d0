"""Write RESULTS.md from one run of `run_all.py`: the machine, the versions, every script's tables and the plots.

    python benchmarks/report.py [--results benchmarks/results] [--out benchmarks/RESULTS.md]

Each script's printed Markdown (`<results>/<script>.md`, saved by `run_all.py`) goes in as it is, under
one section per script; the conclusions every script prints (its ratio lines) are gathered on top.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: What each script compares, and against which anchor (the ratio columns divide by it).
ABOUT = {
    "bench_drop": ("AdapterDrop multi-task inference (8 tasks, shared first K layers)", "ours at K = 0 (every layer per task)"),
    "bench_extract": ("`zoo extract` / `zoo resize` vs dense SVDs", "a dense `torch.linalg.svd` per module (mergekit's extract-lora)"),
    "bench_fusion": ("AdapterFusion overhead", "the same adapters stacked (PEFT has no fusion)"),
    "bench_inspect": ("`zoo inspect` (header only) vs a full load", "a full load of the file"),
    "bench_merge": ("streaming merge of a sharded checkpoint", "peft `merge_and_unload` + `save_pretrained`"),
    "bench_mixed": ("mixed-adapter batches", "peft `adapter_names=`"),
    "bench_overhead": ("unmerged overhead of N stacked LoRAs", "peft with the same adapters active"),
    "bench_registry": ("the registry (SQLite) at 10 … 100,000 entries", "the same command at 10 entries (target ≤ 1.5×)"),
    "bench_svd": ("weighted `svd` combination", "peft `add_weighted_adapter(svd)`"),
    "bench_weighted": ("weighted `cat` / `ties` / `dare_ties`", "peft `add_weighted_adapter`"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    run = json.loads((args.results / "run.json").read_text())
    env = run["environment"]
    plots = os.path.relpath(run["plots"], args.out.parent)
    load = lambda which: ", ".join(map(str, run[which]))  # noqa: E731
    timer = ("`--cpu-time`: torch on one thread, timed by that thread's CPU time, so time spent waiting for a core on the "
             "shared machine is not counted; times are single-core times (merge: wall time of each process)."
             if run.get("cpu_time") else "wall time, torch on every core; best of n runs.")
    lines = [
        "# Benchmark results",
        "",
        f"One run of `{run['command']}` ({run['started']} → {run['finished']}, {run['minutes']:.0f} min), written by `benchmarks/report.py`.",
        "Every script runs ours and its anchor on the same work in the same process; ratios are against the anchor.",
        *[f"Run again on its own afterwards (`--only`): {rerun}." for rerun in run.get("reruns", [])],
        "",
        (f"- **Machine**: {env['cpu']}, {env['cores']} cores, torch using {1 if run.get('cpu_time') else env['threads']} thread(s); "
         f"load average {load('load_before')} before, {load('load_after')} after"),
        f"- **Versions**: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}",
        f"- **Timer**: {timer}",
        "",
    ]
    if not run.get("cpu_time") and max(run["load_before"][0], run["load_after"][0]) > 0.5 * env["cores"]:
        busiest = max(run["load_before"][0], run["load_after"][0])
        lines += [(f"> The machine was shared during this run (load average up to {busiest:.1f} on {env['cores']} cores): "
                   "times are best-of-n, but treat ratios near 1 as ties."), ""]
    lines += ["## Summary", "", "| benchmark | anchor | result |", "|:---|:---|:---|"]
    for script, (what, anchor) in ABOUT.items():
        data = args.results / f"{script.removeprefix('bench_')}.json"
        notes = json.loads(data.read_text())["notes"] if data.exists() else []
        if (args.results / f"{script}.md").exists():
            lines.append(f"| [{what}](#{script}) | {anchor} | {'<br>'.join(notes) or 'see its section'} |")
    lines += ["", f"![AdapterDrop speed-up]({plots}/adapterdrop.png)", "", f"![svd time vs width]({plots}/svd_width.png)", "",
              f"![registry time vs entries]({plots}/registry_scaling.png)", ""]
    for script, (what, anchor) in ABOUT.items():
        md = args.results / f"{script}.md"
        if md.exists():
            lines += [f"## {script}", "", f"{what}; anchor: {anchor}. `python benchmarks/{script}.py`", "", md.read_text().strip().replace("\n### ", "\n#### "), ""]
        else:
            lines += [f"## {script}", "", "not run", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
