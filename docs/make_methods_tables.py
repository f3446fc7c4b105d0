"""Print the measured tables of docs/methods.md, so its figures can be refreshed rather than retyped.

    python docs/make_methods_tables.py              # sizes: every method on ChatGLM-6B and Llama-2-7B (a few seconds)
    python docs/make_methods_tables.py --peft       # the Llama-2-7B sizes against PEFT's own parameter count
    python docs/make_methods_tables.py --fidelity   # max |Δ| against peft 0.21.2 and adapters 1.3.0 (about a minute)
    python docs/make_methods_tables.py --wild       # PiSSA/OLoRA and embedding LoRAs against peft 0.21.2 (half a minute)

Sizes come from `zoo.estimate.estimate_adapter` (what `zoo estimate` prints) on the bases' config.json alone;
each row carries the equivalent CLI command; `--peft` checks them against PEFT's own count. Fidelity runs the engine on the tiny test models (tests/tiny.py)
against PEFT's `PeftModel.from_pretrained` on the same saved adapter (needs the `test` extra: peft), and
against the outputs AdapterHub computed for tests/fixtures/adapterhub.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

BASES = {"ChatGLM-6B": "examples/chatglm-6b", "Llama-2-7B": "examples/llama-2-7b"}
# PEFT has no AdaLoRA or IA3 defaults for chatglm: its fused query_key_value, and for IA3 PEFT's choice for
# the fused-qkv families (bloom, gpt_neox, falcon): query_key_value + the down-projection, which scales its input.
CHATGLM_IA3 = {"targets": ["query_key_value", "dense_4h_to_h"], "feedforward": ["dense_4h_to_h"]}
#: (label, settings, per-base overrides)
ROWS = [
    ("LoRA r=8 on q, v (ChatGLM: its fused query_key_value)", {"method": "lora", "rank": 8}, {"Llama-2-7B": {"targets": ["q_proj", "v_proj"]}}),
    ("AdaLoRA init_r=12 → target_r=8", {"method": "adalora", "init_r": 12, "target_r": 8}, {"ChatGLM-6B": {"targets": ["query_key_value"]}}),
    ("IA3, PEFT's default targets (ChatGLM: none, see the note)", {"method": "ia3"}, {"ChatGLM-6B": CHATGLM_IA3}),
    ("prefix / P-tuning v2, 30 tokens", {"method": "prefix", "num_virtual_tokens": 30}, {}),
    ("prefix / P-tuning v2, 128 tokens", {"method": "prefix", "num_virtual_tokens": 128}, {}),
    ("prefix, 128 tokens, prefix_projection", {"method": "prefix", "num_virtual_tokens": 128, "prefix_projection": True}, {}),
    ("prompt tuning, 20 tokens", {"method": "prompt", "num_virtual_tokens": 20}, {}),
    ("P-tuning, 20 tokens (MLP encoder)", {"method": "ptuning", "num_virtual_tokens": 20}, {}),
    ("bottleneck Pfeiffer (seq_bn), ÷16", {"method": "bottleneck", "variant": "pfeiffer", "reduction_factor": 16}, {}),
    ("bottleneck Houlsby (double_seq_bn), ÷16", {"method": "bottleneck", "variant": "houlsby", "reduction_factor": 16}, {}),
    ("bottleneck parallel (par_bn), ÷2", {"method": "bottleneck", "variant": "parallel", "reduction_factor": 2}, {}),
    ("MAM (AdapterHub defaults)", {"method": "mam"}, {}),
]


def command(base: str, settings: dict) -> str:
    """The `zoo estimate` command line that computes the same report."""
    parts = [f"zoo estimate --base {base}"]
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {','.join(value) if isinstance(value, list) else f'{value:g}' if isinstance(value, float) else value}")
    return " ".join(parts)


def size_tables() -> None:
    from zoo.estimate import estimate_adapter

    for title, base in BASES.items():
        reports = [(label, settings | overrides.get(title, {})) for label, settings, overrides in ROWS]
        first = estimate_adapter(base, **reports[0][1])
        print(f"#### {title} (`{base}`, {first.base_params:,} base parameters)\n")
        print("| method, settings | params in the file | fp16 | share of base | params trained | command |")
        print("|---|---:|---:|---:|---:|---|")
        for label, settings in reports:
            r = estimate_adapter(base, **settings)
            trained = f"{r.training_params:,}" if r.training_params != r.params else "same"
            if r.rank_budget is not None:  # AdaLoRA: trained at init_r, saved pruned to the rank budget
                low, high = r.pruned_params_min, r.pruned_params_max
                saved = f"{low:,}" if low == high else f"{low:,}–{high:,}"
                mb = f"{2 * low / 1e6:,.2f} MB" if low == high else f"{2 * low / 1e6:,.2f}–{2 * high / 1e6:,.2f} MB"
                share = f"{low / r.base_params:.4%}" if low == high else f"{low / r.base_params:.4%}–{high / r.base_params:.4%}"
                print(f"| {label} | {saved} (pruned; {r.params:,} before) | {mb} | {share} | {r.params:,} | `{command(base, settings)}` |")
                continue
            print(f"| {label} | {r.params:,} | {r.mb:,.2f} MB | {r.base_share:.4%} | {trained} | `{command(base, settings)}` |")
        print()


def peft_counts() -> None:
    """The Llama-2-7B rows against PEFT's own count: `get_peft_model` on the same config, built on the meta device."""
    import json
    import warnings

    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.estimate import estimate_adapter

    base = BASES["Llama-2-7B"]
    config = LlamaConfig(**json.loads((ROOT / base / "config.json").read_text()))
    t = {"task_type": "CAUSAL_LM"}
    cases = [
        ({"method": "lora", "rank": 8, "targets": ["q_proj", "v_proj"]}, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], **t)),
        ({"method": "adalora", "init_r": 12, "target_r": 8}, peft.AdaLoraConfig(init_r=12, target_r=8, total_step=100, **t)),
        ({"method": "ia3"}, peft.IA3Config(**t)),
        ({"method": "prefix", "num_virtual_tokens": 128}, peft.PrefixTuningConfig(num_virtual_tokens=128, **t)),
        ({"method": "prefix", "num_virtual_tokens": 128, "prefix_projection": True}, peft.PrefixTuningConfig(num_virtual_tokens=128, prefix_projection=True, **t)),
        ({"method": "prompt", "num_virtual_tokens": 20}, peft.PromptTuningConfig(num_virtual_tokens=20, **t)),
        ({"method": "ptuning", "num_virtual_tokens": 20}, peft.PromptEncoderConfig(num_virtual_tokens=20, **t)),
    ]
    print("| settings (Llama-2-7B) | zoo estimate: params trained | peft 0.21.2: trainable | peft: all |")
    print("|---|---:|---:|---:|")
    for settings, peft_config in cases:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainable, total = peft.get_peft_model(LlamaForCausalLM(config), peft_config).get_nb_trainable_parameters()
        ours = estimate_adapter(base, **settings).training_params
        print(f"| `{command(base, settings).removeprefix(f'zoo estimate --base {base} ')}` | {ours:,} | {trainable:,} | {total:,} |")
    print()


# ---- fidelity -----------------------------------------------------------------------------------


def _peft_cases(family: str, task: str):
    """(label, peft config, AdaLoRA pruning) per PEFT method, on one tiny family."""
    import peft

    t = {"task_type": task}
    lora_targets = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"], "bert": ["query", "value", "intermediate.dense"]}[family]
    return [
        ("LoRA", peft.LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets, **t), False),
        ("AdaLoRA (pruned)", peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=lora_targets, **t), True),
        ("IA3", peft.IA3Config(**t), False),
        ("prompt tuning", peft.PromptTuningConfig(num_virtual_tokens=5, **t), False),
        ("P-tuning (MLP)", peft.PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=24, **t), False),
        ("P-tuning (LSTM)", peft.PromptEncoderConfig(num_virtual_tokens=5, encoder_hidden_size=24, encoder_reparameterization_type="LSTM", **t), False),
        ("prefix tuning", peft.PrefixTuningConfig(num_virtual_tokens=4, **t), False),
        ("prefix tuning (projection)", peft.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=24, **t), False),
    ]


def _prefix_by_the_math(base, folder: Path, batch: dict):
    """BERT prefix reference where PEFT cannot run it: an explicit cache of the per-layer keys/values, the mask
    extended by T ones, positions T.. (PEFT's offset) and the adapter's saved head."""
    import copy

    import torch
    from tiny import load_adapter
    from transformers import DynamicCache

    from compose.prefix.model import prefix_key_values

    config, state = load_adapter(folder)
    model = copy.deepcopy(base)
    model.classifier.load_state_dict({"weight": state["classifier.weight"], "bias": state["classifier.bias"]})
    B, L = batch["input_ids"].shape
    T = config.num_virtual_tokens
    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix_key_values(config, state)):
        cache.update(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1), i)
    mask = torch.cat([torch.ones(B, T, dtype=torch.long), batch["attention_mask"]], dim=1)
    with torch.no_grad():
        return model(**{**batch, "attention_mask": mask}, cache=cache, position_ids=torch.arange(T, T + L).unsqueeze(0)).logits


def peft_fidelity(work: Path) -> list[tuple[str, str, str, float, float | None]]:
    """(method, family, reference, max |Δ| of logits, max |Δ| after merging or None) per PEFT method and family."""
    import copy
    import warnings

    import torch
    from tiny import peft_model, random_peft_adapter, tiny_bert, tiny_gpt2, tiny_llama, token_ids

    import zoo
    from zoo.loading import merge_in_memory

    families = {"llama": (tiny_llama, "CAUSAL_LM"), "gpt2": (tiny_gpt2, "CAUSAL_LM"), "bert": (tiny_bert, "SEQ_CLS")}
    ids = token_ids()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    batch = {"input_ids": ids, "attention_mask": mask}
    rows = []
    for family, (make, task) in families.items():
        base = make()
        for i, (label, config, prune) in enumerate(_peft_cases(family, task)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                folder = random_peft_adapter(base, work / f"{family}-{i}", config, seed=i, prune=prune)
                ours = zoo.load(copy.deepcopy(base), adapters=[str(folder)])
                with torch.no_grad():
                    got = ours(**batch).logits
                    plain = base(**batch).logits
                if family == "bert" and label.startswith("prefix"):  # PEFT 0.21.2 cannot run it on transformers 5.24
                    reference, ref = "the math (explicit KV cache)", _prefix_by_the_math(base, folder, batch)
                else:
                    reference = "peft 0.21.2"
                    with torch.no_grad():
                        ref = peft_model(base, folder)(**batch).logits
                diff = (got - ref).abs().max().item()
                assert got.shape == ref.shape and (got[:, -ids.shape[1]:] - plain).abs().max() > 1e-3, label  # the adapter matters
                merged = None
                if config.peft_type.value in ("LORA", "ADALORA", "IA3"):
                    merge_in_memory(ours)
                    with torch.no_grad():
                        merged_ref = peft_model(base, folder).merge_and_unload()(**batch).logits
                        merged = (ours(**batch).logits - merged_ref).abs().max().item()
            rows.append((label, family, reference, diff, merged))
    return rows


def adapterhub_fidelity() -> list[tuple[str, str, float]]:
    """(case, family, max |Δ|) of the engine against AdapterHub's own outputs (tests/fixtures/adapterhub)."""
    import json

    from test_adapterhub import (
        BOTTLENECKS,
        EXTRA,
        FUSIONS,
        ROOT,
        STACKS,
        adapter,
        base,
        expected,
        run,
    )

    from compose import drop
    from compose.bottleneck.fusion import attach_bottleneck_fusion
    from compose.fusion.model import detach_fusion
    from compose.bottleneck.model import attach_bottleneck, set_active_bottlenecks
    from compose.mam.model import attach_mam
    from compose.prefix.model import attach_prefix, detach_prefix
    from zoo.formats.adapterhub import read_adapterhub_fusion

    rows = []
    for family in ("bert", "gpt2", "llama"):
        tensors = expected(family)
        worst: dict[str, float] = {}

        def record(kind: str, model, case: str, worst=worst, tensors=tensors) -> None:
            worst[kind] = max(worst.get(kind, 0.0), (run(model, tensors) - tensors[case]).abs().max().item())

        model = base(family)
        singles = BOTTLENECKS + EXTRA[family]
        for name in singles:
            attach_bottleneck(model, name, *adapter(family, name)[:2])
        for name in singles:
            set_active_bottlenecks(model, [name])
            record("bottleneck (Pfeiffer, Houlsby, parallel, custom BnConfigs)", model, name)
        for case, names in STACKS.items():
            set_active_bottlenecks(model, names)
            record("Stack of bottlenecks", model, case)
        set_active_bottlenecks(model, ["seq", "seq2", "dbl", "par"])
        for case, folder in FUSIONS.items():
            config, state, meta = read_adapterhub_fusion(ROOT / family / "fusions" / folder)
            attach_bottleneck_fusion(model, case, config, state, query_before_ln=meta["query_before_ln"], residual_before=meta["residual_before"])
            record("Fuse (AdapterFusion, dynamic and static)", model, case)
            if case == "fuse":
                drop.set_drop(model, 1)
                record("AdapterDrop (Stack and Fuse)", model, "drop_fuse")
                drop.set_drop(model, 0)
            detach_fusion(model)
        set_active_bottlenecks(model, ["dbl"])
        drop.set_drop(model, 1)
        record("AdapterDrop (Stack and Fuse)", model, "drop_dbl")

        # AdapterHub computed its prefixes with eager attention (its SDPA path mis-masks them); ours run either way
        model_config = json.loads((ROOT / family / "base" / "config.json").read_text())
        for attention in ("eager", "sdpa"):
            model = base(family)
            model.set_attn_implementation(attention)
            for name in ("prefix", "flat"):
                config, state, _ = adapter(family, name, model_config=model_config)
                attach_prefix(model, name, config, state)
                record(f"prefix tuning (MLP and flat), ours on {attention}", model, name)
                detach_prefix(model, name)
            config, state, _ = adapter(family, "mam", model_config=model_config)
            attach_mam(model, "mam", config, state)
            record(f"MAM, ours on {attention}", model, "mam")
        rows += [(kind, family, value) for kind, value in worst.items()]
    return rows


def fidelity_tables() -> None:
    import os
    import tempfile

    from transformers.utils import logging

    logging.disable_progress_bar()
    fmt = lambda x: "0" if x == 0 else f"{x:.1e}"
    with tempfile.TemporaryDirectory() as work:
        os.environ.update(ZOO_HOME=str(Path(work) / "zoo-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        rows = peft_fidelity(Path(work))
    families = ("llama", "gpt2", "bert")
    print("| method | Llama | GPT-2 | BERT | merged, vs peft's merge_and_unload (all three) |")
    print("|---|---:|---:|---:|---:|")
    for label in dict.fromkeys(r[0] for r in rows):
        cells = {family: (reference, diff, merged) for l, family, reference, diff, merged in rows if l == label}
        forward = [fmt(cells[f][1]) + ("" if cells[f][0].startswith("peft") else " (vs the math)") for f in families]
        merged = [cells[f][2] for f in families if cells[f][2] is not None]
        print(f"| {label} | {' | '.join(forward)} | {fmt(max(merged)) if merged else '— (not mergeable)'} |")
    print()
    worst = adapterhub_fidelity()
    print("| AdapterHub case | BERT | GPT-2 | Llama |")
    print("|---|---:|---:|---:|")
    for kind in dict.fromkeys(r[0] for r in worst):
        print(f"| {kind} | {' | '.join(fmt(v) for k, f, v in worst if k == kind)} |")


def wild_table() -> None:
    """Adapters from the wild (tests/test_wild_adapters.py's cases), max |Δ logit| against PEFT's loaded model:
    zoo loaded, merged in memory, streamed, and PEFT's own merge_and_unload."""
    import os
    import tempfile

    from transformers.utils import logging

    from test_wild_adapters import EMBEDDING_TARGETS, RESIDUAL_CASES, differences, embedding_adapter, residual_adapter

    logging.disable_progress_bar()
    fmt = lambda x: "0" if x == 0 else f"{x:.1e}"
    cases = [(f"{init} saved unconverted, {model}", lambda folder, i=init, m=model: residual_adapter(folder, i, m)) for init, model in RESIDUAL_CASES]
    cases += [(f"LoRA on {' + '.join(t)} of a tied-embedding Llama", lambda folder, t=t: embedding_adapter(folder, t)) for t in EMBEDDING_TARGETS]
    print("| adapter | loaded | merged in memory | `zoo merge` (streaming) | peft's own merge_and_unload |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        os.environ.update(ZOO_HOME=str(Path(work) / "zoo-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        for i, (label, make) in enumerate(cases):
            base, adapter = make(Path(work) / f"adapter{i}")
            base.save_pretrained(Path(work) / f"base{i}")
            print(f"| {label} | {' | '.join(fmt(d) for d in differences(base, Path(work) / f'base{i}', adapter, Path(work) / f'merged{i}'))} |")


if __name__ == "__main__":
    {"--fidelity": fidelity_tables, "--peft": peft_counts, "--wild": wild_table}.get(sys.argv[-1], size_tables)()
