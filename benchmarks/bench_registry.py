"""The registry at scale: time of show / add / remove / filtered list / list --json / import vs entries (SQLite default).

    python benchmarks/bench_registry.py [--quick] [--json PATH]      # then benchmarks/plots.py: registry_scaling.png

For N = 10, 1,000, 10,000, 100,000 entries (`--quick`: 10 and 1,000) in a fresh ZOO_HOME: `zoo import` of a
registry.json of N manifests (one template adapter under N names, a task shared by 10 of them), then each
command as the user runs it — a `zoo` subprocess, Python start-up included (best of 3) — and in-process through
the Python API (best of 10). Subprocesses are timed by their CPU time (see `zoo_cli`), in-process calls by wall time. `zoo list --json` of everything also reports the subprocess's peak RSS.
Targets (issue 13): show, add, remove and the filtered list at 100,000 within 1.5× their time at 10;
`zoo list --json` of all < 10 s and < 1 GB; `zoo import` of 100,000 < 3 min.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Report, arguments, fmt, ratio  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.handmade import write_adapter  # noqa: E402

RARE = 10  # entries with task "rare": the filtered list returns as many at every N


def zoo_cli(*args: str, env: dict) -> tuple[float, int, float]:
    """CPU seconds (user + system) of one `zoo` subprocess, its peak RSS in bytes (measured by a fresh wrapper
    around it), and its wall seconds. CPU time, not wall time: on a machine shared with other jobs wall time swings by 2× and more, and
    what a user waits for on a quiet machine is this plus the fsyncs (in-process timings below are wall time)."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); u = resource.getrusage(resource.RUSAGE_CHILDREN); "
               "print(r.returncode, u.ru_utime + u.ru_stime, u.ru_maxrss)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    code, seconds, rss = out.stdout.split()
    if code != "0":
        raise RuntimeError(f"zoo {' '.join(args)} exited {code}: {out.stderr}")
    return float(seconds), int(rss) * 1024, wall


def best(fn, reps: int) -> float:
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return min(times)


def catalogue(path: Path, template: dict, n: int) -> None:
    """A registry.json of `n` copies of `template` named e0 … e{n-1}; RARE of them have task "rare" and base
    "org/rare-base", the others one of 100 bases."""
    with open(path, "w") as f:
        f.write('{"format": "adapter-zoo/registry", "schema_version": 1, "adapters": [')
        for i in range(n):
            rare = i % max(n // RARE, 1) == 0
            base = {**template["base_model"], "name_or_path": "org/rare-base" if rare else f"org/base-{i % 100}"}
            entry = {**template, "name": f"e{i}", "task": "rare" if rare else "common", "base_model": base}
            f.write(("," if i else "") + "\n" + json.dumps(entry, separators=(",", ":")))
        f.write("\n]}\n")


def measure(n: int, work: Path) -> dict:
    home = work / f"home-{n}"
    env = {**os.environ, "ZOO_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("ZOO_REGISTRY", None)
    os.environ.update(ZOO_HOME=str(home))
    os.environ.pop("ZOO_REGISTRY", None)
    import zoo

    src = write_adapter(work / "src" / "template", 1)
    template = zoo.add(src, name="template").model_dump(mode="json")
    zoo.remove("template")
    catalogue(work / f"catalogue-{n}.json", template, n)
    row: dict = {"n": n}
    row["import_s"], row["import_rss"], row["import_wall"] = zoo_cli("import", str(work / f"catalogue-{n}.json"), env=env)
    assert zoo.api.open_registry().count() == n
    os.sync()  # the import's writes reach the disk now, not inside the timings below

    sub = lambda *args, reps=3: min(zoo_cli(*args, env=env)[0] for _ in range(reps))  # noqa: E731  (CPU time)
    row["show_cli"] = sub("show", f"e{n // 2}")
    row["show_api"] = best(lambda i: zoo.show(f"e{(n // 2 + i) % n}"), 10)
    row["filtered_cli"] = sub("list", "--task", "rare")
    row["filtered_api"] = best(lambda i: zoo.list_adapters(task="rare"), 10)
    row["base_cli"] = sub("list", "--base", "rare")  # a substring of the base's name
    row["base_api"] = best(lambda i: zoo.list_adapters(base="rare"), 10)
    row["list_cli"] = sub("list")  # the first rows, as a table
    row["add_cli"] = min(zoo_cli("add", str(src), "--name", f"cli{i}", env=env)[0] for i in range(3))
    row["add_api"] = best(lambda i: zoo.add(write_adapter(work / "src" / f"api{n}-{i}", i + 2), name=f"api{i}"), 10)
    row["remove_cli"] = min(zoo_cli("remove", f"cli{i}", env=env)[0] for i in range(3))
    row["remove_api"] = best(lambda i: zoo.remove(f"api{i}"), 10)
    row["json_cli"], row["json_rss"], row["json_wall"] = zoo_cli("list", "--json", env=env)
    start = time.perf_counter()
    count = sum(1 for _ in zoo.api.open_registry().json_lines())
    row["json_api"] = time.perf_counter() - start
    assert count == n
    print(f"N = {n:,}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith(("_s", "_cli", "_api"))), flush=True)
    return row


def main() -> None:
    args = arguments(__doc__, "N = 10 and 1,000 only")
    sizes = [10, 1000] if args.quick else [10, 1000, 10_000, 100_000]
    report = Report("registry", "the registry (SQLite, default) at 10 … 100,000 entries", timer="CPU time of a `zoo` subprocess, wall time in-process")
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as work:
        rows = [measure(n, Path(work)) for n in sizes]
    ms = lambda s: fmt(s * 1e3)  # noqa: E731
    report.table(
        "Time (ms) of one command: `zoo` subprocess, CPU time (Python start-up included) / in-process, wall time",
        ["entries", "show", "add", "remove", "list --task (10 rows)", "list --base (10 rows)", "list (first 50)", "list --json (all)", "import (all)"],
        [[f"{r['n']:,}", *(f"{ms(r[k + '_cli'])[0]} / {ms(r[k + '_api'])[0]}" for k in ("show", "add", "remove", "filtered", "base")),
          ms(r["list_cli"]), f"{ms(r['json_cli'])[0]} / {ms(r['json_api'])[0]}", ms(r["import_s"])] for r in rows],
    )
    report.table(
        "Wall time (s) of the subprocesses that handle every entry (this machine's other jobs included)",
        ["entries", "list --json (all)", "import (all)"],
        [[f"{r['n']:,}", f"{r['json_wall']:.2f}", f"{r['import_wall']:.1f}"] for r in rows],
    )
    report.table(
        "Peak memory (RSS) of the subprocess",
        ["entries", "list --json (all)", "import (all)"],
        [[f"{r['n']:,}", f"{r['json_rss'] / 2**20:,.0f} MiB", f"{r['import_rss'] / 2**20:,.0f} MiB"] for r in rows],
    )
    first, last = rows[0], rows[-1]
    report.table(
        f"Time at {last['n']:,} entries ÷ time at {first['n']:,} (target ≤ 1.5×)",
        ["", "show", "add", "remove", "list --task", "list --base"],
        [[kind, *(ratio(last[f"{k}_{kind}"] / first[f"{k}_{kind}"]) for k in ("show", "add", "remove", "filtered", "base"))] for kind in ("cli", "api")],
    )
    report.note(f"at {last['n']:,} entries ÷ at {first['n']:,}: " + ", ".join(
        f"{k} {last[k + '_cli'] / first[k + '_cli']:.2f}× (subprocess) / {last[k + '_api'] / first[k + '_api']:.2f}× (in-process)"
        for k in ("show", "add", "remove", "filtered", "base")))
    report.note(f"`zoo list --json` of {last['n']:,}: {last['json_wall']:.1f} s wall ({last['json_cli']:.1f} s CPU), {last['json_rss'] / 2**20:,.0f} MiB "
                f"(target < 10 s, < 1 GB); `zoo import` of {last['n']:,}: {last['import_wall']:.1f} s wall ({last['import_s']:.1f} s CPU) (target < 180 s).")
    report.save(args.json, rows=rows)  # plots.py draws registry_scaling.png from it


if __name__ == "__main__":
    main()
