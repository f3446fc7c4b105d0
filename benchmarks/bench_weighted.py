"""Weighted `cat`, `ties` and `dare_ties` combinations of two LoRAs: ours (`compose.lora.weighted.combine`) vs PEFT's.

The same two adapters as `bench_svd.py` (r = 16; alpha 32, and alpha 16 with rsLoRA; weights 0.6 and −0.4)
on one square `nn.Linear` of width 1024 / 2048 / 4096; density 0.5 for the pruning methods. In the same process:

    ours    `combine(factors, weights, method, density=...)`: the new (A, B), nothing else
    peft    `add_weighted_adapter(..., combination_type=method, density=...)` then `delete_adapter`: PEFT has no
            function that only computes, so its time includes building the new adapter's modules; the column
            "peft add_adapter" is that floor alone (an empty adapter of the same rank added and deleted)

`cat` and `ties` are deterministic: both results are compared (max |Δ| of A and B). `dare_ties` draws random
masks, and PEFT draws its own after initialising the new adapter's modules from the same RNG, so the two
results are not comparable entry by entry (the tests check ours against PEFT's formula on shared masks).

    python benchmarks/bench_weighted.py [--quick] [--json PATH]
"""

from __future__ import annotations

from common import Report, arguments, best_ms, fmt, peft_one_layer, ratio
from compose.lora.weighted import combine

RANK, WEIGHTS, DENSITY = 16, [0.6, -0.4], 0.5
METHODS = ("cat", "ties", "dare_ties")


def main() -> None:
    args = arguments(__doc__, "widths 512 and 1024, fewer repetitions")
    widths, reps = ([512, 1024], 3) if args.quick else ([1024, 2048, 4096], 20)
    report = Report("weighted", f"2 adapters r={RANK}, weights {WEIGHTS}, density {DENSITY}; best of {reps} runs each")
    rows = []
    for width in widths:
        model, factors = peft_one_layer(width, RANK)
        layer = model.base_model.model.proj
        config = model.peft_config["a"]

        def run_peft(method: str):
            density = None if method == "cat" else DENSITY
            model.add_weighted_adapter(["a", "b"], WEIGHTS, "new", combination_type=method, density=density)
            out = layer.lora_A["new"].weight.detach().clone(), layer.lora_B["new"].weight.detach().clone()
            model.delete_adapter("new")
            return out

        def add_empty(rank: int):
            model.add_adapter("empty", config.__class__(r=rank, lora_alpha=rank, target_modules=["proj"]))
            model.delete_adapter("empty")

        for method in METHODS:
            density = None if method == "cat" else DENSITY
            ours_ms, (A, B) = best_ms(lambda: combine(list(factors.values()), WEIGHTS, method, density=density), reps)
            peft_ms, (pA, pB) = best_ms(lambda: run_peft(method), reps)
            floor_ms, _ = best_ms(lambda: add_empty(A.shape[0]), reps)
            diff = "random masks" if method == "dare_ties" else f"{max((A - pA).abs().max().item(), (B - pB).abs().max().item()):.1e}"
            math_ms = max(peft_ms - floor_ms, 0.0)  # PEFT's time less its module-building floor (noisy: a difference of two timings)
            rows.append([width, method, fmt(ours_ms), fmt(peft_ms), fmt(floor_ms), ratio(peft_ms / ours_ms), ratio(math_ms / ours_ms), diff])
    columns = ["width", "method", "ours ms", "peft ms", "peft add_adapter ms", "peft / ours", "(peft − add_adapter) / ours", "max abs Δ ours vs peft"]
    report.table("", columns, rows)
    for method in METHODS:
        speed = [row[5][1] for row in rows if row[1] == method]
        report.note(f"{method}: ours {min(speed):.1f}–{max(speed):.1f}× faster than peft over widths {widths[0]}–{widths[-1]}")
    report.save(args.json)


if __name__ == "__main__":
    main()
