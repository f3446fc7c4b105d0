"""SVD combination of two LoRAs: our QR path (`compose.lora.weighted.combine(..., "svd")`) vs PEFT's.

PEFT's `add_weighted_adapter(combination_type="svd")` builds the dense out×in delta and runs a full
`torch.linalg.svd` on it; ours stacks the factors, QRs them and takes the SVD of a (Σr)² core. Both run
here on the same one-layer model (a square `nn.Linear` of each width, adapters r=16, target rank 16),
in the same process. Errors are ‖B·A − D_k‖_F / ‖D_k‖_F against D_k, the fp64 dense truncated SVD of the
exact weighted sum (slow: ~90 s at width 4096 on 2 cores; --quick skips the big widths).

    python benchmarks/bench_svd.py [--quick] [--json PATH]
"""

from __future__ import annotations

import torch

from common import Report, arguments, best_ms, fmt, peft_one_layer, ratio
from compose.lora.weighted import combine

RANK, TARGET_RANK, WEIGHTS = 16, 16, [0.6, -0.4]


def bench(width: int, peft_reps: int, with_ref: bool) -> dict:
    model, factors = peft_one_layer(width, RANK)
    factors = [factors["a"], factors["b"]]
    layer = model.base_model.model.proj

    def run_peft():
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "svd", combination_type="svd", svd_rank=TARGET_RANK)
        out = layer.lora_A["svd"].weight.detach().clone(), layer.lora_B["svd"].weight.detach().clone()
        model.delete_adapter("svd")
        return out

    ours_ms, (A, B) = best_ms(lambda: combine(factors, WEIGHTS, "svd", rank=TARGET_RANK), reps=10)
    peft_ms, (pA, pB) = best_ms(run_peft, reps=peft_reps)
    row = {"width": width, "ours_ms": ours_ms, "peft_ms": peft_ms, "ours_err": float("nan"), "peft_err": float("nan")}
    if with_ref:
        exact = sum(w * f.scaling * f.B.double() @ f.A.double() for f, w in zip(factors, WEIGHTS))
        U, S, Vh = torch.linalg.svd(exact, full_matrices=False)
        ref = (U[:, :TARGET_RANK] * S[:TARGET_RANK]) @ Vh[:TARGET_RANK]
        err = lambda A, B: ((B.double() @ A.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        row |= {"ours_err": err(A, B), "peft_err": err(pA, pB)}
    return row


def main() -> None:
    args = arguments(__doc__, "widths 512 and 1024 only")
    widths = [512, 1024] if args.quick else [1024, 2048, 4096]
    bench(256, peft_reps=1, with_ref=False)  # warm-up: imports, LAPACK/thread-pool start
    report = Report("svd", f"2 adapters r={RANK}, target rank {TARGET_RANK}; best of 10 (ours) / 3 (peft; 1 at 4096) runs")
    rows = []
    for width in widths:
        r = bench(width, peft_reps=3 if width <= 2048 else 1, with_ref=True)
        rows.append([width, fmt(r["ours_ms"], 2), fmt(r["peft_ms"], 0), ratio(r["peft_ms"] / r["ours_ms"]),
                     (f"{r['ours_err']:.1e}", r["ours_err"]), (f"{r['peft_err']:.1e}", r["peft_err"])])
    report.table("", ["width", "ours ms", "peft ms", "peft / ours", "ours rel. err", "peft rel. err"], rows)
    report.note(f"ours {rows[0][3][0]} (width {widths[0]}) to {rows[-1][3][0]} (width {widths[-1]}) faster than peft; "
                f"relative error ours {max(r[4][1] for r in rows):.1e}, peft {max(r[5][1] for r in rows):.1e} (max over widths)")
    report.save(args.json)


if __name__ == "__main__":
    main()
