"""The AdapterHub half of examples/make_method_adapters.py (which runs it): bottleneck, prefix and MAM
sentiment adapters on all-MiniLM-L6-v2, trained with the `adapters` library and saved in its format.

    /work/venv-adapters/bin/python examples/make_adapterhub_adapters.py MINILM_FOLDER EXPECTED_FILE STEPS [NAME ...]

Runs under the AdapterHub venv (adapters 1.3.0, transformers 4.57, rich). It trains the adapters NAME ...
for STEPS steps (none: train nothing) and writes each to examples/adapters/<name>/ (adapter_config.json +
adapter.safetensors); then it writes to EXPECTED_FILE the outputs of every adapter of SPECS, as saved,
on a padded probe batch: what tests/test_examples.py holds `zoo.load` to.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import adapters
import torch
from adapters import ConfigUnion, DoubleSeqBnConfig, ParBnConfig, PrefixTuningConfig, SeqBnConfig
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import ADAPTERS, BASE_ID, PROBE, train_contrastive  # noqa: E402

#: name → (AdapterHub config, the property it learns, learning rate, seed)
SPECS = {
    "minilm-sentiment-pfeiffer": (SeqBnConfig(), "sentiment", 2e-3, 10),
    "minilm-topic-pfeiffer": (SeqBnConfig(), "topic", 2e-3, 11),
    "minilm-sentiment-houlsby": (DoubleSeqBnConfig(), "sentiment", 2e-3, 12),
    "minilm-sentiment-parallel": (ParBnConfig(reduction_factor=16), "sentiment", 2e-3, 13),
    # the prefix MLP is small (bottleneck 32) so the file stays small; the zoo runs it once at import
    "minilm-sentiment-prefix": (PrefixTuningConfig(prefix_length=10, bottleneck_size=32), "sentiment", 5e-3, 14),
    # MAM (He et al., 2022) scaled down: a flat 10-token prefix beside a parallel bottleneck
    "minilm-sentiment-mam": (ConfigUnion(PrefixTuningConfig(prefix_length=10, flat=True), ParBnConfig(reduction_factor=16)), "sentiment", 2e-3, 15),
}


def base(folder: str):
    from transformers import AutoModel

    # eager attention: AdapterHub's prefixes need the materialised mask (see scripts/make_adapterhub_fixtures.py)
    model = AutoModel.from_pretrained(folder, attn_implementation="eager")
    adapters.init(model)
    return model


def save(model, name: str, folder: Path) -> None:
    """AdapterHub's save, as safetensors: its prefix pool is registered under several names, which
    safetensors refuses, so those adapters are pickled first and then written once per tensor (what the zoo
    does on import) — a safetensors file lets a fresh clone rebuild the store from the shipped folder."""
    shutil.rmtree(folder, ignore_errors=True)
    model.save_adapter(str(folder), name, with_head=False)
    state = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
    seen, distinct = set(), {}
    for key in sorted(state):
        t = state[key]
        identity = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if identity not in seen:
            seen.add(identity)
            distinct[key] = t.contiguous()
    save_file(distinct, folder / "adapter.safetensors", metadata={"format": "pt"})
    (folder / "pytorch_adapter.bin").unlink()
    config = json.loads((folder / "adapter_config.json").read_text())
    config["model_name"] = BASE_ID  # not this machine's path to the weights
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(minilm: str, expected_file: str, steps: int, names: list[str]) -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    logging.getLogger("adapters").setLevel(logging.ERROR)  # "adapters available but none activated" while loading
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    probe = tokenizer(PROBE, padding=True, return_tensors="pt")
    with torch.no_grad():  # the bare base too: transformers 4.57 and 5.x differ a little on it already
        expected = {"base": base(minilm).eval()(**probe).last_hidden_state.contiguous()}
    for name in names if steps > 0 else []:
        train_and_save(minilm, tokenizer, probe, name, steps)
    for name in SPECS:  # reloaded into a fresh model: the outputs the zoo must reproduce come from the files
        model = base(minilm)
        model.load_adapter(str(ADAPTERS / name), set_active=True, use_safetensors=True)
        with torch.no_grad():
            expected[name] = model.eval()(**probe).last_hidden_state.contiguous()
    save_file(expected, expected_file)


def train_and_save(minilm: str, tokenizer, probe, name: str, steps: int) -> None:
    """Train adapter `name` for `steps` steps, save it, and check AdapterHub reloads it to the trained outputs."""
    config, key, lr, seed = SPECS[name]
    torch.manual_seed(seed)
    model = base(minilm)
    model.add_adapter(name, config=config)
    model.train_adapter(name)  # freezes the base, activates the adapter, train mode
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_contrastive(model, tokenizer, trainable, key, lr=lr, seed=seed, label=name, steps=steps)
    with torch.no_grad():
        trained = model.eval()(**probe).last_hidden_state
    save(model, name, ADAPTERS / name)
    model = base(minilm)
    model.load_adapter(str(ADAPTERS / name), set_active=True, use_safetensors=True)
    with torch.no_grad():
        diff = (model.eval()(**probe).last_hidden_state - trained).abs().max().item()
    assert diff < 1e-6, f"{name}: AdapterHub reloads its saved file {diff:.2e} away from the trained adapter"
    print(f"saved {ADAPTERS / name} ({sum(f.stat().st_size for f in (ADAPTERS / name).iterdir()) / 1e3:.0f} KB)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
