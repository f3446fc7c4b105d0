"""AdapterFusion overhead: forward with an attention fusion of N = 2, 3, 4 LoRAs vs the same LoRAs stacked vs the base.

PEFT has no AdapterFusion (nor any learned mix of adapters at inference), so there is no PEFT figure: the
anchor is the same N adapters stacked (their outputs added), which costs the same adapter work without
the attention. A fused module computes every member's δᵢ, then the fusion's query (a d×d Linear on the
base output), one d×d product with the keys' weight, a softmax over the N members and the d×d value
projection (`compose.fusion.layer.FusionLayer`): three d×d matmuls per fused module on top of the LoRAs.

A Llama-shaped model (hidden 512, 4 layers, MLP 1408; `--quick`: hidden 256, 2 layers) with LoRAs r=16 on
q/k/v/o_proj; the fusion (untrained: the uniform average of its members) covers those modules. Batch 8 ×
128 tokens and 8 × 1 token (decode-sized, no KV cache); best of several no-grad calls, each round
running every case once.

    python benchmarks/bench_fusion.py [--quick] [--json PATH]
"""

from __future__ import annotations

import copy

import torch

from common import Report, arguments, fmt, interleaved_ms, llama, ratio, same_adapters
from compose.fusion.config import FusionConfig
from compose.fusion.model import attach_fusion
from compose.lora.model import set_active_adapters

RANK, TARGETS, COUNTS = 16, ["q_proj", "k_proj", "v_proj", "o_proj"], (2, 3, 4)


def main() -> None:
    args = arguments(__doc__, "hidden 256, 2 layers, batch 2 × 32, fewer rounds")
    hidden, layers, batch, seq, rounds = (256, 2, 2, 32, 2) if args.quick else (512, 4, 8, 128, 5)
    report = Report("fusion", f"Llama hidden {hidden} × {layers} layers, N LoRAs r={RANK} on q/k/v/o_proj; no PEFT equivalent: "
                              f"the anchor is the same adapters stacked; best of {rounds} rounds")
    base = llama(hidden, layers, seq=seq)
    names = [f"a{i}" for i in range(max(COUNTS))]
    stacked, _ = same_adapters(base, {n: dict(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS) for n in names}, with_peft=False)
    fused = {}
    for n in COUNTS:
        fused[n] = copy.deepcopy(stacked)
        attach_fusion(fused[n], f"fusion{n}", FusionConfig(members=names[:n]))
    def block(n: int, x: torch.Tensor) -> tuple:
        """N's cases: stacked (after activating its first N adapters) and its fusion."""
        return (lambda: set_active_adapters(stacked, names[:n]),
                {"stacked": lambda: stacked(x, use_cache=False).logits, "fusion": lambda: fused[n](x, use_cache=False).logits})

    for shape in ((batch, seq), (batch, 1)):
        x = torch.randint(0, 1024, shape)
        prefill = shape[1] > 1
        timed = [(None, {"base": lambda: base(x, use_cache=False).logits})] + [block(n, x) for n in COUNTS]
        with torch.no_grad():
            (base_best, *bests) = interleaved_ms(timed, warmup=1, rounds=rounds if prefill else 10 * rounds)
        b = base_best["base"]
        rows = [[n, fmt(b), fmt(best["stacked"]), fmt(best["fusion"]), ratio(best["fusion"] / best["stacked"]),
                 ratio(best["stacked"] / b), ratio(best["fusion"] / b)] for n, best in zip(COUNTS, bests)]
        report.table(f"### batch {shape[0]} × {shape[1]} token{'s' if prefill else ''}",
                     ["N", "base ms", "stacked ms", "fusion ms", "fusion / stacked", "stacked / base", "fusion / base"], rows)
        report.note(f"{'prefill' if prefill else 'decode-sized'}: fusion takes {min(r[4][1] for r in rows):.2f}–{max(r[4][1] for r in rows):.2f}× "
                    f"the time of the same adapters stacked ({min(r[6][1] for r in rows):.2f}–{max(r[6][1] for r in rows):.2f}× the base)")
    report.save(args.json)


if __name__ == "__main__":
    main()
