"""Mixed-adapter batches: each row its own LoRA adapter, ours (`compose.lora.mixed`) vs PEFT's `adapter_names=`.

A Llama-shaped model (hidden 512, 4 layers, MLP 1024, vocab 1024) with 8 adapters (r=16 on q/k/v/o_proj),
batch 32, rows spread over the 8 adapters (4 each). Same model, same adapters, same process:

    base          no adapter
    single        one adapter active for the whole batch (ours / PEFT)
    mixed         row i runs adapter i mod 8 (ours: adapter_ids=, one gathered bmm per module;
                  PEFT: adapter_names=, a loop over the adapters present with sub-batch indexing)

First one projection (q_proj) alone, where the LoRA work is most of what differs, then the whole model;
each at 64 tokens per row (prefill) and at 1 token per row (the size of a decode step, without KV cache).
Times are the best of several no-grad calls after warm-up, the cases interleaved so load drift hits them
alike; "LoRA ms" is the time over the base. Each mixed pair's outputs are compared before timing.

Two ratios matter. The whole call: a whole-model ratio cannot exceed peft's own time over the base (at
prefill the base's attention and MLP dominate both). And the LoRA work (time over the base), which is
what a mixed-batch implementation controls; where ours is within the timing noise of the base (under 2%
of it), the LoRA ratio is not given.

    python benchmarks/bench_mixed.py [--quick] [--json PATH] [--cpu-time]
"""

from __future__ import annotations

import torch

from common import Report, arguments, fmt, interleaved_ms, llama, ratio, same_adapters
from compose.lora.mixed import enable_mixed
from compose.lora.model import set_active_adapters

HIDDEN, LAYERS, MLP, VOCAB = 512, 4, 1024, 1024
ADAPTERS, RANK, TARGETS = 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, SEQ = 32, 64
NOISE = 0.02  # LoRA time under this share of the base time is not told apart from the base


def models():
    """(base, ours, peft, names): one random Llama, and two copies carrying the same 8 adapters (random A and B)."""
    base = llama(HIDDEN, LAYERS, MLP, VOCAB, seq=SEQ)
    names = [f"a{i}" for i in range(ADAPTERS)]
    ours, pm = same_adapters(base, {n: dict(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS) for n in names})
    enable_mixed(ours, names)
    set_active_adapters(ours, names[:1])  # calls without adapter_ids: one adapter for every row
    pm.set_adapter(names[0])
    return base, ours, pm, names


def main() -> None:
    args = arguments(__doc__, "fewer timed rounds")
    base, ours, pm, names = models()
    ids = torch.arange(BATCH) % ADAPTERS
    row_names = [names[i] for i in ids]
    report = Report("mixed", f"Llama hidden {HIDDEN} × {LAYERS} layers, {ADAPTERS} adapters r={RANK} on q/k/v/o, batch {BATCH}, row i runs adapter i mod {ADAPTERS}")

    # one projection (q_proj, 512 → 512) alone: the LoRA work without the rest of the model's time and noise
    path = "model.layers.0.self_attn.q_proj"
    layer, peft_layer = ours.get_submodule(path), pm.base_model.model.get_submodule(path)

    def ours_mixed_layer(h):
        layer.mixed.rows.set(ids, ADAPTERS)  # what the model's forward pre-hook makes of adapter_ids
        try:
            return layer(h)
        finally:
            layer.mixed.rows.clear()

    def layer_cases(h):
        return {
            "base": lambda: layer.base_layer(h),
            "ours single": lambda: layer(h),
            "peft single": lambda: peft_layer(h),
            "ours mixed": lambda: ours_mixed_layer(h),
            "peft mixed": lambda: peft_layer(h, adapter_names=row_names),
        }

    def model_cases(x):
        return {
            "base": lambda: base(x, use_cache=False).logits,
            "ours single": lambda: ours(x, use_cache=False).logits,
            "peft single": lambda: pm(x, use_cache=False).logits,
            "ours mixed": lambda: ours(x, adapter_ids=ids, use_cache=False).logits,
            "peft mixed": lambda: pm(x, adapter_names=row_names, use_cache=False).logits,
        }

    runs = [("one projection", layer_cases, torch.randn(BATCH, seq, HIDDEN), n) for seq, n in ((SEQ, 60), (1, 400))]
    runs += [("whole model", model_cases, torch.randint(0, VOCAB, (BATCH, seq)), n) for seq, n in ((SEQ, 7), (1, 40))]
    for what, make_cases, inputs, n in runs:
        cases = make_cases(inputs)
        with torch.no_grad():
            err = (cases["ours mixed"]() - cases["peft mixed"]()).abs().max().item()
            (best,) = interleaved_ms([(None, cases)], warmup=2, rounds=max(3, n // 4) if args.quick else n)
        lora = {case: ms - best["base"] for case, ms in best.items()}
        shape = f"{what}{f' ({path})' if what == 'one projection' else ''}, {BATCH} × {inputs.shape[1]} token{'s' if inputs.shape[1] > 1 else ''}"
        report.table(f"### {shape}; max abs Δ ours vs peft mixed {err:.1e}", ["case", "ms", "LoRA ms (over base)", "× base"],
                     [[case, fmt(ms, 3 if best["base"] < 10 else 1), fmt(lora[case], 3 if best["base"] < 10 else 1), ratio(ms / best["base"])]
                      for case, ms in best.items()])
        within_noise = lora["ours mixed"] < NOISE * best["base"]
        work = (f"LoRA time {lora['peft mixed']:.3g} ms for peft, within the timing noise of the base for ours" if within_noise else
                f"{lora['peft mixed'] / lora['ours mixed']:.1f}× less LoRA time ({lora['ours mixed']:.3g} vs {lora['peft mixed']:.3g} ms)")
        report.note(f"{shape}: ours mixed {best['peft mixed'] / best['ours mixed']:.2f}× faster than peft mixed (at most "
                    f"{best['peft mixed'] / best['base']:.2f}× possible: peft's time over the bare base), {work}; "
                    f"ours mixed takes {best['ours mixed'] / best['ours single']:.2f}× the time of ours with one adapter for all rows")
    report.save(args.json)


if __name__ == "__main__":
    main()
