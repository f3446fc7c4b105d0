"""Weighted LoRA combinations against PEFT's `add_weighted_adapter` and against the math written out.

PEFT combines adapters already loaded on a model; we compare our per-module (A, B) with the new
adapter's tensors: exactly for the factor methods and `cat`, as products B·A (SVD signs are arbitrary)
within 1e-5 relative for the `*svd` methods. DARE: PEFT draws its masks with `torch.bernoulli` from the
global RNG, which its own adapter init also consumes, so during PEFT's call `torch.bernoulli` is pointed
at a private generator; ours gets an identically seeded one, so equal tensors also prove the same draw order.
"""

from __future__ import annotations

import contextlib
import itertools

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compose.errors import CompositionError
from compose.lora.weighted import LoraFactors, clamp_factors, combine

pytestmark = pytest.mark.filterwarnings("ignore")

TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]  # square, (24, 48), and (48, 96) modules
ADAPTERS = {  # name: (r, alpha, rsLoRA)
    "a": (8, 16, False),
    "b": (8, 4, True),
    "c": (4, 8, False),
}
RTOL = 1e-5
_names = itertools.count()


def tiny_llama() -> torch.nn.Module:
    """2-layer Llama, hidden 48, GQA (4 heads, 2 KV heads → k_proj/v_proj are 48 → 24)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    """The tiny Llama with PEFT adapters a, b (rsLoRA), c (rank 4); random A and B (init_lora_weights=False)."""
    torch.manual_seed(1)
    model = None
    for name, (r, alpha, rslora) in ADAPTERS.items():
        config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=TARGETS, init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model


def lora_layers(model) -> list[tuple[str, torch.nn.Module]]:
    """PEFT's LoRA layers in `named_modules` order (the order PEFT combines them in)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def factors_of(model, adapters: list[str]) -> dict[str, list[LoraFactors]]:
    return {
        n: [LoraFactors(m.lora_A[a].weight.detach(), m.lora_B[a].weight.detach(), m.scaling[a]) for a in adapters]
        for n, m in lora_layers(model)
    }


@contextlib.contextmanager
def bernoulli_seeded(seed: int):
    """Route `torch.bernoulli` (PEFT's DARE masks) through a private generator seeded with `seed`."""
    original, g = torch.bernoulli, torch.Generator().manual_seed(seed)
    torch.bernoulli = lambda input, *args, generator=None, **kwargs: original(input, generator=g)
    try:
        yield
    finally:
        torch.bernoulli = original


def peft_combined(model, adapters, weights, method, **kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's add_weighted_adapter result per module as (A, B); DARE masks drawn from seed 0."""
    name = f"combined{next(_names)}"
    with bernoulli_seeded(0):
        model.add_weighted_adapter(adapters, weights, name, combination_type=method, **kwargs)
    out = {n: (m.lora_A[name].weight.detach().clone(), m.lora_B[name].weight.detach().clone()) for n, m in lora_layers(model)}
    model.delete_adapter(name)
    return out


def ours_combined(model, adapters, weights, method, **kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our combine per module, modules in PEFT's order, one generator seeded 0 across them."""
    g = torch.Generator().manual_seed(0)
    return {n: combine(fs, weights, method, generator=g, **kwargs) for n, fs in factors_of(model, adapters).items()}


def true_sum(fs: list[LoraFactors], weights: list[float]) -> torch.Tensor:
    """Σ wᵢ·sᵢ·Bᵢ·Aᵢ in fp64."""
    return sum(w * f.scaling * f.B.double() @ f.A.double() for f, w in zip(fs, weights))


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize(
    "method, adapters, weights, kwargs",
    [
        ("cat", ["a", "b", "c"], [0.7, -1.3, 0.5], {}),
        ("linear", ["a", "b"], [0.7, -1.3], {}),
        ("ties", ["a", "b"], [0.7, -1.3], {"density": 0.5}),
        ("ties", ["a", "b"], [0.7, 1.3], {"density": 0.3, "majority_sign_method": "frequency"}),
        ("magnitude_prune", ["a", "b"], [-0.7, 1.3], {"density": 0.4}),
        ("dare_linear", ["a", "b"], [0.7, -1.3], {"density": 0.5}),
        ("dare_ties", ["a", "b"], [0.7, -1.3], {"density": 0.6}),
        ("dare_ties", ["a", "b"], [0.7, 1.3], {"density": 0.6, "majority_sign_method": "frequency"}),
    ],
)
def test_factor_methods_equal_peft_exactly(model, method, adapters, weights, kwargs):
    ref = peft_combined(model, adapters, weights, method, **kwargs)
    ours = ours_combined(model, adapters, weights, method, **kwargs)
    assert ours.keys() == ref.keys() and len(ref) == 2 * len(TARGETS)
    for name, (A, B) in ref.items():
        assert A.abs().sum() > 0 and B.abs().sum() > 0
        assert torch.equal(ours[name][0], A), f"{name} A"
        assert torch.equal(ours[name][1], B), f"{name} B"


def test_dare_masks_depend_on_the_generator(model):
    """Guards the DARE comparison above: another seed gives other tensors, so equality there is no accident."""
    fs = factors_of(model, ["a", "b"])["base_model.model.model.layers.0.self_attn.q_proj"]
    A0, _ = combine(fs, [0.7, -1.3], "dare_linear", density=0.5, generator=torch.Generator().manual_seed(0))
    A1, _ = combine(fs, [0.7, -1.3], "dare_linear", density=0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(A0, A1)


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("svd", {}),
        ("ties_svd", {"density": 0.5}),
        ("ties_svd", {"density": 0.5, "majority_sign_method": "frequency"}),
        ("dare_linear_svd", {"density": 0.5}),
        ("dare_ties_svd", {"density": 0.7}),
        ("magnitude_prune_svd", {"density": 0.3}),
    ],
)
@pytest.mark.parametrize("rank", [5, 16])
def test_svd_methods_match_peft_products(model, method, kwargs, rank):
    """B·A vs PEFT's within 1e-5. Truncating at a near-tie σ_k ≈ σ_k+1 is ill-conditioned in fp32 for both
    (at rank 6 one module has σ₆ − σ₇ = 0.8% of σ₁ and PEFT itself lands 1.4e-5 from the fp64 truncation,
    ours 4e-6), so the ranks here avoid ties; `test_svd_is_the_dense_truncated_svd` covers accuracy."""
    adapters, weights = ["a", "b", "c"], [0.7, -1.3, 0.5]
    ref = peft_combined(model, adapters, weights, method, svd_rank=rank, **kwargs)
    ours = ours_combined(model, adapters, weights, method, rank=rank, **kwargs)
    for name, (A, B) in ref.items():
        assert ours[name][0].shape == A.shape and ours[name][1].shape == B.shape
        assert rel(ours[name][1] @ ours[name][0], B @ A) < RTOL, name


@pytest.mark.parametrize("rank", [3, 8, 20, 24])
def test_svd_is_the_dense_truncated_svd(model, rank):
    """QR path vs the fp64 SVD of the dense sum: same product; A = Vh and B = U·diag(S) up to component signs."""
    weights = [0.7, -1.3, 0.5]  # Σr = 20, so rank 24 pads
    for name, fs in factors_of(model, ["a", "b", "c"]).items():
        A, B = combine(fs, weights, "svd", rank=rank)
        U, S, Vh = torch.linalg.svd(true_sum(fs, weights), full_matrices=False)
        k = min(rank, 20)
        dense = (U[:, :k] * S[:k]) @ Vh[:k]
        assert rel(B @ A, dense) < RTOL, name
        sign = torch.sign((A[:k].double() * Vh[:k]).sum(1, keepdim=True))  # ±1 per component
        torch.testing.assert_close(A[:k].double(), sign * Vh[:k], atol=1e-4, rtol=0)
        torch.testing.assert_close(B[:, :k].double(), sign.T * U[:, :k] * S[:k], atol=1e-4 * S[0].item(), rtol=0)
        assert (A[k:] == 0).all() and (B[:, k:] == 0).all()


def test_linear_has_cross_terms(model):
    """PEFT's `linear` is B·A of separately summed factors: exact for one adapter, not for two (ours does the same)."""
    two = peft_combined(model, ["a", "b"], [0.7, -1.3], "linear")
    one = peft_combined(model, ["b"], [-1.3], "linear")
    ours_two = ours_combined(model, ["a", "b"], [0.7, -1.3], "linear")
    ours_one = ours_combined(model, ["b"], [-1.3], "linear")
    for name, fs in factors_of(model, ["a", "b"]).items():
        assert torch.equal(ours_two[name][0], two[name][0]) and torch.equal(ours_two[name][1], two[name][1])
        assert torch.equal(ours_one[name][0], one[name][0]) and torch.equal(ours_one[name][1], one[name][1])
        A, B = ours_two[name]
        assert rel(B @ A, true_sum(fs, [0.7, -1.3])) > 0.1, name
        A, B = ours_one[name]
        assert rel(B @ A, true_sum(fs[1:], [-1.3])) < 1e-6, name


def test_clamp_is_peft_svd_clamp(model):
    adapters, weights = ["a", "b", "c"], [0.7, -1.3, 0.5]
    plain = peft_combined(model, adapters, weights, "svd", svd_rank=6)
    clamped = peft_combined(model, adapters, weights, "svd", svd_rank=6, svd_clamp=0.9)
    for name, (A, B) in plain.items():
        cA, cB = clamp_factors(A, B, 0.9)
        assert not torch.equal(cA, A) or not torch.equal(cB, B), "the clamp clipped nothing"
        assert torch.equal(cA, clamped[name][0]) and torch.equal(cB, clamped[name][1]), name
    fs = factors_of(model, adapters)["base_model.model.model.layers.1.mlp.down_proj"]
    A, B = combine(fs, weights, "svd", rank=6)
    cA, cB = combine(fs, weights, "svd", rank=6, clamp=0.9)
    wA, wB = clamp_factors(A, B, 0.9)
    assert torch.equal(cA, wA) and torch.equal(cB, wB)


@st.composite
def adapter_sets(draw):
    out, inp = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    n = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    fs = []
    for _ in range(n):
        r = draw(st.integers(1, 6))
        fs.append(LoraFactors(torch.randn(r, inp, generator=g, dtype=torch.float64),
                              torch.randn(out, r, generator=g, dtype=torch.float64),
                              draw(st.floats(0.05, 4.0))))
    weights = draw(st.lists(st.floats(-3, 3, allow_subnormal=False), min_size=n, max_size=n))
    return fs, weights


@settings(max_examples=40, deadline=None)
@given(adapter_sets(), st.integers(0, 4))
def test_cat_and_full_rank_svd_reproduce_the_weighted_sum(case, extra):
    fs, weights = case
    total = true_sum(fs, weights)
    atol = 1e-10 * (1 + sum(abs(w * f.scaling) * f.B.norm() * f.A.norm() for f, w in zip(fs, weights)))
    A, B = combine(fs, weights, "cat")
    assert torch.equal(B, torch.cat([f.B for f in fs], dim=1))
    assert torch.equal(A, torch.cat([f.A * w * f.scaling for f, w in zip(fs, weights)]))
    torch.testing.assert_close(B @ A, total, atol=atol, rtol=0)
    rank = sum(f.A.shape[0] for f in fs) + extra
    A, B = combine(fs, weights, "svd", rank=rank)
    assert A.shape == (rank, fs[0].A.shape[1]) and B.shape == (fs[0].B.shape[0], rank)
    torch.testing.assert_close(B @ A, total, atol=atol, rtol=0)


def test_svd_never_builds_the_dense_delta():
    """200k × 200k modules: a dense fp32 delta would need 160 GB; the QR path needs a few MB."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    fs = [LoraFactors(torch.randn(r, n, generator=g), torch.randn(n, r, generator=g), 0.5) for r in (2, 3)]
    A, B = combine(fs, [1.0, -2.0], "svd", rank=5)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    want = sum(w * f.scaling * (f.B.double() @ (f.A.double() @ x)) for f, w in zip(fs, [1.0, -2.0]))
    assert rel(B.double() @ (A.double() @ x), want) < RTOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", ["cat", "linear", "svd", "ties_svd"])
def test_dtype_is_kept_and_compute_is_fp32_or_better(dtype, method):
    g = torch.Generator().manual_seed(0)
    fs32 = [LoraFactors(torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g), s) for s in (2.0, 0.5)]
    fs = [LoraFactors(f.A.to(dtype), f.B.to(dtype), f.scaling) for f in fs32]
    kwargs = {"rank": 5} if "svd" in method else {}
    kwargs |= {"density": 0.5} if method == "ties_svd" else {}
    A, B = combine(fs, [0.8, -0.6], method, **kwargs)
    assert A.dtype == B.dtype == dtype
    # the same combination of the (rounded) inputs, done in fp64: only the output rounding differs
    fs64 = [LoraFactors(f.A.double(), f.B.double(), f.scaling) for f in fs]
    A64, B64 = combine(fs64, [0.8, -0.6], method, **kwargs)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}[dtype]
    assert rel(B.double() @ A.double(), B64 @ A64) < tol


def _fs(*shapes):
    return [LoraFactors(torch.ones(r, i), torch.ones(o, r), 1.0) for o, r, i in shapes]


@pytest.mark.parametrize(
    "factors, weights, method, kwargs, message",
    [
        (_fs((8, 2, 6), (8, 2, 7)), [1, 1], "cat", {}, r"\(8, 6\), \(8, 7\)"),
        (_fs((8, 2, 6), (8, 3, 6)), [1, 1], "linear", {}, r"equal ranks, found \[2, 3\]"),
        (_fs((8, 2, 6)), [1], "average", {}, r"unknown .*'average'.*cat, linear, .*magnitude_prune_svd"),
        (_fs((8, 2, 6)), [1], "svd", {}, r"'svd' needs a positive rank"),
        (_fs((8, 2, 6)), [1], "ties", {}, r"'ties' needs a density"),
        (_fs((8, 2, 6)), [1], "dare_linear_svd", {"rank": 2, "density": 0.0}, r"density in \(0, 1\]"),
        (_fs((8, 2, 6)), [1], "linear", {"rank": 2}, r"only to the svd methods"),
        (_fs((8, 2, 6)), [1], "svd", {"rank": 2, "density": 0.5}, r"density applies only"),
        (_fs((8, 2, 6)), [1, 2], "cat", {}, r"1 adapters and 2 weights"),
        (_fs((8, 2, 6)), [1], "ties", {"density": 0.5, "majority_sign_method": "max"}, r"'total' or 'frequency'"),
        ([LoraFactors(torch.ones(2, 6), torch.ones(8, 3), 1.0)], [1], "cat", {}, r"A \(2, 6\) and B \(8, 3\)"),
    ],
)
def test_errors_name_the_problem(factors, weights, method, kwargs, message):
    with pytest.raises(CompositionError, match=message):
        combine(factors, weights, method, **kwargs)

