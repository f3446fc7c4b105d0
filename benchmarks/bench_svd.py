"""SVD combination of two LoRAs: our QR path (`compose.lora.weighted.combine(..., "svd")`) vs PEFT's.

PEFT's `add_weighted_adapter(combination_type="svd")` builds the dense out×in delta and runs a full
`torch.linalg.svd` on it; ours stacks the factors, QRs them and takes the SVD of a (Σr)² core. Both run
here on the same one-layer model (a square `nn.Linear` of each width, adapters r=16, target rank 16),
in the same process. Errors are ‖B·A − D_k‖_F / ‖D_k‖_F against D_k, the fp64 dense truncated SVD of the
exact weighted sum (slow: ~90 s at width 4096 on 2 cores; --quick skips the big widths).

    python benchmarks/bench_svd.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compose.lora.weighted import LoraFactors, combine  # noqa: E402

RANK, TARGET_RANK, WEIGHTS = 16, 16, [0.6, -0.4]


class OneLayer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x):
        return self.proj(x)


def peft_model(width: int):
    """One square Linear with two PEFT adapters: a (alpha 32) and b (alpha 16, rsLoRA), random A and B."""
    import peft

    torch.manual_seed(0)
    model = None
    for name, alpha, rslora in (("a", 32, False), ("b", 16, True)):
        config = peft.LoraConfig(r=RANK, lora_alpha=alpha, use_rslora=rslora, target_modules=["proj"], init_lora_weights=False)
        model = peft.get_peft_model(OneLayer(width), config, adapter_name=name) if model is None else model
        if name not in model.peft_config:
            model.add_adapter(name, config)
    return model


def timed(fn, reps: int) -> tuple[float, object]:
    """Best wall time in ms over `reps` calls (other load only ever adds time), and the last result."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times), out


def bench(width: int, peft_reps: int, with_ref: bool) -> dict:
    model = peft_model(width)
    layer = model.base_model.model.proj
    factors = [LoraFactors(layer.lora_A[a].weight.detach(), layer.lora_B[a].weight.detach(), layer.scaling[a]) for a in ("a", "b")]

    def run_peft():
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "svd", combination_type="svd", svd_rank=TARGET_RANK)
        out = layer.lora_A["svd"].weight.detach().clone(), layer.lora_B["svd"].weight.detach().clone()
        model.delete_adapter("svd")
        return out

    ours_ms, (A, B) = timed(lambda: combine(factors, WEIGHTS, "svd", rank=TARGET_RANK), reps=10)
    peft_ms, (pA, pB) = timed(run_peft, reps=peft_reps)
    row = {"width": width, "ours_ms": ours_ms, "peft_ms": peft_ms, "ours_err": float("nan"), "peft_err": float("nan")}
    if with_ref:
        exact = sum(w * f.scaling * f.B.double() @ f.A.double() for f, w in zip(factors, WEIGHTS))
        U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
        ref = (U[:, :TARGET_RANK] * S[:TARGET_RANK]) @ Vh[:TARGET_RANK]
        err = lambda A, B: ((B.double() @ A.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        row |= {"ours_err": err(A, B), "peft_err": err(pA, pB)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="widths 512 and 1024 only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    widths = [512, 1024] if args.quick else [1024, 2048, 4096]

    bench(256, peft_reps=1, with_ref=False)  # warm-up: imports, LAPACK/thread-pool start
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}; "
          f"2 adapters r={RANK}, target rank {TARGET_RANK}; best of 10 (ours) / 3 (peft; 1 at 4096) runs\n")
    print("| width | ours ms | peft ms | speed-up | ours rel. err | peft rel. err |")
    print("|------:|--------:|--------:|---------:|--------------:|--------------:|")
    for width in widths:
        r = bench(width, peft_reps=3 if width <= 2048 else 1, with_ref=True)
        print(
            f"| {r['width']} | {r['ours_ms']:.2f} | {r['peft_ms']:.0f} | {r['peft_ms'] / r['ours_ms']:.0f}× "
            f"| {r['ours_err']:.1e} | {r['peft_err']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
