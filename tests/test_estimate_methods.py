"""`estimate_adapter` for every method against real adapters: peft builds AdaLoRA, IA3, prefix, prompt
and P-tuning adapters on tiny models; bottleneck, prefix and MAM sizes equal what AdapterHub's own library
counted (recorded); ChatGLM-6B P-tuning v2 against its public number."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from tests.tiny import VOCAB, tiny_bert, tiny_gpt2, tiny_llama, token_ids
from zoo.errors import ZooError
from zoo.estimate import (
    DEFAULT_ADALORA_TARGETS,
    DEFAULT_IA3_TARGETS,
    estimate_adapter,
    render_estimate,
)
from zoo.inspect import inspect_adapter
from zoo.units import human_bytes

CHATGLM = Path(__file__).parent.parent / "examples" / "chatglm-6b"


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=1, num_heads=4,
                      decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


BASES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": lambda: tiny_bert(num_labels=None), "t5": tiny_t5}
TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION", "t5": "SEQ_2_SEQ_LM"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Each tiny model with a folder holding its config.json (what estimate reads)."""
    out = {}
    for name, factory in BASES.items():
        model = factory()
        folder = tmp_path_factory.mktemp(name)
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
        out[name] = (model, folder)
    return out


def peft_sizes(base: torch.nn.Module, config, folder: Path) -> tuple[int, int]:
    """(parameters peft trains, parameters in the file it saves) for `config` on a copy of `base`."""
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), config)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.save_pretrained(folder)
    saved = sum(t.numel() for t in load_file(folder / "adapter_model.safetensors").values())
    return trained, saved


# ---- ChatGLM-6B: remote code, sized from config.json + zoo-architecture.json ----------------------


def test_chatglm_ptuning_v2_prefix_matches_the_public_number():
    report = estimate_adapter(CHATGLM, method="prefix", num_virtual_tokens=128)
    assert report.source == "architecture description"
    assert (report.num_layers, report.kv_width) == (28, 4096)
    assert report.params == 128 * 28 * 2 * 4096 == 29_360_128 == report.training_params
    assert report.bytes == 58_720_256 and human_bytes(report.bytes) == "58.72 MB" and report.mb == 58.72
    # ChatGLM's own P-tuning v2 with prefix_projection trains an MLP (hidden 4096 by default there too) but
    # PEFT saves its output: same file, more training parameters.
    projected = estimate_adapter(CHATGLM, method="prefix", num_virtual_tokens=128, prefix_projection=True, encoder_hidden_size=1024)
    assert projected.params == 29_360_128
    assert projected.training_params == 128 * 4096 + (4096 * 1024 + 1024) + (1024 * 28 * 2 * 4096 + 28 * 2 * 4096)

    console = Console(record=True, width=160)
    render_estimate(report, console)
    text = console.export_text()
    assert "29,360,128" in text and "58.72 MB" in text and "128 tokens × 28 layers × 2 (key, value) × 4096" in text


def test_chatglm_other_methods_from_the_description():
    assert estimate_adapter(CHATGLM, method="prompt", num_virtual_tokens=20).params == 20 * 4096
    houlsby = estimate_adapter(CHATGLM, method="bottleneck", variant="houlsby")
    m = 4096 // 16
    assert houlsby.params == 28 * 2 * (2 * 4096 * m + m + 4096) and houlsby.sites == ["attention", "ffn"]
    ia3 = estimate_adapter(CHATGLM, method="ia3", targets=["query_key_value", "dense_4h_to_h"], feedforward=["dense_4h_to_h"])
    assert ia3.params == 28 * (12288 + 16384)
    with pytest.raises(ZooError, match="no default AdaLoRA targets known for model_type 'chatglm'"):
        estimate_adapter(CHATGLM, method="adalora")  # peft's AdaLoRA table has no chatglm entry either
    assert estimate_adapter(CHATGLM, method="adalora", targets=["query_key_value"], init_r=4, target_r=2).params == 28 * 4 * (4096 + 12288 + 1)


# ---- peft as the oracle ----------------------------------------------------------------------------


@pytest.mark.parametrize("base_name", ["llama", "gpt2", "bert", "t5"])
def test_adalora_at_init_r_equals_peft(bases, tmp_path, base_name):
    import peft

    base, folder = bases[base_name]
    config = peft.AdaLoraConfig(init_r=5, target_r=2, total_step=10, task_type=TASKS[base_name])
    trained, saved = peft_sizes(base, config, tmp_path / "a")
    report = estimate_adapter(folder, method="adalora", init_r=5, target_r=2)
    assert report.params == trained == saved
    assert report.targets == DEFAULT_ADALORA_TARGETS[base.config.model_type]
    assert report.rank_budget == 2 * sum(r.count for r in report.rows)


def test_adalora_pruned_file_lies_within_the_budget_bounds(bases, tmp_path):
    """Train until AdaLoRA's rank allocator prunes; the saved ranks add up to the budget and the file's
    size lies between the cheapest and the costliest placement of that budget."""
    import peft

    base, folder = bases["llama"]
    targets = ["q_proj", "v_proj", "down_proj"]  # different shapes, so placement changes the size
    config = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=6, tinit=1, tfinal=2, deltaT=1, target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = token_ids()
    for step in range(6):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "pruned")

    report = estimate_adapter(folder, method="adalora", init_r=6, target_r=2, targets=targets)
    found = inspect_adapter(tmp_path / "pruned")
    assert found.method == "adalora" and found.summary.rank_budget == report.rank_budget == 2 * 6
    assert found.summary.total_rank == report.rank_budget
    assert len(found.ranks) > 1  # pruning left different ranks in different modules
    assert report.pruned_params_min <= found.trainable_params <= report.pruned_params_max
    assert report.pruned_params_min < report.pruned_params_max < report.params


@pytest.mark.parametrize(
    ("base_name", "targets", "feedforward"),
    [("llama", None, None), ("gpt2", None, None), ("bert", None, None), ("t5", None, None),
     ("llama", ["q_proj", "up_proj", "down_proj"], ["up_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"], ["c_fc"]),
     ("llama", r".*\.(k_proj|down_proj)", r".*down_proj")],
)
def test_ia3_equals_peft(bases, tmp_path, base_name, targets, feedforward):
    import peft

    base, folder = bases[base_name]
    config = peft.IA3Config(task_type=TASKS[base_name], target_modules=targets, feedforward_modules=feedforward)
    trained, saved = peft_sizes(base, config, tmp_path / "a")
    report = estimate_adapter(folder, method="ia3", targets=targets, feedforward=feedforward, dtype="fp32")
    assert report.params == trained == saved and report.bytes == 4 * saved
    if targets is None:
        assert (report.targets, report.feedforward) == DEFAULT_IA3_TARGETS[base.config.model_type]
    # the feed-forward rows are sized by their input, the others by their output
    for row in report.rows:
        feedforward_row = "input" in row.detail
        assert row.params == row.count * (row.in_features if feedforward_row else row.out_features)
    assert any("input" in row.detail for row in report.rows) and any("output" in row.detail for row in report.rows)


def test_ia3_default_tables_are_peft_defaults():
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING as adalora,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as ia3_feedforward,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as ia3_targets,
    )

    for model_type, (targets, feedforward) in DEFAULT_IA3_TARGETS.items():
        assert (targets, feedforward) == (ia3_targets[model_type], ia3_feedforward[model_type]), model_type
    for model_type, targets in DEFAULT_ADALORA_TARGETS.items():
        assert targets == adalora[model_type], model_type


@pytest.mark.parametrize("base_name", ["llama", "gpt2", "bert", "t5"])
def test_prompt_learning_equals_peft(bases, tmp_path, base_name):
    """Stored size (what the file holds) and training size (encoders included) of prefix, prompt and
    P-tuning adapters; Llama has grouped-query attention, so its prefix is KV-wide, not hidden-wide."""
    import peft

    base, folder = bases[base_name]
    task, n = TASKS[base_name], 3
    cases = [
        (peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=n), dict(method="prefix")),
        (peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=n, prefix_projection=True, encoder_hidden_size=7),
         dict(method="prefix", prefix_projection=True, encoder_hidden_size=7)),
        (peft.PromptTuningConfig(task_type=task, num_virtual_tokens=n), dict(method="prompt")),
        (peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=n, encoder_hidden_size=9), dict(method="ptuning", encoder_hidden_size=9)),
        (peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=n, encoder_hidden_size=5, encoder_reparameterization_type="LSTM",
                                  encoder_num_layers=3), dict(method="ptuning", encoder_hidden_size=5, encoder_type="LSTM", encoder_num_layers=3)),
    ]
    for i, (config, options) in enumerate(cases):
        trained, saved = peft_sizes(base, config, tmp_path / str(i))
        report = estimate_adapter(folder, num_virtual_tokens=n, **options)
        assert (report.params, report.training_params) == (saved, trained), options
        adapter = json.loads((tmp_path / str(i) / "adapter_config.json").read_text())
        if options["method"] == "prefix":
            assert (report.num_layers, report.kv_width) == (adapter["num_layers"], adapter["token_dim"])
        else:
            assert (report.token_dim, report.num_transformer_submodules) == (adapter["token_dim"], adapter["num_transformer_submodules"])
    if base_name == "llama":
        assert estimate_adapter(folder, method="prefix", num_virtual_tokens=n).kv_width == 2 * (32 // 4)  # 2 KV heads × head_dim 8


# ---- AdapterHub as the oracle: bottleneck, prefix, MAM -----------------------------------------------

#: The tiny bases AdapterHub's counts below were recorded on (built here from the same configs).
ADAPTERHUB_BASES = {
    "bert": ("BertConfig", dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                max_position_embeddings=32, architectures=["BertModel"])),
    "llama": ("LlamaConfig", dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=32, architectures=["LlamaForCausalLM"])),
    "gpt2": ("GPT2Config", dict(vocab_size=64, n_positions=32, n_embd=48, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0,
                                architectures=["GPT2LMHeadModel"])),
    "t5": ("T5Config", dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1, num_heads=4,
                            architectures=["T5Model"])),  # encoder-decoder: bottlenecks in both stacks, prefixes per attention kind
}
#: The AdapterHub config each count was recorded for → the same adapter asked of estimate.
ADAPTERHUB_CASES = {
    "seq_bn": ("SeqBnConfig()", dict(method="bottleneck")),
    "double_seq_bn": ("DoubleSeqBnConfig(reduction_factor=4)", dict(method="bottleneck", variant="houlsby", reduction_factor=4)),
    "par_bn": ("ParBnConfig()", dict(method="bottleneck", variant="parallel")),
    "prefix_flat": ("PrefixTuningConfig(prefix_length=5, flat=True)", dict(method="prefix", num_virtual_tokens=5)),
    "mam": ("MAMConfig()", dict(method="mam")),
}
#: What adapters 1.3.0 counted for those (unique parameters of the adapter), recorded from a real run of its
#: library; the folders AdapterHub saved are checked by inspect and estimate in test_inspect_methods.py.
ADAPTERHUB_COUNTS = {
    "bert/seq_bn": 324, "bert/double_seq_bn": 2208, "bert/par_bn": 2144, "bert/prefix_flat": 640, "bert/mam": 132032,
    "llama/seq_bn": 324, "llama/double_seq_bn": 2208, "llama/par_bn": 2144, "llama/prefix_flat": 320, "llama/mam": 80768,
    "gpt2/seq_bn": 1017, "gpt2/double_seq_bn": 7272, "gpt2/par_bn": 7128, "gpt2/prefix_flat": 1440, "gpt2/mam": 278456,
    "t5/seq_bn": 486, "t5/double_seq_bn": 3312, "t5/par_bn": 3216,
}

def _adapterhub_base(tmp: Path, name: str) -> Path:
    import transformers

    config_class, kwargs = ADAPTERHUB_BASES[name]
    getattr(transformers, config_class)(**kwargs).save_pretrained(tmp / name)
    return tmp / name


@pytest.mark.parametrize("key", list(ADAPTERHUB_COUNTS))
def test_bottleneck_and_mam_equal_recorded_adapterhub_counts(tmp_path, key):
    base_name, case = key.split("/")
    assert estimate_adapter(_adapterhub_base(tmp_path, base_name), **ADAPTERHUB_CASES[case][1]).params == ADAPTERHUB_COUNTS[key]


def test_bottleneck_formula_and_sites(tmp_path):
    folder = _adapterhub_base(tmp_path, "gpt2")  # hidden 48, 3 layers
    pfeiffer = estimate_adapter(folder, method="bottleneck")
    assert (pfeiffer.sites, pfeiffer.reduction_factor, pfeiffer.bottleneck_width, pfeiffer.num_layers) == (["ffn"], 16, 3, 3)
    assert pfeiffer.params == 3 * (2 * 48 * 3 + 3 + 48)
    both = estimate_adapter(folder, method="bottleneck", sites=["attention", "ffn"], reduction_factor=0.5)  # an up-projection
    assert both.bottleneck_width == 96 and both.params == 2 * 3 * (2 * 48 * 96 + 96 + 48)
    tiny = estimate_adapter(folder, method="bottleneck", reduction_factor=100)
    assert tiny.bottleneck_width == 1  # AdapterHub never goes below one unit


# ---- errors ----------------------------------------------------------------------------------------


def test_bad_requests_fail_with_one_line(bases):
    folder = bases["llama"][1]
    cases = [
        (dict(method="lora", num_virtual_tokens=3), "lora takes no num_virtual_tokens"),
        (dict(method="prefix", rank=4, num_virtual_tokens=3), "prefix takes no rank"),
        (dict(method="prompt"), "prompt needs num_virtual_tokens"),
        (dict(method="prefix", num_virtual_tokens=0), "num_virtual_tokens must be at least 1"),
        (dict(method="adalora", init_r=4, target_r=6), "target_r 6 must lie between 0 and init_r 4"),
        (dict(method="ia3", targets=["k_proj"], feedforward=["down_proj"]), "feedforward .* is not a subset of targets"),
        (dict(method="ia3", targets=["self_attn"], feedforward=[]), r"matches model.layers.0.self_attn \(LlamaAttention\); estimate sizes ia3"),
        (dict(method="bottleneck", variant="compacter"), "unknown bottleneck variant 'compacter'"),
        (dict(method="bottleneck", sites=["mlp"]), r"sites \['mlp'\] are not distinct names"),
        (dict(method="bottleneck", reduction_factor=0), "reduction_factor must be a positive"),
        (dict(method="ptuning", num_virtual_tokens=2, encoder_type="GRU"), "unknown P-tuning encoder 'GRU'"),
        (dict(method="ptuning", num_virtual_tokens=2, encoder_num_layers=3), "fixed depth"),
        (dict(method="vera"), "does not know method 'vera'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ZooError, match=message) as e:
            estimate_adapter(folder, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ZooError, match="mam estimates cover encoder-only and decoder-only"):
        estimate_adapter(bases["t5"][1], method="mam")


# ---- the CLI ---------------------------------------------------------------------------------------


def test_cli_estimate_every_method_as_json(zoo_cli, bases):
    folder = bases["gpt2"][1]
    runs = {
        "lora": ["--rank", "2"], "adalora": ["--init-r", "3", "--target-r", "1"], "ia3": [],
        "prefix": ["--num-virtual-tokens", "4", "--prefix-projection", "--encoder-hidden-size", "6"],
        "prompt": ["--num-virtual-tokens", "4"], "ptuning": ["--num-virtual-tokens", "4", "--encoder-type", "LSTM"],
        "bottleneck": ["--variant", "houlsby", "--sites", "ffn", "--reduction-factor", "8"], "mam": ["--no-prefix-projection"],
    }
    for method, args in runs.items():
        code, out, err = zoo_cli("estimate", "--base", folder, "--method", method, *args, "--json")
        assert code == 0, err
        report = json.loads(out)
        api = estimate_adapter(folder, **_api_args(method))
        assert report["method"] == method and report["params"] == api.params and report["training_params"] == api.training_params
    code, out, err = zoo_cli("estimate", "--base", folder, "--method", "bottleneck", "--sites", "ffn")
    assert code == 0 and "after the feed-forward block" in out
    code, _, err = zoo_cli("estimate", "--base", folder, "--method", "lora", "--num-virtual-tokens", "3")
    assert code == 2 and err.startswith("error: lora takes no num_virtual_tokens") and err.count("\n") == 1


def _api_args(method: str) -> dict:
    return {
        "lora": dict(method="lora", rank=2), "adalora": dict(method="adalora", init_r=3, target_r=1), "ia3": dict(method="ia3"),
        "prefix": dict(method="prefix", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=6),
        "prompt": dict(method="prompt", num_virtual_tokens=4), "ptuning": dict(method="ptuning", num_virtual_tokens=4, encoder_type="LSTM"),
        "bottleneck": dict(method="bottleneck", variant="houlsby", sites=["ffn"], reduction_factor=8),
        "mam": dict(method="mam", prefix_projection=False),
    }[method]
