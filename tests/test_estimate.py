"""`estimate_adapter` and `matches_target` against the public ChatGLM-6B figures and peft as the oracle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from compose.errors import CompositionError
from compose.targets import matches_target
from zoo.errors import ZooError
from zoo.estimate import DEFAULT_LORA_TARGETS, estimate_adapter, render_estimate
from zoo.units import human_bytes

CHATGLM = Path(__file__).parent.parent / "examples" / "chatglm-6b"


# ---- ChatGLM-6B (remote code, sized from zoo-architecture.json) ------------------------------


def test_chatglm_r8_query_key_value_matches_the_public_numbers():
    report = estimate_adapter(CHATGLM, rank=8)  # default target for chatglm: query_key_value
    assert report.targets == ["query_key_value"] and report.source == "architecture description"
    assert [(r.kind, r.in_features, r.out_features, r.count) for r in report.rows] == [("attention.query_key_value", 4096, 12288, 28)]
    assert report.params == 28 * (8 * 4096 + 12288 * 8) == 3_670_016
    assert report.bytes == 7_340_032 and human_bytes(report.bytes) == "7.34 MB" and report.mb == 7.34
    assert report.mib == 7.0
    # The public training log printed all params 6,176,960,513 with 3,674,113 trainable (LoRA + a
    # 4,097-parameter value head), so the base itself has 6,173,286,400.
    assert report.base_params == 6_176_960_513 - 3_674_113
    assert estimate_adapter(CHATGLM / "config.json", rank=8, dtype="fp32").mb == 14.68


def test_chatglm_all_linear_and_rendering():
    report = estimate_adapter(CHATGLM, rank=8, targets="all-linear")
    assert {r.kind: r.params for r in report.rows} == {
        "attention.query_key_value": 28 * 8 * (4096 + 12288),
        "attention.dense": 28 * 8 * (4096 + 4096),
        "mlp.dense_h_to_4h": 28 * 8 * (4096 + 16384),
        "mlp.dense_4h_to_h": 28 * 8 * (16384 + 4096),
    }
    console = Console(record=True, width=140)
    render_estimate(estimate_adapter(CHATGLM), console)
    text = console.export_text()
    assert "3,670,016" in text and "7.34 MB" in text and "attention.query_key_value" in text


def test_remote_code_without_description_says_how_to_write_one(tmp_path):
    shutil.copy(CHATGLM / "config.json", tmp_path / "config.json")
    with pytest.raises(ZooError) as e:
        estimate_adapter(tmp_path)
    message = str(e.value)
    assert "needs remote code" in message and "zoo-architecture.json" in message and "docs/sizes.md" in message
    assert "\n" not in message


def _description(tmp_path: Path, config: dict, blocks: list) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "zoo-architecture.json").write_text(json.dumps({"format": "zoo-architecture/1", "blocks": blocks}))
    return tmp_path


def test_description_expressions(tmp_path):
    config = {"model_type": "toy", "d": 10, "n": 3}
    block = {"path": "layers.{i}", "repeat": "n", "linear": {"a": {"in": "d", "out": "(d + 2) // 4 * 3 - 1", "bias": True}, "b": {"in": 7, "out": "d"}},
             "params": {"norm": "2 * d"}}
    folder = _description(tmp_path, config, [block, {"path": "", "params": {"embed": "100 * d"}}])
    report = estimate_adapter(folder, rank=2, targets=["a", "b"])
    assert {(r.kind, r.in_features, r.out_features, r.count) for r in report.rows} == {("a", 10, 8, 3), ("b", 7, 10, 3)}
    assert report.params == 3 * 2 * (10 + 8) + 3 * 2 * (7 + 10)
    assert report.base_params == 3 * (10 * 8 + 8 + 7 * 10 + 2 * 10) + 100 * 10
    assert estimate_adapter(folder, rank=2, targets=r"layers\.0\.a").params == 2 * (10 + 8)


@pytest.mark.parametrize(
    ("out", "problem"),
    [
        ("d ** 2", "unsupported syntax"),
        ("d / 2", "unsupported syntax"),
        ("__import__('os').getcwd()", "unsupported syntax"),
        ("d.real", "unsupported syntax"),
        ("missing * 2", "'missing' is missing"),
        ("name * 2", "'name' is 'x', not an integer"),
        ("2 - d", "negative value -8"),
        ("d // 0", "division by zero"),
        ("d +", "syntax error"),
    ],
)
def test_description_rejects_anything_but_integer_arithmetic(tmp_path, out, problem):
    folder = _description(tmp_path, {"d": 10, "name": "x"}, [{"path": "m", "linear": {"a": {"in": "d", "out": out}}}])
    with pytest.raises(ZooError, match="zoo-architecture.json block 0") as e:
        estimate_adapter(folder, targets=["a"])
    assert problem in str(e.value)


def test_description_structure_errors(tmp_path):
    folder = _description(tmp_path, {"n": 2}, [{"path": "layers", "repeat": "n", "linear": {"a": {"in": 1, "out": 1}}}])
    with pytest.raises(ZooError, match="repeats 2 times but its path has no"):
        estimate_adapter(folder, targets=["a"])
    folder = _description(tmp_path, {}, [{"path": "m", "linear": {"a": {"in": 1, "out": 1, "bais": True}}}])
    with pytest.raises(ZooError, match="bais"):
        estimate_adapter(folder, targets=["a"])


# ---- models transformers knows: peft is the oracle ----------------------------------------------


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=96, architectures=["LlamaForCausalLM"])


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=96, bos_token_id=0,
                                       eos_token_id=0, architectures=["GPT2LMHeadModel"])


def _bert():  # no `architectures`: estimate falls back to AutoModel → BertModel
    from transformers import BertConfig, BertModel

    return BertModel, BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=96)


def _bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification, BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                                     vocab_size=96, num_labels=3, architectures=["BertForSequenceClassification"])


@pytest.mark.parametrize(
    ("factory", "targets", "task_type"),
    [
        (_llama, None, None),
        (_llama, ["q_proj", "k_proj", "o_proj", "gate_proj"], None),
        (_llama, r".*layers\.1\..*(up|down)_proj", None),
        (_llama, "all-linear", None),
        (_gpt2, None, None),  # c_attn is a Conv1D
        (_gpt2, ["c_attn", "c_proj", "c_fc"], None),
        (_gpt2, "all-linear", None),
        (_bert, None, None),
        (_bert, ["dense"], None),
        (_bert, "all-linear", None),
        (_bert_classifier, "all-linear", "SEQ_CLS"),  # PEFT leaves the classifier out with SEQ_CLS
    ],
)
def test_estimate_equals_peft_lora_param_count(tmp_path, factory, targets, task_type):
    from peft import LoraConfig, get_peft_model

    model_class, config = factory()
    config.save_pretrained(tmp_path)
    model = model_class(config)
    base_params = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=3, target_modules=targets, task_type=task_type))
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)

    report = estimate_adapter(tmp_path, rank=3, targets=targets, dtype="fp32")
    assert report.source == "transformers meta model"
    assert report.params == lora_params > 0
    assert report.bytes == 4 * lora_params
    assert report.base_params == base_params
    assert sum(r.count for r in report.rows) == sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A"))


def test_gpt2_conv1d_shapes_are_read_as_in_out(tmp_path):
    _, config = _gpt2()
    config.save_pretrained(tmp_path)
    report = estimate_adapter(tmp_path, rank=2, targets=["c_attn", "c_fc"])
    assert {(r.kind, r.in_features, r.out_features, r.count) for r in report.rows} == {("attn.c_attn", 32, 96, 2), ("mlp.c_fc", 32, 128, 2)}


def test_bad_requests_fail_with_one_line(tmp_path):
    _, config = _llama()
    config.save_pretrained(tmp_path)
    with pytest.raises(ZooError, match="match no linear layer.*self_attn.q_proj"):
        estimate_adapter(tmp_path, targets=["nothing"])
    with pytest.raises(ZooError, match=r"matches model.layers.0.self_attn \(LlamaAttention\)"):
        estimate_adapter(tmp_path, targets=["self_attn"])  # peft refuses such a target too
    with pytest.raises(ZooError, match="unknown dtype 'int4'"):
        estimate_adapter(tmp_path, dtype="int4")
    with pytest.raises(ZooError, match="does not know method .vera."):
        estimate_adapter(tmp_path, method="vera")
    with pytest.raises(ZooError, match="no such config file"):
        estimate_adapter(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()), "model_type": "bert2000"}))
    with pytest.raises(ZooError, match="'bert2000' is unknown to transformers"):
        estimate_adapter(tmp_path)


def test_default_targets_are_peft_defaults():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    for model_type, targets in DEFAULT_LORA_TARGETS.items():
        assert targets == peft_defaults[model_type], model_type


# ---- matches_target: PEFT's check_target_module_exists is the oracle ---------------------------

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.10.self_attn.v_proj", "q_proj", "model.layers.0.mlp.xq_proj",
         "transformer.h.0.attn.c_attn", "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.output.dense"]
TARGETS = [["q_proj"], ["v_proj", "query"], ["self_attn.q_proj"], ["attn.c_attn", "dense"], ["proj"], [],
           r".*\.0\..*proj", r"q_proj", r".*(query|value)", r"layers\.1"]


@pytest.mark.parametrize("targets", TARGETS, ids=str)
def test_matches_target_agrees_with_peft(targets):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=targets)
    for name in NAMES:
        assert matches_target(name, targets) == bool(check_target_module_exists(config, name)), name


def test_all_linear_must_be_expanded_by_the_caller():
    with pytest.raises(CompositionError, match="all-linear"):
        matches_target("model.layers.0.q_proj", "all-linear")
