"""LoRA extraction (`zoo extract`) and rank reduction (`zoo resize`) vs dense SVDs: time, peak memory, error.

Extract: a Llama-like checkpoint with random weights (hidden 1024, 4 layers, MLP 2816, vocab 8000: ~0.25 GB
fp32 in ~50 MB shards; `--quick`: hidden 512, 4 layers, ~25 MB shards) and a "fine-tune" of it: every
projection plus a rank-16 delta and a small full-rank tail (σ of the tail ~1% of the delta's). Each
extraction runs in its own fresh process with the peak RSS reset just before (as in bench_merge):

- ours: `zoo.extract(base, tuned, rank=16)` end to end (streamed shard by shard, randomized truncated
  SVD per module, written and registered);
- anchor, what mergekit's extract-lora does per module: a dense `torch.linalg.svd(ΔW)` truncated to 16,
  on the same streamed reads.

Times are the process's CPU time for the work (all threads; on a shared machine it does not count waiting
for a core) and its wall time.

Both report each module's relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F; the dense SVD's is the optimum.

Resize: one module's LoRA of rank 64 (width 1024 / 4096, random factors) cut to rank 16. Ours: QR of the
factors and an SVD of the 64×64 core (`compose.lora.resize.resize_factors`); anchor: the dense ΔW = s·B·A
and `torch.linalg.svd`. Errors are compared with the optimum, the norm of the singular values cut.

    python benchmarks/bench_extract.py [--quick] [--json PATH] [--cpu-time]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, Report, arguments, best_ms, fmt, ratio

HWM = """
import re, resource
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")
"""

OURS = """
import json, os, sys, time, torch, transformers
from zoo.extract import extract
import zoo.api, zoo.formats.peft, compose.merge.checkpoint, compose.lora.extract
base, tuned, home = sys.argv[1:4]
os.environ.update(ZOO_HOME=home, ZOO_REGISTRY=home + "/registry.json")
with torch.device("meta"):  # transformers' model code loads on first use: count it in the baseline, not the extraction
    transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(base))
{HWM}
before, start, cpu0 = hwm(), time.perf_counter(), cpu()
report = extract(base, tuned, rank=16, name="extracted")
seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu0
errors = [m.error / m.norm for m in report.modules]
print(json.dumps({"before": before, "peak": hwm(), "seconds": seconds, "cpu_seconds": cpu_seconds, "errors": errors, "modules": len(errors)}))
""".replace("{HWM}", HWM)

DENSE = """
import json, sys, time, torch, transformers
from pathlib import Path
from compose.merge.shards import ShardReader, read_layout
base, tuned = Path(sys.argv[1]), Path(sys.argv[2])
{HWM}
before, start, cpu0 = hwm(), time.perf_counter(), cpu()
shard_of = {}
for shard in read_layout(base).shards:
    with ShardReader(base / shard) as f:
        shard_of.update((k, shard) for k in f.keys())
factors, errors = {}, []
for shard in read_layout(tuned).shards:
    with ShardReader(tuned / shard) as f:
        for key in f.keys():
            if not key.endswith("_proj.weight"):
                continue
            with ShardReader(base / shard_of[key]) as g:
                delta = f.get_tensor(key).float() - g.get_tensor(key).float()
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)  # mergekit: the full thin SVD, then truncate
            factors[key] = (Vh[:16].clone(), (U[:, :16] * S[:16]).clone())
            errors.append(float(S[16:].norm() / S.norm()))
seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu0
print(json.dumps({"before": before, "peak": hwm(), "seconds": seconds, "cpu_seconds": cpu_seconds, "errors": errors, "modules": len(errors)}))
""".replace("{HWM}", HWM)


def make_checkpoints(folder: Path, quick: bool) -> tuple[Path, Path]:
    """A base and its 'fine-tune' (every projection + a rank-16 delta + a small full-rank tail), sharded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, shard = (512, 4, "25MB") if quick else (1024, 4, "50MB")
    config = LlamaConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "base", max_shard_size=shard)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                out, n_in = p.shape
                low = (torch.randn(out, 16) @ torch.randn(16, n_in)) * 0.02 / 16
                p += low + 0.01 * low.std() * torch.randn(out, n_in)
    model.save_pretrained(folder / "tuned", max_shard_size=shard)
    return folder / "base", folder / "tuned"


def run(script: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", ""))
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extract_table(report: Report, quick: bool) -> None:
    mb = lambda n: n / 2**20  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, tuned = make_checkpoints(tmp, quick)
        shards = sorted(tuned.glob("*.safetensors"))
        total, largest = sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards)
        results = {"ours: zoo extract (randomized SVD)": run(OURS, str(base), str(tuned), str(tmp / "home")),
                   "dense torch.linalg.svd (mergekit)": run(DENSE, str(base), str(tuned))}
    rows = []
    for name, r in results.items():
        growth = r["peak"] - r["before"]
        rows.append([name, str(r["modules"]), fmt(r["cpu_seconds"], 2), fmt(r["seconds"], 2), fmt(mb(growth), 0), ratio(growth / largest),
                     (f"{max(r['errors']):.4f}", max(r["errors"]))])
    report.table(f"extract rank 16 from a {mb(total):.0f} MiB fp32 checkpoint in {len(shards)} shards (largest {mb(largest):.0f} MiB), "
                 "each in its own process", ["extraction", "modules", "CPU s", "wall s", "peak MiB (growth)", "peak / largest shard", "max rel. error"], rows)
    ours, dense = results.values()
    worst = max(o - d for o, d in zip(ours["errors"], dense["errors"]))
    report.note(f"extract: ours {dense['cpu_seconds'] / ours['cpu_seconds']:.1f}× less CPU time than a dense SVD per module, peak memory "
                f"{(ours['peak'] - ours['before']) / max(dense['peak'] - dense['before'], 1):.2f}× the dense run's; relative error at most "
                f"{worst:.1e} above the optimum (dense SVD)")
    report.extract = results


def resize_table(report: Report, quick: bool) -> None:
    import torch

    from compose.lora.resize import resize_factors

    rows, notes = [], []
    for width in (1024,) if quick else (1024, 4096):
        gen = torch.Generator().manual_seed(0)
        A, B = torch.randn(64, width, generator=gen) / width**0.5, torch.randn(width, 64, generator=gen)
        ours_ms, got = best_ms(lambda: resize_factors(A, B, 0.5, rank=16), 5)

        def dense():
            U, S, Vh = torch.linalg.svd(0.5 * B @ A, full_matrices=False)
            return Vh[:16], U[:, :16] * S[:16], S

        dense_ms, (_, _, S) = best_ms(dense, 2 if width > 2048 else 3)
        optimum = float(S[16:].norm())
        rows.append([str(width), fmt(ours_ms), fmt(dense_ms), ratio(dense_ms / ours_ms), (f"{abs(got.error - optimum) / optimum:.1e}", abs(got.error - optimum) / optimum)])
    report.table("resize one module, rank 64 → 16", ["width", "ours ms (QR + 64×64 SVD)", "dense SVD ms", "speed-up", "error vs optimum (rel.)"], rows)
    report.note(f"resize: ours {rows[0][3][0]}{f' (width 1024) to {rows[-1][3][0]} (width 4096)' if len(rows) > 1 else ''} faster than a dense SVD, "
                f"same error as the optimal truncation (rel. difference ≤ {max(r[4][1] for r in rows):.0e})")


def main() -> None:
    args = arguments(__doc__, "a ~60 MB checkpoint, width 1024 only")
    report = Report("extract", "zoo extract vs a dense SVD per module (mergekit); zoo resize vs a dense SVD", timer="extract: CPU and wall time of each process; resize: the harness clock")
    extract_table(report, args.quick)
    resize_table(report, args.quick)
    report.save(args.json, extract=report.extract)


if __name__ == "__main__":
    main()
