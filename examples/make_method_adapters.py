"""Train a MiniLM sentiment adapter for every method the zoo loads, each with the library that defines the
method, save it in that library's format and register it in the root registry.json.

    python examples/make_method_adapters.py [--steps 60] [NAME ...]   # ~5 min on 2 idle CPU cores; a one-off

Same objective as examples/make_adapters.py (supervised contrastive on mean-pooled embeddings of
examples/data/reviews-train.jsonl, key "sentiment"); writes examples/adapters/<name>/:

- with peft (here a dev-time tool, like the AdapterHub oracle of the tests; the demo never imports it):
  minilm-sentiment-adalora (q,v, init_r 8 → target_r 4: AdaLoRA's budget prunes ranks, the saved
  rank_pattern is the allocation; no orthogonality penalty, which peft adds only to a model's own loss), -ia3 (PEFT's BERT defaults), -prompt (10 tokens), -ptuning (10 tokens,
  MLP encoder);
- with AdapterHub's `adapters` in /work/venv-adapters (examples/make_adapterhub_adapters.py; PEFT cannot
  prefix-tune BERT on transformers 5): -pfeiffer, -houlsby, -parallel, -prefix, -mam, and
  minilm-topic-pfeiffer (key "topic") for the demo's bottleneck stack and fusion.

Every adapter is then registered in registry.json (relative source paths) and loaded back through `zoo.load`,
which must give the training library's outputs on a padded probe batch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.common import ADAPTERS, BASE_ID, PROBE, minilm_path, train_contrastive  # noqa: E402

REGISTRY = ROOT / "registry.json"
EXPECTED = ROOT / "tests/fixtures/minilm-adapterhub-expected.safetensors"
ADAPTERHUB_PYTHON = Path(os.environ.get("ADAPTERHUB_PYTHON", "/work/venv-adapters/bin/python"))
ADAPTERHUB = ["minilm-sentiment-pfeiffer", "minilm-topic-pfeiffer", "minilm-sentiment-houlsby", "minilm-sentiment-parallel",
              "minilm-sentiment-prefix", "minilm-sentiment-mam"]
TASKS = {name: "topic" if "-topic-" in name else "sentiment" for name in ["minilm-sentiment-adalora", "minilm-sentiment-ia3",
         "minilm-sentiment-prompt", "minilm-sentiment-ptuning", *ADAPTERHUB]}


def peft_specs(steps: int) -> dict:
    """name → (peft config, learning rate, seed)."""
    from peft import AdaLoraConfig, IA3Config, PromptEncoderConfig, PromptTuningConfig

    task = "FEATURE_EXTRACTION"
    return {
        # pruning runs from step tinit to steps - tfinal, a mask every deltaT steps; then the allocation is fixed
        "minilm-sentiment-adalora": (AdaLoraConfig(init_r=8, target_r=4, lora_alpha=16, target_modules=["query", "value"], total_step=steps,
                                                   tinit=steps // 6, tfinal=steps // 3, deltaT=max(1, steps // 12), task_type=task), 5e-3, 20),
        "minilm-sentiment-ia3": (IA3Config(task_type=task), 1e-2, 21),  # target/feed-forward modules: PEFT's BERT defaults
        "minilm-sentiment-prompt": (PromptTuningConfig(num_virtual_tokens=10, prompt_tuning_init="SAMPLE_VOCAB", task_type=task), 3e-2, 22),
        "minilm-sentiment-ptuning": (PromptEncoderConfig(num_virtual_tokens=10, encoder_reparameterization_type="MLP", encoder_hidden_size=128,
                                                         task_type=task), 3e-3, 23),
    }


def train_peft(names: list[str], steps: int, tokenizer, probe) -> dict[str, torch.Tensor]:
    """Train and save the peft adapters; returns their outputs on the probe batch, as peft computes them."""
    from peft import get_peft_model
    from transformers import AutoModel

    expected = {}
    for name, (config, lr, seed) in peft_specs(steps).items():
        if name not in names:
            continue
        torch.manual_seed(seed)
        model = get_peft_model(AutoModel.from_pretrained(minilm_path()), config).train()
        allocate = model.base_model.update_and_allocate if config.peft_type == "ADALORA" else None  # AdaLoRA's rank budget
        train_contrastive(model, tokenizer, [p for p in model.parameters() if p.requires_grad], "sentiment", lr=lr, seed=seed, label=name,
                          steps=steps, after_step=allocate)
        with torch.no_grad():
            expected[name] = model.eval()(**probe).last_hidden_state
        model.peft_config["default"].base_model_name_or_path = BASE_ID  # not this machine's path to the weights
        model.save_pretrained(ADAPTERS / name)
        (ADAPTERS / name / "README.md").unlink(missing_ok=True)  # peft's model-card stub
        sort_module_lists(ADAPTERS / name / "adapter_config.json")
        print(f"saved {ADAPTERS / name}", flush=True)
    return expected


def sort_module_lists(path: Path) -> None:
    """peft keeps target modules in a set, so their saved order changes from run to run: sort it (same
    config, reproducible bytes)."""
    import json

    config = json.loads(path.read_text())
    for key in ("target_modules", "feedforward_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def train_adapterhub(names: list[str], steps: int) -> dict[str, torch.Tensor]:
    """Run the AdapterHub half under its own interpreter: train `names`, then write AdapterHub's outputs of every
    shipped AdapterHub adapter on the probe batch to EXPECTED (tests/test_examples.py holds the zoo to them)."""
    from safetensors.torch import load_file

    wanted = [n for n in ADAPTERHUB if n in names]
    if not wanted:
        return {}
    script = ROOT / "examples/make_adapterhub_adapters.py"
    subprocess.run([str(ADAPTERHUB_PYTHON), str(script), str(minilm_path()), str(EXPECTED), str(steps), *wanted], check=True, cwd=ROOT)
    return {name: t for name, t in load_file(EXPECTED).items() if name in wanted or name == "base"}


def register(names: list[str]) -> None:
    """(Re-)register the adapters in the shipped registry.json; the store is a throwaway (ZOO_HOME)."""
    import zoo

    for name in names:
        if any(m.name == name for m in zoo.list_adapters(registry=REGISTRY)):
            zoo.remove(name, registry=REGISTRY)
        # AdapterHub prefixes do not record the attention layout: it comes from the base's config.json
        m = zoo.add(ADAPTERS / name, task=TASKS[name], tags=["demo", "embeddings"], license="apache-2.0", base=minilm_path(), registry=REGISTRY)
        print(f"registered {m.ref}: {m.label}, {m.size.trainable_params:,} params, {m.size.bytes:,} B")


def check(expected: dict[str, torch.Tensor], probe) -> None:
    """zoo.load (no peft, no AdapterHub) must reproduce each training library's outputs within 1e-5, plus, for
    AdapterHub, what its transformers (4.57, eager attention) already differs by on the bare base."""
    import zoo

    def outputs(**kwargs) -> torch.Tensor:
        with torch.no_grad():
            return zoo.load(minilm_path(), registry=REGISTRY, **kwargs)(**probe).last_hidden_state

    floor = 0.0
    if "base" in expected:
        floor = (outputs() - expected.pop("base")).abs().max().item()
        print(f"bare base, AdapterHub's transformers vs ours: max abs diff {floor:.1e}")
    for name, reference in expected.items():
        diff = (outputs(adapters=name) - reference).abs().max().item()
        print(f"{name}: zoo.load vs {'AdapterHub' if name in ADAPTERHUB else 'peft'}, max abs diff {diff:.1e}")
        assert diff < 1e-5 + (floor if name in ADAPTERHUB else 0.0), f"{name}: the zoo's outputs differ from the training library's by {diff:.1e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("names", nargs="*", default=list(TASKS))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    os.environ.setdefault("ZOO_HOME", tempfile.mkdtemp(prefix="zoo-home-"))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    probe = tokenizer(PROBE, padding=True, return_tensors="pt")
    expected = train_peft(args.names, args.steps, tokenizer, probe) | train_adapterhub(args.names, args.steps)
    register(args.names)
    check(expected, probe)


if __name__ == "__main__":
    main()
