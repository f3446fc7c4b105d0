"""`inspect_adapter` for every method: PEFT adapters made by peft (AdaLoRA, IA3, prefix, prompt,
P-tuning), and AdapterHub folders written with the key names its `adapters` library saves
(bottleneck adapters, prefixes, MAM); numbers are checked against the tensors themselves."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from tests.tiny import tiny_llama, token_ids
from zoo.errors import ZooError
from zoo.estimate import estimate_adapter
from zoo.inspect import inspect_adapter, render_inspect

EXAMPLES = Path(__file__).parent.parent / "examples"
FIXTURES = Path(__file__).parent / "fixtures" / "adapterhub"


def rendered(report) -> str:
    console = Console(record=True, width=200)
    render_inspect(report, console)
    return console.export_text()


# ---- PEFT adapters made by peft ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def save_peft(base, config, folder: Path) -> tuple[Path, int]:
    """Save a peft adapter for a copy of `base`; also return how many parameters peft trained."""
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters() if p.requires_grad)


def file_numel(folder: Path, name: str = "adapter_model.safetensors") -> int:
    return sum(t.numel() for t in load_file(folder / name).values())


def test_adalora_ranks_after_pruning_are_the_rank_pattern(llama, tmp_path):
    import peft

    targets = ["q_proj", "v_proj", "down_proj"]
    config = peft.AdaLoraConfig(init_r=6, target_r=2, total_step=6, tinit=1, tfinal=2, deltaT=1, target_modules=targets, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = peft.get_peft_model(copy.deepcopy(llama), config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(6):
        model(input_ids=token_ids(), labels=token_ids()).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.save_pretrained(tmp_path)

    report = inspect_adapter(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()}
    assert report.method == "adalora" and report.alpha == saved["lora_alpha"]
    assert {row.module: row.rank for row in report.modules} == kept
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for row in report.modules:
        a, b, e = (tensors[f"base_model.model.{row.module}.lora_{x}"] for x in "ABE")
        assert (row.rank, row.in_features, row.out_features) == (a.shape[0], a.shape[1], b.shape[0]) and e.shape == (row.rank, 1)
        assert row.params == a.numel() + b.numel() + e.numel()
    s = report.summary
    assert (s.init_r, s.target_r, s.total_rank, s.rank_budget) == (6, 2, sum(kept.values()), 2 * len(kept))
    assert s.total_rank == s.rank_budget and report.trainable_params == file_numel(tmp_path)
    assert not report.warnings and "total rank" in rendered(report)

    # without the config: lora_E tells AdaLoRA from LoRA
    bare = inspect_adapter(tmp_path / "adapter_model.safetensors")
    assert bare.method == "adalora" and bare.summary.total_rank == s.total_rank and bare.saved_modules == []


def test_adalora_before_pruning_says_so(llama, tmp_path):
    import peft

    folder, trained = save_peft(llama, peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]), tmp_path)
    report = inspect_adapter(folder)
    assert report.ranks == [4] and report.trainable_params == trained == file_numel(folder)
    assert report.summary.total_rank == 8 and report.summary.rank_budget == 4
    assert report.warnings == ["saved before rank pruning: every module still has init_r=4"]


@pytest.mark.parametrize("with_config", [True, False])
def test_ia3_inputs_and_outputs(llama, tmp_path, with_config):
    import peft

    folder, trained = save_peft(llama, peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                                                     feedforward_modules=["up_proj", "down_proj"]), tmp_path)
    report = inspect_adapter(folder if with_config else folder / "adapter_model.safetensors")
    assert report.method == "ia3" and report.trainable_params == trained == file_numel(folder)
    assert report.summary.scales_outputs == ["k_proj", "v_proj"] and report.summary.scales_inputs == ["down_proj", "up_proj"]
    hidden, inner, kv = 32, 64, 16  # tiny_llama: GQA with 2 of 4 heads for k and v
    sizes = {row.module.rsplit(".", 1)[-1]: (row.in_features, row.out_features) for row in report.modules}
    assert sizes == {"k_proj": (None, kv), "v_proj": (None, kv), "up_proj": (hidden, None), "down_proj": (inner, None)}
    assert report.ranks == [] and report.alpha is None
    text = rendered(report)
    assert "scales its input (feed-forward)" in text and "scales outputs" in text


def test_ia3_feedforward_from_the_config_wins_over_the_shape(tmp_path):
    """A conv IA3 vector (1, C, 1, 1) does not say which side it scales; the config does."""
    save_file({"base_model.model.conv.ia3_l": torch.ones(1, 8, 1, 1)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ZooError, match=r"conv: ia3_l \[1, 8, 1, 1\] does not say whether"):
        inspect_adapter(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "feedforward_modules": ["conv"]}))
    assert inspect_adapter(tmp_path).summary.scales_inputs == ["conv"]


def test_prompt_learning_methods(llama, tmp_path):
    import peft

    n = 5
    prefix, _ = save_peft(llama, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n), tmp_path / "prefix")
    projected, projected_trained = save_peft(
        llama, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=True, encoder_hidden_size=20),
        tmp_path / "projected")
    prompt, _ = save_peft(llama, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n), tmp_path / "prompt")
    ptuning, ptuning_trained = save_peft(llama, peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, encoder_hidden_size=20),
                                         tmp_path / "ptuning")

    r = inspect_adapter(prefix)
    assert r.method == "prefix" and r.trainable_params == file_numel(prefix) == n * 2 * 2 * 16
    assert (r.summary.num_virtual_tokens, r.summary.num_layers, r.summary.kv_width) == (n, 2, 16)  # 2 KV heads × 8
    assert r.summary.training_params is None
    r = inspect_adapter(projected)
    assert r.trainable_params == file_numel(projected) == n * 2 * 2 * 16  # the file holds the projection's output
    assert r.summary.training_params == projected_trained and "MLP (hidden 20)" in r.summary.reparameterization
    r = inspect_adapter(prompt)
    assert (r.method, r.summary.num_virtual_tokens, r.summary.token_dim, r.trainable_params) == ("prompt", n, 32, n * 32)
    r = inspect_adapter(ptuning)
    assert (r.method, r.trainable_params) == ("ptuning", n * 32) and r.summary.training_params == ptuning_trained
    assert r.summary.reparameterization == "MLP encoder (hidden 20) during training; the file holds its output"
    assert "virtual tokens" in rendered(r)

    # the tensor alone cannot tell them apart: inspect says so instead of guessing silently
    bare = inspect_adapter(prefix / "adapter_model.safetensors")
    assert bare.method == "prompt" and "does not tell prompt tuning, P-tuning and prefix tuning apart" in bare.warnings[0]


def test_prefix_config_and_tensor_must_agree(llama, tmp_path):
    import peft

    folder, _ = save_peft(llama, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    with pytest.raises(ZooError, match=r"prompt_embeddings is \[5, 64\], the config says \[5, 96\] \(5 tokens, 3 layers"):
        inspect_adapter(folder, config={**config, "num_layers": 3})


def test_chatglm_ptuning_v2_file_matches_the_estimate(tmp_path):
    """A P-tuning v2 prefix for ChatGLM-6B (128 tokens × 28 layers × 2 × 4096, fp16): 58.7 MB of
    tensor data, inspected from its header (the file is sparse: nothing is written or read)."""
    width = 28 * 2 * 4096
    header = json.dumps({"prompt_embeddings": {"dtype": "F16", "shape": [128, width], "data_offsets": [0, 128 * width * 2]}}).encode()
    with open(tmp_path / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 128 * width * 2)
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PREFIX_TUNING", "num_virtual_tokens": 128, "num_layers": 28, "token_dim": 4096, "num_attention_heads": 32}))
    report = inspect_adapter(tmp_path, base=EXAMPLES / "chatglm-6b")
    estimate = estimate_adapter(EXAMPLES / "chatglm-6b", method="prefix", num_virtual_tokens=128)
    assert report.trainable_params == estimate.params == 29_360_128
    assert report.total_bytes == estimate.bytes == 58_720_256
    assert (report.summary.num_virtual_tokens, report.summary.num_layers, report.summary.kv_width) == (128, 28, 4096)
    assert report.base_share == pytest.approx(estimate.base_share)
    assert "58.72 MB of tensors" in rendered(report)


# ---- AdapterHub folders, with the key names `adapters` saves ---------------------------------------


def bottleneck_config(**overrides) -> dict:
    """An AdapterHub bottleneck config as saved (SeqBnConfig's keys; no `architecture`)."""
    return {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu", "is_parallel": False,
            "ln_before": False, "ln_after": False, "use_gating": False, "scaling": 1.0, "phm_layer": False, **overrides}


def adapterhub_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict, hidden: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"config": config, "hidden_size": hidden, "model_class": "X", "model_name": "", "model_type": "x", "name": "a", "version": "adapters.1.3.0"}))
    return folder


def bottleneck(site: str, h: int, m: int, name: str = "a", ln_before: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one AdapterHub `Adapter`: optional LayerNorm (also adapter_down.0), Linear h→m, Linear m→h."""
    p = f"{site}.adapters.{name}"
    tensors = {f"{p}.adapter_up.weight": torch.zeros(h, m), f"{p}.adapter_up.bias": torch.zeros(h)}
    down = 1 if ln_before else 0
    tensors |= {f"{p}.adapter_down.{down}.weight": torch.zeros(m, h), f"{p}.adapter_down.{down}.bias": torch.zeros(m)}
    if ln_before:  # registered twice, so saved twice
        for where in ("adapter_norm_before", "adapter_down.0"):
            tensors |= {f"{p}.{where}.weight": torch.ones(h), f"{p}.{where}.bias": torch.zeros(h)}
    return tensors


@pytest.mark.parametrize(
    ("sites", "config", "expected_sites", "role"),
    [
        (["encoder.layer.{i}.output"], bottleneck_config(), ["ffn"], "after the FFN"),  # BERT, Pfeiffer
        (["encoder.layer.{i}.attention.output", "encoder.layer.{i}.output"], bottleneck_config(mh_adapter=True), ["attention", "ffn"], None),
        (["model.layers.{i}.attention_adapters", "model.layers.{i}.output_adapters"], bottleneck_config(mh_adapter=True), ["attention", "ffn"], None),
        (["transformer.h.{i}.output_adapters"], bottleneck_config(is_parallel=True, reduction_factor=2), ["ffn"], "beside the FFN"),
        (["encoder.block.{i}.layer.0", "encoder.block.{i}.layer.1", "decoder.block.{i}.layer.0", "decoder.block.{i}.layer.1",
          "decoder.block.{i}.layer.2"], bottleneck_config(mh_adapter=True, cross_adapter=True), ["attention", "cross-attention", "ffn"], None),
        (["model.decoder.layers.{i}.attention_adapters", "model.decoder.layers.{i}.cross_attention_adapters",
          "model.decoder.layers.{i}.output_adapters"], bottleneck_config(mh_adapter=True, cross_adapter=True), ["attention", "cross-attention", "ffn"], None),
    ],
    ids=["bert-pfeiffer", "bert-houlsby", "llama-houlsby", "gpt2-parallel", "t5-with-cross", "bart-with-cross"],
)
def test_adapterhub_bottleneck_sites(tmp_path, sites, config, expected_sites, role):
    h, m, layers = 32, 32 // int(config["reduction_factor"]), 2
    tensors = {k: v for i in range(layers) for site in sites for k, v in bottleneck(site.format(i=i), h, m).items()}
    report = inspect_adapter(adapterhub_folder(tmp_path, tensors, config))
    assert report.method == "bottleneck" and report.trainable_params == sum(t.numel() for t in tensors.values())
    assert report.trainable_params == len(sites) * layers * (2 * h * m + m + h)
    s = report.summary
    assert (s.sites, s.bottleneck_widths, s.reduction_factors, s.hidden_size) == (expected_sites, [m], [h / m], h)
    assert s.parallel is config["is_parallel"] and report.ranks == [m]
    assert len(report.modules) == len(sites) * layers and all((r.rank, r.in_features, r.out_features) == (m, h, h) for r in report.modules)
    if role:
        assert {r.role for r in report.modules} == {role}
    # the same tensors without the config: recognised from the names alone
    assert inspect_adapter(tmp_path / "adapter.safetensors").summary.sites == expected_sites


def test_adapterhub_layer_norm_saved_twice_counts_once(tmp_path):
    tensors = bottleneck("encoder.layer.0.output", 32, 4, ln_before=True) | {"encoder.layer.0.output.adapters.a.scaling": torch.ones(32)}
    report = inspect_adapter(adapterhub_folder(tmp_path, tensors, bottleneck_config(ln_before=True, scaling="channel", reduction_factor=8)))
    assert report.trainable_params == 32 + 2 * 32 + (32 * 4 + 4) + (4 * 32 + 32)  # scaling, one LayerNorm, down, up
    assert report.ranks == [4] and report.saved_modules == []


def prefix_pool(holder: str, n: int, h: int, width: int, bottleneck_size: int | None, location: str = "self_prefix") -> dict[str, torch.Tensor]:
    """An AdapterHub PrefixTuning under `holder`: wte + control_trans MLP, or flat control_trans."""
    p = f"{holder}.prefix_tunings.a.{location}".lstrip(".")
    if bottleneck_size is None:
        return {f"{p}.control_trans": torch.zeros(n * width)}
    return {f"{p}.wte.weight": torch.zeros(n, h), f"{p}.control_trans.0.weight": torch.zeros(bottleneck_size, h),
            f"{p}.control_trans.0.bias": torch.zeros(bottleneck_size), f"{p}.control_trans.2.weight": torch.zeros(width, bottleneck_size),
            f"{p}.control_trans.2.bias": torch.zeros(width)}


PREFIX_CONFIG = {"architecture": "prefix_tuning", "prefix_length": 5, "bottleneck_size": 24, "flat": False, "cross_prefix": True,
                 "encoder_prefix": True, "leave_out": [], "non_linearity": "tanh", "dropout": 0.0, "use_gating": False, "shared_gating": True}


def test_adapterhub_prefix_with_per_layer_copies(tmp_path):
    """Llama with GQA (KV width 16 of hidden 32): the pool's copies under each of the 3 layers give the
    layer count, so the KV width follows; the copies count once."""
    n, h, layers, kv, e = 5, 32, 3, 16, 24
    one = prefix_pool("model.prefix_tuning", n, h, layers * 2 * kv, e)
    tensors = dict(one)
    for i in range(layers):
        tensors |= prefix_pool(f"model.layers.{i}.self_attn.prefix_tuning.pool", n, h, layers * 2 * kv, e)
    report = inspect_adapter(adapterhub_folder(tmp_path, tensors, PREFIX_CONFIG))
    unique = sum(t.numel() for t in one.values())
    assert report.method == "prefix" and report.trainable_params == unique == n * h + (h * e + e) + (e * layers * 2 * kv + layers * 2 * kv)
    assert (report.summary.num_virtual_tokens, report.summary.num_layers, report.summary.kv_width) == (n, layers, kv)
    assert [m.module for m in report.modules] == ["model.prefix_tuning.prefix_tunings.a.self_prefix"]
    assert any(f"{layers * unique:,} parameters are copies" in w for w in report.warnings)
    assert "MLP (hidden 24)" in report.summary.reparameterization


def test_adapterhub_flat_prefix_without_copies_assumes_the_hidden_width(tmp_path):
    n, h, layers = 5, 32, 2
    tensors = prefix_pool("prefix_tuning", n, h, layers * 2 * h, None)
    report = inspect_adapter(adapterhub_folder(tmp_path, tensors, {**PREFIX_CONFIG, "flat": True}))
    assert report.trainable_params == n * layers * 2 * h
    assert (report.summary.num_virtual_tokens, report.summary.num_layers, report.summary.kv_width) == (n, layers, h)
    assert any("assuming the KV width equals hidden_size 32" in w for w in report.warnings)


def test_adapterhub_mam(tmp_path):
    n, h, layers, m = 30, 32, 2, 16
    tensors = prefix_pool("prefix_tuning", n, h, layers * 2 * h, 800)
    for i in range(layers):
        tensors |= prefix_pool(f"encoder.layer.{i}.attention.self.prefix_tuning.pool", n, h, layers * 2 * h, 800)
        tensors |= bottleneck(f"encoder.layer.{i}.output", h, m)
    config = {"architecture": "union", "configs": [{**PREFIX_CONFIG, "prefix_length": n, "bottleneck_size": 800},
                                                   bottleneck_config(is_parallel=True, reduction_factor=2, scaling=4.0)]}
    report = inspect_adapter(adapterhub_folder(tmp_path, tensors, config))
    prefix_params = n * h + (h * 800 + 800) + (800 * layers * 2 * h + layers * 2 * h)
    assert report.method == "mam" and report.trainable_params == prefix_params + layers * (2 * h * m + m + h)
    s = report.summary
    assert (s.num_virtual_tokens, s.num_layers, s.kv_width, s.sites, s.bottleneck_widths, s.parallel) == (n, layers, h, ["ffn"], [m], True)
    assert inspect_adapter(tmp_path / "adapter.safetensors").method == "mam"  # from the names alone
    text = rendered(report)
    assert "beside the FFN" in text and "self_prefix: 30 tokens × 2 layers × 2 × 32 (MLP)" in text


#: Folders AdapterHub saved (tests/fixtures/adapterhub/<base>/adapters/<name>) → the same adapter asked of
#: estimate; None where estimate has no such setting (LayerNorms, gates, learned scalings, a per-layer
#: reduction factor, AdapterHub's MLP prefix outside MAM).
FIXTURE_ESTIMATES = {
    "seq": ("bottleneck", {}), "seq2": ("bottleneck", {}), "dbl": ("bottleneck", {"variant": "houlsby"}),
    "par": ("bottleneck", {"variant": "parallel"}), "flat": ("prefix", {"num_virtual_tokens": 3}),
    "mam": ("mam", {"num_virtual_tokens": 4, "encoder_hidden_size": 16, "reduction_factor": 4}),
    "learned": ("bottleneck", None), "custom": ("bottleneck", None), "prefix": ("prefix", None),
    "noln": ("bottleneck", None), "postadd": ("bottleneck", None),  # other wiring options than estimate models
}


@pytest.mark.parametrize("base_name", ["bert", "gpt2", "llama"])
def test_real_adapterhub_folders(tmp_path, base_name):
    """What AdapterHub itself saved: inspect counts each parameter once (its pickles hold shared tensors
    under several names), and estimate gives the same number from the base's config.json."""
    folders = sorted(p.parent for p in (FIXTURES / base_name / "adapters").glob("*/adapter_config.json"))
    assert {f.name for f in folders} <= set(FIXTURE_ESTIMATES) and {"seq", "dbl", "par", "mam"} <= {f.name for f in folders}
    for folder in folders:
        if (folder / "adapter.safetensors").is_file():
            state = load_file(folder / "adapter.safetensors")
        else:  # a pickle (AdapterHub cannot write shared tensors as safetensors): every name, as a converter would keep them
            state = torch.load(folder / "pytorch_adapter.bin", weights_only=True)
            unique = {t.untyped_storage().data_ptr(): t for t in state.values()}
            folder = adapterhub_copy(folder, {k: v.clone() for k, v in state.items()}, tmp_path / folder.name)
            state = unique
        report = inspect_adapter(folder)
        real = sum(t.numel() for t in state.values())
        assert report.trainable_params == real and report.saved_params == 0, folder
        method, options = FIXTURE_ESTIMATES[folder.name]
        assert report.method == method, folder
        if options is not None:
            assert estimate_adapter(FIXTURES / base_name / "base", method=method, **options).params == real, folder


def adapterhub_copy(source: Path, tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "adapter.safetensors")
    (folder / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    return folder


# ---- errors ---------------------------------------------------------------------------------------


def test_inconsistent_files_fail_with_one_line(tmp_path):
    cases = [
        ({"m.q.lora_A": torch.zeros(4, 8), "m.q.lora_B": torch.zeros(8, 4), "m.q.lora_E": torch.zeros(3, 1)}, None,
         r"m\.q: lora_A \[4, 8\] with lora_E \[3, 1\]"),
        ({"m.q.lora_A": torch.zeros(4, 8), "m.q.lora_B": torch.zeros(8, 4), "m.k.lora_A": torch.zeros(4, 8), "m.k.lora_B": torch.zeros(8, 4),
          "m.k.lora_E": torch.zeros(4, 1)}, None, r"m\.q: lora_A \[4, 8\] with no lora_E"),
        (bottleneck("layers.0.output_adapters", 32, 2) | bottleneck("layers.1.output_adapters", 32, 2, name="b"), None,
         r"bottleneck adapters \['a', 'b'\]"),
        ({"x.adapters.a.adapter_down.0.weight": torch.zeros(2, 32), "x.adapters.a.adapter_up.weight": torch.zeros(32, 4)}, None,
         r"bottleneck at x: adapter_down.0.weight \[2, 32\], adapter_up.weight \[32, 4\] do not form h→m→h"),
        ({"x.lora_A.weight": torch.zeros(2, 4)}, {"config": {"architecture": "lora"}}, "does not know AdapterHub architecture lora"),
        ({"x.lora_A.weight": torch.zeros(2, 4)}, {"peft_type": "VERA"}, "does not know method 'vera'"),
        ({"prompt_embeddings": torch.zeros(2, 4)}, {"peft_type": "LORA"}, "the config says 'lora' but the file holds no lora tensors"),
    ]
    for i, (tensors, config, message) in enumerate(cases):
        save_file(tensors, tmp_path / f"{i}.safetensors")
        with pytest.raises(ZooError, match=message) as e:
            inspect_adapter(tmp_path / f"{i}.safetensors", config=config)
        assert "\n" not in str(e.value)


def test_adapterhub_pickle_only_folder_is_explained(tmp_path):
    (tmp_path / "pytorch_adapter.bin").write_bytes(b"\x80\x02")
    with pytest.raises(ZooError, match="has pytorch_adapter.bin, a pickle.*use_safetensors=True"):
        inspect_adapter(tmp_path)


# ---- the CLI --------------------------------------------------------------------------------------


def test_cli_inspect_adapterhub_and_peft_folders(zoo_cli, llama, tmp_path):
    import peft

    tensors = {k: v for i in range(2) for k, v in bottleneck(f"encoder.layer.{i}.output", 32, 2).items()}
    folder = adapterhub_folder(tmp_path / "ah", tensors, bottleneck_config())
    code, out, err = zoo_cli("inspect", folder, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["method"] == "bottleneck" and report["summary"]["sites"] == ["ffn"] and report["summary"]["reduction_factors"] == [16.0]
    assert report["trainable_params"] == 2 * (2 * 32 * 2 + 2 + 32)
    code, out, _ = zoo_cli("inspect", folder)
    assert code == 0 and "after the FFN" in out and "reduction factors" in out

    prefix, _ = save_peft(llama, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path / "prefix")
    code, out, _ = zoo_cli("inspect", prefix, "--json")
    assert code == 0 and json.loads(out)["summary"]["num_layers"] == 2 and json.loads(out)["summary"]["kv_width"] == 16
