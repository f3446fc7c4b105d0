"""Unmerged overhead: forward time with N = 1, 2, 4 stacked LoRAs (r = 8, 16, 64) vs the base and vs PEFT.

A Llama-shaped model (hidden 512, 4 layers, MLP 1408, vocab 1024; `--quick`: hidden 256, 2 layers) with
LoRAs on every linear layer (q/k/v/o/gate/up/down_proj). For each rank and N, in the same process:

    base        the model without adapters
    peft        PEFT with the N adapters active (`base_model.set_adapter([...])`)
    ours        `compose` with the same N adapters active (`set_active_adapters`)
    ours cat    the N adapters fused into one of rank N·r by concatenating the A's (scaled) and the B's
                (`compose.lora.weighted.combine(..., "cat")`, what `zoo compose --method cat` writes): two
                matmuls per module instead of 2N, same sum up to float rounding

at batch 8 × 128 tokens (prefill) and 8 × 1 token (the size of a decode step; no KV cache). Times are the
best of several no-grad calls; each round runs every case of every (r, N) once, so a burst of other
load hits one round of all of them. "over base" is the time the adapters add. Outputs of ours, PEFT and cat are compared before timing.

    python benchmarks/bench_overhead.py [--quick] [--json PATH]
"""

from __future__ import annotations

import copy

import torch

from common import Report, arguments, fmt, interleaved_ms, llama, ratio, same_adapters
from compose.lora.config import LoraConfig
from compose.lora.layer import LoraLayer
from compose.lora.model import attach_lora, set_active_adapters
from compose.lora.weighted import LoraFactors, combine

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS, COUNTS = (8, 16, 64), (1, 2, 4)


def cat_state(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """One adapter (scaling 1) per module equal to the sum of `names`: A = [s₁A₁; s₂A₂; …], B = [B₁ B₂ …]."""
    state = {}
    for path, m in model.named_modules():
        if isinstance(m, LoraLayer):
            factors = [LoraFactors(m.adapters[n].lora_A, m.adapters[n].lora_B, m.adapters[n].scaling) for n in names]
            state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = combine(factors, [1.0] * len(names), "cat")
    return state


def main() -> None:
    args = arguments(__doc__, "hidden 256, 2 layers, batch 2 × 32, fewer rounds")
    hidden, layers, batch, seq, rounds = (256, 2, 2, 32, 2) if args.quick else (512, 4, 8, 128, 7)
    report = Report("overhead", f"Llama hidden {hidden} × {layers} layers, LoRA on all 7 linear layers, "
                                f"N adapters of rank r stacked; best of {rounds} rounds")
    base = llama(hidden, layers, seq=seq)
    specs = {f"r{r}_{i}": dict(r=r, lora_alpha=2 * r, target_modules=TARGETS) for r in RANKS for i in range(max(COUNTS))}
    ours, pm = same_adapters(base, specs)
    fused = copy.deepcopy(base)  # carries one cat adapter per (r, N)
    blocks = []
    for r in RANKS:
        for n in COUNTS:
            names = [f"r{r}_{i}" for i in range(n)]
            cat = f"cat_r{r}_n{n}"
            attach_lora(fused, cat, LoraConfig(r=n * r, lora_alpha=n * r, target_modules=TARGETS), cat_state(ours, names))
            blocks.append((r, n, names, cat))

    def activate(names: list[str], cat: str):
        def setup():
            set_active_adapters(ours, names)
            pm.base_model.set_adapter(names)
            set_active_adapters(fused, [cat])
        return setup

    for shape in ((batch, seq), (batch, 1)):
        x = torch.randint(0, 1024, shape)
        prefill = shape[1] > 1
        cases = {
            "peft": lambda: pm(x, use_cache=False).logits,
            "ours": lambda: ours(x, use_cache=False).logits,
            "ours cat": lambda: fused(x, use_cache=False).logits,
        }
        worst = 0.0
        timed = [(None, {"base": lambda: base(x, use_cache=False).logits})]
        for r, n, names, cat in blocks:
            timed.append((activate(names, cat), cases))
            timed[-1][0]()
            with torch.no_grad():
                out = {case: fn() for case, fn in cases.items()}
            worst = max(worst, (out["ours"] - out["peft"]).abs().max().item(), (out["ours cat"] - out["ours"]).abs().max().item())
        with torch.no_grad():
            (base_best, *bests) = interleaved_ms(timed, warmup=1, rounds=rounds if prefill else 10 * rounds)
        base_ms = base_best["base"]
        rows = []
        for (r, n, _, _), best in zip(blocks, bests):
            rows.append([
                r, n, fmt(base_ms), fmt(best["peft"]), fmt(best["ours"]), ratio(best["ours"] / best["peft"]),
                fmt(best["peft"] - base_ms), fmt(best["ours"] - base_ms), fmt(best["ours cat"]), ratio(best["ours cat"] / best["ours"]),
            ])
        report.table(
            f"### batch {shape[0]} × {shape[1]} token{'s' if prefill else ''} ({'prefill' if prefill else 'decode-sized, no KV cache'}); "
            f"max abs Δ ours vs peft, cat vs stacked: {worst:.1e}",
            ["r", "N", "base ms", "peft ms", "ours ms", "ours / peft", "peft over base ms", "ours over base ms", "ours cat ms", "cat / ours"],
            rows,
        )
        ratios = [row[5][1] for row in rows]
        cats = [row[9][1] for row in [row for row in rows if row[1] > 1]]
        report.note(f"{'prefill' if prefill else 'decode-sized'}: ours / peft {min(ratios):.2f}–{max(ratios):.2f}× "
                    f"(geometric mean {torch.tensor(ratios).log().mean().exp():.2f}×); fused cat / stacked for N > 1: "
                    f"{min(cats):.2f}–{max(cats):.2f}× (geometric mean {torch.tensor(cats).log().mean().exp():.2f}×)")
    report.save(args.json)


if __name__ == "__main__":
    main()
