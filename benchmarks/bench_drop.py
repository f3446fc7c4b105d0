"""AdapterDrop speed-up in multi-task inference: 8 tasks on one input, adapters dropped from the first K layers.

As in the AdapterDrop paper (Rücklé et al., EMNLP 2021: 39% faster with 8 tasks when the first 5 of 12
layers are dropped): the K layers without adapters compute the same for every task, so they run once,
and the batch is copied per task from layer K on (AdapterHub's `Parallel` block; ours is
`compose.parallel.enable_parallel`, each copy running its task's LoRA by `compose.lora.mixed`).

A BERT-base-shaped encoder (12 layers, hidden 768, FFN 3072, random weights; `--quick`: hidden 128) with 8
LoRA adapters (r=16 on query/key/value/attention.output.dense), 128 tokens per row. For each K the time of
one forward of all 8 tasks is the best of a few, the K values interleaved round by round. The anchor is
K = 0 (every layer per task: 8·L layer-batches); the ideal time ratio is (K + 8·(L − K)) / (8·L).
PEFT has no shared trunk: its closest is all 8 tasks as 8·B rows in one call with `adapter_names=`,
shown beside K = 0. Before timing, task outputs are compared with each task run alone with drop K.

    python benchmarks/bench_drop.py [--quick] [--json PATH]
"""

from __future__ import annotations

import torch

from common import Report, arguments, bert, fmt, interleaved_ms, ratio, same_adapters
from compose.drop import set_drop
from compose.lora.model import set_active_adapters
from compose.parallel import disable_parallel, enable_parallel

TASKS, RANK, TARGETS = 8, 16, ["query", "key", "value", "attention.output.dense"]


def check(model, names: list[str], k: int, x: torch.Tensor) -> float:
    """Max |Δ| between the parallel outputs and each task run alone with drop k."""
    enable_parallel(model, names, k)
    together = model(x).last_hidden_state
    disable_parallel(model)
    worst = 0.0
    for t, name in enumerate(names):
        set_active_adapters(model, [name])
        set_drop(model, k)
        worst = max(worst, (together[t] - model(x).last_hidden_state).abs().max().item())
    set_drop(model, 0)
    return worst


def sweep(model, pm, names: list[str], ks: list[int], x: torch.Tensor, rounds: int) -> tuple[dict[int, float], float]:
    """Best ms per K, and of PEFT's all-tasks-as-rows call; each round runs every K once (after its untimed set-up)."""
    rows = x.repeat(len(names), 1)
    row_names = [n for n in names for _ in range(x.shape[0])]
    blocks = [((lambda k=k: enable_parallel(model, names, k)), {k: lambda: model(x)}) for k in ks]
    blocks.append((lambda: disable_parallel(model), {"peft": lambda: pm(input_ids=rows, adapter_names=row_names)}))
    best = {case: ms for block in interleaved_ms(blocks, warmup=1, rounds=rounds) for case, ms in block.items()}
    return {k: best[k] for k in ks}, best["peft"]


def main() -> None:
    args = arguments(__doc__, "hidden 128, 32 tokens, one timed round")
    hidden, seq, rounds, runs = (128, 32, 1, [(1, None), (2, [0, 5, 12])]) if args.quick else (768, 128, 2, [(1, None), (4, [0, 3, 5, 8, 12])])
    layers = 12
    report = Report("drop", f"BERT-base shape (12 layers, hidden {hidden}), {TASKS} LoRA tasks r={RANK} on q/k/v/o, {seq} tokens per row; "
                            f"best of {rounds} rounds")
    base = bert(hidden, layers, seq)
    names = [f"task{i}" for i in range(TASKS)]
    ours, pm = same_adapters(base, {n: dict(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS) for n in names})
    del base
    series = []
    with torch.no_grad():
        for batch, ks in runs:
            ks = ks or list(range(layers + 1))
            x = torch.randint(1000, 2000, (batch, seq))
            err = check(ours, names, 5, x)
            best, peft_ms = sweep(ours, pm, names, ks, x, rounds)
            t0 = best[0]
            rows = [["peft, 8 tasks as rows (adapter_names=)", "—", fmt(peft_ms), ratio(peft_ms / t0), "", "", ""]]
            for k in ks:
                ideal = (k + TASKS * (layers - k)) / (TASKS * layers)
                rows.append([f"ours, K = {k}", k, fmt(best[k]), ratio(best[k] / t0), ratio(t0 / best[k]),
                             (f"{100 * (1 - best[k] / t0):.0f}%", 1 - best[k] / t0), ratio(ideal)])
            report.table(f"### batch {batch} × {seq} tokens, {TASKS} tasks; max abs Δ vs each task alone with drop 5: {err:.1e}",
                         ["run", "K", "ms", "time / K=0", "speed-up vs K=0", "time saved", "ideal time / K=0"], rows)
            if 5 in best:
                report.note(f"batch {batch}: K = 5 takes {best[5] / t0:.2f}× the time of K = 0 ({100 * (1 - best[5] / t0):.0f}% less, "
                            f"{t0 / best[5]:.2f}× the throughput; ideal {(5 + TASKS * 7) / (TASKS * 12):.2f}×); the paper: 39% faster. "
                            f"peft with all tasks as rows: {peft_ms / t0:.2f}× ours at K = 0")
            series.append({"batch": batch, "k": ks, "ms": [best[k] for k in ks], "peft_ms": peft_ms})
    report.save(args.json, series=series, tasks=TASKS, layers=layers)


if __name__ == "__main__":
    main()
