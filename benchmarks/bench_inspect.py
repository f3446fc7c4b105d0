"""`zoo inspect` reads the header only: time vs file size, beside a full load of the same file.

    python benchmarks/bench_inspect.py [--quick] [--json PATH]

Writes a 1 MB and a 1 GB LoRA-shaped safetensors file (the 1 GB one as a real file, so the full
load really reads it), then times `zoo.inspect.inspect_adapter` (ours) and
`safetensors.torch.load_file` with the tensors materialised (what loading to count the same numbers
costs) on each. Both run warm (the file is in the page cache), which flatters the full load.
Also times the `zoo list` command end to end (start-up without torch).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import ROOT, Report, arguments, best_ms, fmt, ratio
from zoo.inspect import inspect_adapter


def lora_file(path: Path, total_bytes: int) -> Path:
    """LoRA r=64 pairs of width 8192 in fp16 (a 70B-class adapter) until `total_bytes` is reached."""
    per_module = 2 * 64 * 8192 * 2
    tensors = {}
    for i in range(max(1, total_bytes // per_module)):
        tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.zeros(64, 8192, dtype=torch.float16)
        tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.zeros(8192, 64, dtype=torch.float16)
    save_file(tensors, path)
    return path


def main() -> None:
    from safetensors.torch import load_file

    args = arguments(__doc__, "1 MB and 100 MB files")
    sizes = [10**6, 10**8] if args.quick else [10**6, 10**9]
    report = Report("inspect", "LoRA-shaped safetensors files (r=64 pairs of width 8192, fp16), warm page cache")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = lora_file(Path(tmp) / f"{size}.safetensors", size)
            ours, _ = best_ms(lambda: inspect_adapter(path), 5)
            full, _ = best_ms(lambda: [t.clone() for t in load_file(path).values()], 2)  # materialised, as a loader holds them
            rows.append([f"{path.stat().st_size / 1e6:,.0f} MB", fmt(ours, 1), fmt(full, 0), ratio(full / ours)])
            path.unlink()
    report.table("", ["file", "ours: inspect (header) ms", "full load (materialised) ms", "full / ours"], rows)
    report.note(f"inspect of the {rows[-1][0]} file: {rows[-1][1][0]} ms, {rows[-1][3][0]} faster than loading it")
    with tempfile.TemporaryDirectory() as home:
        env = {"ZOO_HOME": home, "PATH": "/usr/bin:/bin"}
        took, _ = best_ms(lambda: subprocess.run([sys.executable, "-m", "cli.main", "list", "--json"], cwd=ROOT, env=env, check=True, capture_output=True), 5, timer=time.perf_counter)
    report.note(f"`zoo list` end to end (python start-up included, no torch import): {took:.0f} ms (target < 500 ms)")
    report.save(args.json, zoo_list_ms=took)


if __name__ == "__main__":
    main()
