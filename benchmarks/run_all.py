"""Run every benchmark script in this folder, then draw the plots and write RESULTS.md (`make bench`).

    python benchmarks/run_all.py            # full run: benchmarks/results/, benchmarks/plots/, benchmarks/RESULTS.md
    python benchmarks/run_all.py --quick    # short run that checks the scripts, into a temporary folder
    python benchmarks/run_all.py --only drop svd

Each script runs ours and the anchor on the same work in one process and prints Markdown tables; this
keeps each script's output as `<results>/<script>.md` and, from scripts that take `--json`, its tables
as `<results>/<name>.json`. `plots.py` and `report.py` then turn those into PNGs and RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (into a temporary folder unless --out)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scripts (bench_NAME.py); the others' earlier results stay")
    parser.add_argument("--cpu-time", action="store_true", help="scripts that take it run torch on one thread and time its CPU time (shared machines)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results, or a temporary one with --quick)")
    args = parser.parse_args()
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-quick-")) if args.quick else HERE / "results")
    plots, results_md = (HERE / "plots", HERE / "RESULTS.md") if out == HERE / "results" else (out / "plots", out / "RESULTS.md")
    out.mkdir(parents=True, exist_ok=True)

    sys.path.insert(0, str(HERE))
    from common import environment

    started, load_before = time.time(), [round(x, 2) for x in os.getloadavg()]
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only or s.stem in args.only]
    failed = []
    for script in scripts:
        print(f"\n## {script.name}\n", flush=True)
        command = [sys.executable, str(script), *(["--quick"] if args.quick else [])]
        if "from common import" in script.read_text():  # common.arguments: --json and --cpu-time
            command += ["--json", str(out / f"{script.stem.removeprefix('bench_')}.json"), *(["--cpu-time"] if args.cpu_time else [])]
        proc = subprocess.Popen(command, cwd=HERE.parent, stdout=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        if proc.wait():
            failed.append(script.name)
        else:
            (out / f"{script.stem}.md").write_text("".join(lines))

    run = {
        "command": " ".join(["python benchmarks/run_all.py", *sys.argv[1:]]),
        "cpu_time": args.cpu_time,
        "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%d %H:%M"),
        "minutes": (time.time() - started) / 60,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "environment": environment(),
        "plots": str(plots),
    }
    earlier = out / "run.json"
    if args.only and earlier.exists():  # the other scripts' results are the earlier run's: keep its record, note this one
        rerun, run = run, json.loads(earlier.read_text())
        run["reruns"] = [*run.get("reruns", []), f"{', '.join(args.only)} ({rerun['finished']}, load average {rerun['load_before']} before)"]
    earlier.write_text(json.dumps(run, indent=1) + "\n")
    for tool, target in (("plots.py", plots), ("report.py", results_md)):
        subprocess.run([sys.executable, str(HERE / tool), "--results", str(out), "--out", str(target)], check=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
