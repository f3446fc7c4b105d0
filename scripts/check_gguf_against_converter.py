"""Compare `zoo export --to gguf` with llama.cpp's own `convert_lora_to_gguf.py`, tensor by tensor.

The converter is not a dependency: it ships in llama.cpp's repository and in the `llama-cpp-python` sdist
(`vendor/llama.cpp/`). Point this script at that folder; it runs the converter with this Python (its gguf-py
and conversion/ come from that folder), on tiny random models of every architecture zoo maps, and checks
that both files hold the same tensor names, GGML types, shapes and bytes, and the same adapter keys.

    pip download llama-cpp-python --no-deps --no-binary :all: && tar xzf llama_cpp_python-*.tar.gz
    python scripts/check_gguf_against_converter.py llama_cpp_python-*/vendor/llama.cpp
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cases():
    import transformers

    return {
        "llama": (transformers.LlamaConfig(**COMMON), transformers.LlamaForCausalLM, ATTENTION_MLP),
        "mistral": (transformers.MistralConfig(**COMMON), transformers.MistralForCausalLM, ATTENTION_MLP),
        "qwen2": (transformers.Qwen2Config(**COMMON), transformers.Qwen2ForCausalLM, ATTENTION_MLP),
        "qwen3": (transformers.Qwen3Config(**COMMON, head_dim=8), transformers.Qwen3ForCausalLM, ATTENTION_MLP),
        "gemma": (transformers.GemmaConfig(**COMMON, head_dim=8), transformers.GemmaForCausalLM, ATTENTION_MLP),
        "phi3": (transformers.Phi3Config(**COMMON, pad_token_id=0), transformers.Phi3ForCausalLM, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    }


def read(path: Path) -> tuple[dict, dict]:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    keys = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("adapter.", "general.architecture", "general.type"))}
    return keys, {t.name: (t.tensor_type.name, [int(s) for s in t.shape], np.asarray(t.data).tobytes()) for t in reader.tensors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("converter", type=Path, help="folder holding convert_lora_to_gguf.py")
    parser.add_argument("--outtypes", nargs="+", default=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--only", nargs="+", metavar="ARCH", help="some of: llama mistral qwen2 qwen3 gemma phi3")
    args = parser.parse_args()
    import torch
    from tiny import make_peft_adapter

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, (config, cls, targets) in cases().items():
            if args.only and name not in args.only:
                continue
            torch.manual_seed(0)
            model = cls(config)
            model.save_pretrained(tmp / name / "base")
            make_peft_adapter(model, tmp / name / "lora", r=4, lora_alpha=8, target_modules=targets)
            for outtype in args.outtypes:
                theirs, ours = tmp / name / f"converter-{outtype}.gguf", tmp / name / f"zoo-{outtype}.gguf"
                subprocess.run([sys.executable, "convert_lora_to_gguf.py", "--base", str(tmp / name / "base"), "--outtype", outtype,
                                "--outfile", str(theirs), str(tmp / name / "lora")], cwd=args.converter, check=True, capture_output=True,
                               env=dict(os.environ, PYTHONPATH=""))
                env = dict(os.environ, PYTHONPATH=str(ROOT), ZOO_HOME=str(tmp / "home"), ZOO_REGISTRY=str(tmp / "home" / f"{name}.json"))
                subprocess.run([sys.executable, "-m", "cli.main", "export", str(tmp / name / "lora"), "--to", "gguf", "--base", str(tmp / name / "base"),
                                "--outtype", outtype, "--out", str(ours)], check=True, capture_output=True, env=env)
                (keys_t, tensors_t), (keys_o, tensors_o) = read(theirs), read(ours)
                differ = sorted(k for k in tensors_t.keys() | tensors_o.keys() if tensors_t.get(k) != tensors_o.get(k))
                same = keys_t == keys_o and not differ
                failures += not same
                print(f"{name:8} {outtype:5} {len(tensors_t):3} tensors: {'identical' if same else f'DIFFERENT {differ[:3]} {keys_t} {keys_o}'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
