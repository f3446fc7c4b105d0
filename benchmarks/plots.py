"""Plots from the benchmarks' JSON (`--json`): the AdapterDrop speed-up curve and SVD time vs width.

    python benchmarks/plots.py [--results benchmarks/results] [--out benchmarks/plots]

Writes `adapterdrop.png` (from drop.json: speed-up over K = 0 vs K, per batch size, with the ideal
count of layer-batches and the paper's point), `svd_width.png` (from svd.json: time vs width, ours
and PEFT, log scale) and `registry_scaling.png` (from registry.json: each registry command's time vs entries). A missing JSON skips its plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def adapterdrop(data: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    tasks, layers = data["tasks"], data["layers"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ks = list(range(layers + 1))
    ax.plot(ks, [tasks * layers / (k + tasks * (layers - k)) for k in ks], "k:", label="ideal: 8·L / (K + 8·(L − K)) layer-batches")
    for s in data["series"]:
        t0 = s["ms"][s["k"].index(0)]
        ax.plot(s["k"], [t0 / ms for ms in s["ms"]], "o-", label=f"ours, batch {s['batch']} (K = 0: {t0 / 1e3:.2f} s)")
    ax.plot([5], [1.39], "r*", markersize=12, label="AdapterDrop paper: K = 5, 39% faster")
    ax.set_xlabel("K: layers without adapters, run once for all tasks")
    ax.set_ylabel("speed-up over K = 0")
    ax.set_title(f"AdapterDrop, {tasks} tasks on one input ({layers}-layer BERT-base shape, CPU)")
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def svd_width(data: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    columns = data["tables"][0]["columns"]
    rows = data["tables"][0]["rows"]
    width, ours, peft = (columns.index(c) for c in ("width", "ours ms", "peft ms"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([r[width] for r in rows], [r[ours] for r in rows], "o-", label="ours: QR of the factors + SVD of the (Σr)² core")
    ax.plot([r[width] for r in rows], [r[peft] for r in rows], "s-", label="peft add_weighted_adapter(svd): dense SVD")
    for r in rows:
        ax.annotate(f"{r[peft] / r[ours]:,.0f}×", (r[width], (r[peft] * r[ours]) ** 0.5), ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([r[width] for r in rows], [str(r[width]) for r in rows])
    ax.set_xlabel("width (square Linear)")
    ax.set_ylabel("time, ms (log)")
    ax.set_title("Weighted svd of two r=16 LoRAs, target rank 16 (CPU)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)

def registry_scaling(data: dict, out: Path) -> None:
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ns = [r["n"] for r in rows]
    for ax, suffix, title in ((axes[0], "cli", "`zoo …` subprocess, CPU time (Python start-up included)"), (axes[1], "api", "in-process (Python API), wall time")):
        for key, label in (("show", "show"), ("add", "add"), ("remove", "remove"), ("filtered", "list --task (10 rows)"), ("base", "list --base (10 rows)"), ("json", "list --json (all)")):
            ax.plot(ns, [r[f"{key}_{suffix}"] for r in rows], "o-", label=label)
        if suffix == "cli":
            ax.plot(ns, [r["import_s"] for r in rows], "k--", label="import (all)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("entries in the registry")
        ax.set_ylabel("seconds (best of 3 / 10)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("adapter-zoo registry (SQLite) vs size")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results", help="folder of the benchmarks' JSON")
    parser.add_argument("--out", type=Path, default=HERE / "plots", help="folder for the PNGs")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, plot, png in (("drop", adapterdrop, "adapterdrop.png"), ("svd", svd_width, "svd_width.png"), ("registry", registry_scaling, "registry_scaling.png")):
        source = args.results / f"{name}.json"
        if source.exists():
            plot(json.loads(source.read_text()), args.out / png)
            print(f"wrote {args.out / png}")
        else:
            print(f"skipped {png}: no {source}")


if __name__ == "__main__":
    main()
