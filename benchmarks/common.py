"""Shared pieces of the benchmark scripts: command line, timing, tables (printed and saved), models, adapters.

Every script prints Markdown (a line on its setup, then tables with a ratio column against the anchor)
and, given `--json PATH`, saves the same tables there for `plots.py` and `report.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts run as `python benchmarks/bench_x.py` from the repository root
    sys.path.insert(0, str(ROOT))


#: The timer of every timing here: wall time, or with `--cpu-time` the CPU time of this (only) thread.
clock = time.perf_counter


def arguments(doc: str, quick_help: str) -> argparse.Namespace:
    """Parse `--quick` (a short run that checks the script), `--json PATH` and `--cpu-time`; silences library warnings.

    `--cpu-time` runs torch on one thread and times with that thread's CPU time (`time.thread_time`):
    on a machine shared with other jobs, time spent waiting for a core is then not counted, so ratios
    stay meaningful (wall-clock timings there swing by 2× from one minute to the next). The absolute
    times are single-core times.
    """
    global clock
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the tables to this JSON file")
    parser.add_argument("--cpu-time", action="store_true", help="one torch thread, timed by its CPU time (for shared machines)")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' save_pretrained bars would litter the tables
    args = parser.parse_args()
    if args.cpu_time:
        import torch

        torch.set_num_threads(1)
        clock = time.thread_time
    return args


def best_ms(fn, reps: int, timer=None) -> tuple[float, object]:
    """Best time in ms over `reps` calls (other load only ever adds time), and the last result.

    `timer` defaults to `clock`; pass `time.perf_counter` for work done outside this thread (a subprocess).
    """
    timer = timer or clock
    times = []
    for _ in range(reps):
        start = timer()
        out = fn()
        times.append(timer() - start)
    return 1e3 * min(times), out


def interleaved_ms(blocks: list[tuple], warmup: int, rounds: int) -> list[dict[str, float]]:
    """Best ms per case of each block, over `rounds` rounds that each run every case of every block once,
    after `warmup` untimed rounds.

    `blocks` holds (setup, {case: fn}): `setup()` (untimed; may be None) readies the block's cases, e.g.
    switches the active adapters. A burst of other load then hits one round of every case, not every
    round of some cases; the best of the rounds drops it.
    """
    best = [dict.fromkeys(cases, float("inf")) for _, cases in blocks]
    for i in range(warmup + rounds):
        for (setup, cases), block_best in zip(blocks, best):
            if setup is not None:
                setup()
            for case, fn in cases.items():
                start = clock()
                fn()
                if i >= warmup:
                    block_best[case] = min(block_best[case], 1e3 * (clock() - start))
    return best


def environment() -> dict:
    """The machine and library versions the numbers come from."""
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def setup_line(what: str, timer: str | None = None) -> str:
    env = environment()
    load = ", ".join(f"{x:.1f}" for x in env["load_average"])
    timer = timer or ("wall time" if clock is time.perf_counter else "CPU time of the one thread")
    return f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; {env['threads']} thread{'s' if env['threads'] > 1 else ''}, {timer}, load average {load}; {what}"


class Report:
    """The tables of one script run: printed as Markdown as they come, saved as JSON at the end."""

    def __init__(self, name: str, setup: str, timer: str | None = None):
        """`timer` names what the times measure when it is not `clock` (e.g. a subprocess's wall time)."""
        self.name, self.setup, self.tables, self.notes = name, setup, [], []
        print(setup_line(setup, timer) + "\n", flush=True)

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        """Print a Markdown table (numbers already formatted as the reader should see them) and keep it.

        `rows` hold (formatted text, raw value) pairs or plain values; the JSON keeps the raw values.
        """
        text = [[c[0] if isinstance(c, tuple) else str(c) for c in row] for row in rows]
        raw = [[c[1] if isinstance(c, tuple) else c for c in row] for row in rows]
        if title:
            print(f"{title}\n")
        print("| " + " | ".join(columns) + " |")
        print("|:---|" + "---:|" * (len(columns) - 1))
        for row in text:
            print("| " + " | ".join(row) + " |")
        print(flush=True)
        self.tables.append({"title": title, "columns": columns, "rows": raw})

    def note(self, line: str) -> None:
        """A line of conclusions (ratios) under the tables."""
        print(line + "\n", flush=True)
        self.notes.append(line)

    def save(self, path: Path | None, **extra) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {"name": self.name, "setup": self.setup, "environment": environment(), "clock": clock.__name__,
                    "tables": self.tables, "notes": self.notes, **extra}
            path.write_text(json.dumps(data, indent=1, default=float) + "\n")


def fmt(x: float, digits: int | None = None) -> tuple[str, float]:
    """(text, value): ms with a sensible number of digits."""
    if digits is None:
        digits = 0 if x >= 100 else 1 if x >= 10 else 2
    return f"{x:,.{digits}f}", x


def ratio(x: float) -> tuple[str, float]:
    """(text, value) of a ratio: two decimals near 1, fewer for large ones."""
    return (f"{x:,.0f}×" if x >= 100 else f"{x:.1f}×" if x >= 10 else f"{x:.2f}×"), x


# ---- models and adapters ----------------------------------------------------------------------------------


def llama(hidden: int, layers: int, mlp: int | None = None, vocab: int = 1024, seq: int = 128):
    """A random-weight `LlamaForCausalLM` in eval mode (head dim 64, no GQA)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp or hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=max(seq, 128))
    return LlamaForCausalLM(config).eval()


def bert(hidden: int = 768, layers: int = 12, seq: int = 128):
    """A random-weight `BertModel` in eval mode (BERT-base by default: 12 layers, hidden 768, 12 heads, FFN 3072)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                        max_position_embeddings=max(seq, 512))
    return BertModel(config, add_pooling_layer=False).eval()


def same_adapters(base, specs: dict[str, dict], with_peft: bool = True):
    """(ours, peft): `tests/tiny.same_lora_adapters` — deep copies of `base` with the same LoRA adapters `specs`
    ({name: peft.LoraConfig kwargs}, random A and B), ours all active, in eval mode; PEFT's None without `with_peft`."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from tiny import same_lora_adapters

    ours, ref = same_lora_adapters(base, specs)
    return (ours, ref) if with_peft else (ours, None)


def one_layer(width: int):
    """A model of one square `nn.Linear` (`proj`) of `width`: the module the weighted combinations act on."""
    import torch
    from torch import nn

    class OneLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(width, width, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    return OneLayer()


def peft_one_layer(width: int, rank: int, adapters=(("a", 32, False), ("b", 16, True))):
    """`one_layer(width)` under PEFT with adapters (name, lora_alpha, use_rslora) of rank `rank`, random A and B,
    and the adapters as `compose.lora.weighted.LoraFactors` (same tensors): (peft model, {name: factors})."""
    import peft
    import torch

    from compose.lora.weighted import LoraFactors

    torch.manual_seed(0)
    model = None
    for name, alpha, rslora in adapters:
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=["proj"], init_lora_weights=False)
        model = peft.get_peft_model(one_layer(width), config, adapter_name=name) if model is None else model
        if name not in model.peft_config:
            model.add_adapter(name, config)
    layer = model.base_model.model.proj
    factors = {n: LoraFactors(layer.lora_A[n].weight.detach(), layer.lora_B[n].weight.detach(), layer.scaling[n]) for n, _, _ in adapters}
    return model, factors
