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

    python benchmarks/bench_mixed.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compose.lora.config import LoraConfig  # noqa: E402
from compose.lora.mixed import enable_mixed  # noqa: E402
from compose.lora.model import attach_lora, set_active_adapters  # noqa: E402

HIDDEN, LAYERS, MLP, VOCAB = 512, 4, 1024, 1024
ADAPTERS, RANK, TARGETS = 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, SEQ = 32, 64


def models():
    """(base, ours, peft): one random Llama, and two copies carrying the same 8 adapters (random A and B)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=SEQ)
    base = LlamaForCausalLM(config).eval()
    names = [f"a{i}" for i in range(ADAPTERS)]
    lora = dict(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **lora), adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **lora))
    pm.eval()
    ours = copy.deepcopy(base)
    for name in names:
        state = peft.get_peft_model_state_dict(pm, adapter_name=name)
        attach_lora(ours, name, LoraConfig(**lora), {k.removeprefix("base_model.model."): v for k, v in state.items()})
    enable_mixed(ours, names)
    set_active_adapters(ours, names[:1])  # calls without adapter_ids: one adapter for every row
    pm.set_adapter(names[0])
    return base, ours, pm, names


def timings(cases: dict, warmup: int, rounds: int) -> dict[str, float]:
    """Best ms per case over `rounds` interleaved rounds (other load only ever adds time), after `warmup` rounds."""
    best = dict.fromkeys(cases, float("inf"))
    for i in range(warmup + rounds):
        for case, fn in cases.items():
            t = time.perf_counter()
            fn()
            if i >= warmup:
                best[case] = min(best[case], 1e3 * (time.perf_counter() - t))
    return best


def table(title: str, best: dict[str, float]) -> None:
    lora = {case: ms - best["base"] for case, ms in best.items()}
    digits = 1 if best["base"] > 10 else 3
    print(f"{title}\n")
    print("| case | ms | LoRA ms (over base) | × base |")
    print("|:-----|---:|--------------------:|-------:|")
    for case, ms in best.items():
        print(f"| {case} | {ms:.{digits}f} | {lora[case]:.{digits}f} | {ms / best['base']:.2f} |")
    print(f"\nours mixed vs peft mixed: {best['peft mixed'] / best['ours mixed']:.2f}× faster, "
          f"{lora['peft mixed'] / max(lora['ours mixed'], 1e-6):.1f}× less LoRA time; ours mixed vs ours single: "
          f"{best['ours mixed'] / best['ours single']:.2f}× the time, {lora['ours mixed'] / max(lora['ours single'], 1e-6):.1f}× the LoRA time\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed rounds")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    base, ours, pm, names = models()
    ids = torch.arange(BATCH) % ADAPTERS
    row_names = [names[i] for i in ids]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}; Llama hidden {HIDDEN} × {LAYERS} layers, "
          f"{ADAPTERS} adapters r={RANK} on q/k/v/o, batch {BATCH}, row i runs adapter i mod {ADAPTERS}\n")

    # one projection (q_proj, 512 → 512) alone: the LoRA work without the rest of the model's time and noise
    path = "model.layers.0.self_attn.q_proj"
    layer, peft_layer = ours.get_submodule(path), pm.base_model.model.get_submodule(path)

    def ours_mixed_layer(h):
        layer.mixed.rows.slots = ids + 1  # what the model's forward pre-hook makes of adapter_ids
        try:
            return layer(h)
        finally:
            layer.mixed.rows.slots = None

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

    runs = [(f"one projection ({path})", layer_cases, torch.randn(BATCH, seq, HIDDEN), 3, n) for seq, n in ((SEQ, 60), (1, 400))]
    runs += [("whole model", model_cases, torch.randint(0, VOCAB, (BATCH, seq)), 2, n) for seq, n in ((SEQ, 7), (1, 40))]
    for what, make_cases, inputs, warmup, n in runs:
        cases = make_cases(inputs)
        with torch.no_grad():
            err = (cases["ours mixed"]() - cases["peft mixed"]()).abs().max().item()
            best = timings(cases, warmup=warmup, rounds=max(3, n // 3) if args.quick else n)
        table(f"### {what}, {BATCH} × {inputs.shape[1]} tokens; ours vs peft mixed max |Δ| {err:.1e}", best)

if __name__ == "__main__":
    main()
