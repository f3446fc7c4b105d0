"""`zoo inspect` reads the header only: time vs file size, beside a full load of the same file.

    python benchmarks/bench_inspect.py [--quick]

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.inspect import inspect_adapter  # noqa: E402


def lora_file(path: Path, total_bytes: int) -> Path:
    """LoRA r=64 pairs of width 8192 in fp16 (a 70B-class adapter) until `total_bytes` is reached."""
    per_module = 2 * 64 * 8192 * 2
    tensors = {}
    for i in range(max(1, total_bytes // per_module)):
        tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"] = torch.zeros(64, 8192, dtype=torch.float16)
        tensors[f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight"] = torch.zeros(8192, 64, dtype=torch.float16)
    save_file(tensors, path)
    return path


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    from safetensors.torch import load_file

    quick = "--quick" in sys.argv
    sizes = [10**6, 10**8] if quick else [10**6, 10**9]
    print("| file | ours: inspect (header) ms | full load ms | ratio |")
    print("|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = lora_file(Path(tmp) / f"{size}.safetensors", size)
            ours = best(lambda: inspect_adapter(path), 5)
            full = best(lambda: [t.clone() for t in load_file(path).values()], 2)  # materialised, as a loader holds them
            print(f"| {path.stat().st_size / 1e6:,.0f} MB | {ours * 1e3:.1f} | {full * 1e3:.0f} | {full / ours:,.0f}× |")
            path.unlink()
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as home:
        env = {"ZOO_HOME": home, "PATH": "/usr/bin:/bin"}
        took = best(lambda: subprocess.run([sys.executable, "-m", "cli.main", "list", "--json"], cwd=root, env=env, check=True, capture_output=True), 5)
    print(f"\n`zoo list` end to end (python start-up included, no torch import): {took * 1e3:.0f} ms (target < 500 ms)")


if __name__ == "__main__":
    main()
