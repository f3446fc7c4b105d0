"""Streaming merge (`zoo.merge.merge`) vs PEFT's `merge_and_unload().save_pretrained()`: memory and time.

A Llama-like checkpoint with random weights (hidden 1024, 8 layers, vocab 8000: ~0.48 GB fp32 in
~100 MB shards; `--quick`: hidden 512, 4 layers, ~25 MB shards) and a LoRA r=16 on q, k, v, o are
generated in a temporary folder. Each merge runs in its own fresh process, which reports:

- peak RSS: the process's peak resident memory (VmHWM; Python, torch, transformers included), with
  the peak reset to the current RSS just before the merge (Linux `/proc/self/clear_refs`): importing
  transformers has a transient peak of its own, and `ru_maxrss` of a child also counts its parent's
  memory at fork, either of which would hide the merge's;
- merge peak: that peak minus the RSS just before the merge: the merge's own memory, which the
  target (≤ 1.25 × the largest shard) is about;
- wall time of the merge and throughput (checkpoint bytes / time).

PEFT loads the whole model, merges and saves it with the same shard size. Both outputs are compared
tensor by tensor (max |Δ|) to check the merges agree.

    python benchmarks/bench_merge.py [--quick] [--json PATH]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, Report, arguments, fmt, ratio

# The peak RSS of this process alone (VmHWM), reset to the current RSS before the merge: ru_maxrss would
# also count the parent's memory at fork and the transient peak of importing transformers.
HWM = """
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
open("/proc/self/clear_refs", "w").write("5")
"""

OURS = """
import json, re, sys, time
import torch, transformers, safetensors
from transformers.pytorch_utils import Conv1D
from zoo.formats import peft as peft_format
from zoo.merge import merge
from pathlib import Path
base, adapter, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
config, _ = peft_format.config_from_peft(peft_format.read_json_config(adapter / peft_format.CONFIG_NAME))
state = peft_format.strip_prefix(peft_format.load_state(adapter / peft_format.SAFETENSORS_NAME))
with torch.device("meta"):  # transformers' model code loads on first use: count it in the baseline, as for PEFT
    getattr(transformers, "LlamaForCausalLM")(transformers.AutoConfig.from_pretrained(base))
{HWM}
before, start = hwm(), time.perf_counter()
merge([(config, state)], base=base, out=out)
seconds = time.perf_counter() - start
print(json.dumps({"before": before, "peak": hwm(), "seconds": seconds}))
""".replace("{HWM}", HWM)

PEFT = """
import json, re, sys, time
import torch, peft, transformers
from transformers import AutoModelForCausalLM
base, adapter, out, shard = sys.argv[1:5]
{HWM}
before, start = hwm(), time.perf_counter()
model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
model.merge_and_unload().save_pretrained(out, max_shard_size=shard)
seconds = time.perf_counter() - start
print(json.dumps({"before": before, "peak": hwm(), "seconds": seconds}))
""".replace("{HWM}", HWM)


def make_checkpoint(folder: Path, quick: bool) -> tuple[Path, Path, str]:
    """The base checkpoint and a PEFT LoRA (r=16, q/k/v/o, random B) for it; returns (base, adapter, shard size)."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, shard = (512, 4, "25MB") if quick else (1024, 8, "100MB")
    config = LlamaConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "base", max_shard_size=shard)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    peft.get_peft_model(model, lora).save_pretrained(folder / "adapter")
    return folder / "base", folder / "adapter", shard


def run(script: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_difference(a: Path, b: Path) -> float:
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        out = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(shard, framework="pt") as f:
                out.update((k, f.get_tensor(k)) for k in f.keys())
        return out

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), ta.keys() ^ tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


def main() -> None:
    args = arguments(__doc__, "a ~50 MB checkpoint instead of ~0.5 GB")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, adapter, shard = make_checkpoint(tmp, args.quick)
        shards = sorted(base.glob("*.safetensors"))
        total, largest = sum(p.stat().st_size for p in shards), max(p.stat().st_size for p in shards)
        results = {
            "ours (streaming)": run(OURS, str(base), str(adapter), str(tmp / "ours")),
            "peft merge_and_unload": run(PEFT, str(base), str(adapter), str(tmp / "peft"), shard),
        }
        diff = max_difference(tmp / "ours", tmp / "peft")
    mb = lambda n: n / 2**20  # noqa: E731
    report = Report("merge", f"checkpoint {mb(total):.0f} MiB fp32 in {len(shards)} shards, largest {mb(largest):.1f} MiB; "
                             "LoRA r=16 on q,k,v,o; each merge in its own process", timer="wall time (also with --cpu-time)")
    rows = []
    for name, r in results.items():
        growth = r["peak"] - r["before"]
        rows.append([name, fmt(mb(r["peak"]), 0), fmt(mb(growth), 0), ratio(growth / largest), fmt(r["seconds"], 2), fmt(total / r["seconds"] / 1e9, 2)])
    report.table("", ["merge", "peak RSS MiB", "merge peak MiB", "merge peak / largest shard", "wall s", "GB/s"], rows)
    ours, ref = results.values()
    report.note(f"ours / peft: merge peak {(ours['peak'] - ours['before']) / (ref['peak'] - ref['before']):.2f}×, "
                f"peak RSS {ours['peak'] / ref['peak']:.2f}×, time {ours['seconds'] / ref['seconds']:.2f}× "
                f"(throughput {ref['seconds'] / ours['seconds']:.2f}×); max abs difference ours − peft over all tensors: {diff:.1e}")
    report.save(args.json, checkpoint_bytes=total, largest_shard_bytes=largest, results=results)


if __name__ == "__main__":
    main()
