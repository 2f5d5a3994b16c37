"""Spectral front end and the three denoising models (SPEC section 4)."""

from __future__ import annotations

import pytest
import torch

from tmgg.task.metrics import masked_bce_with_logits
from tmgg.task.models import MODELS, FilterBank, LinearPE, SelfAttention, build_model
from tmgg.task.spectral import top_k_eigenpairs

MODEL_NAMES = ["linear_pe", "filter_bank", "self_attention"]
PARAM_COUNTS = {
    ("linear_pe", 8): 264,
    ("linear_pe", 16): 456,
    ("filter_bank", 8): 320,
    ("filter_bank", 16): 1280,
    ("self_attention", 8): 1024,
    ("self_attention", 16): 2048,
}


def random_graphs(b: int, n: int, p: float = 0.3, seed: int = 0) -> torch.Tensor:
    """Random symmetric 0/1 graphs with zero diagonal."""
    gen = torch.Generator().manual_seed(seed)
    upper = (torch.rand(b, n, n, generator=gen) < p).float().triu(diagonal=1)
    return upper + upper.mT


def path_graph(n: int) -> torch.Tensor:
    a = torch.zeros(n, n)
    idx = torch.arange(n - 1)
    a[idx, idx + 1] = 1.0
    a[idx + 1, idx] = 1.0
    return a


# --------------------------------------------------------------------------- front end


def test_diagonal_ordering_keeps_sign() -> None:
    vecs, vals = top_k_eigenpairs(torch.diag(torch.tensor([3.0, -5.0, 1.0])), 3)
    assert vals.shape == (1, 3) and vecs.shape == (1, 3, 3)
    torch.testing.assert_close(vals[0], torch.tensor([-5.0, 3.0, 1.0]))
    # Eigenvectors are the matching unit vectors, with positive sign.
    torch.testing.assert_close(vecs[0], torch.eye(3)[:, [1, 0, 2]])


def test_unbatched_input_is_returned_batched() -> None:
    a = random_graphs(1, 6)[0]
    vecs, vals = top_k_eigenpairs(a, 3)
    assert vecs.shape == (1, 6, 3) and vals.shape == (1, 3)


def test_bipartite_pairs_are_signed_and_positive_first() -> None:
    # Path P5: eigenvalues 2cos(pi j / 6) = ±sqrt(3), ±1, 0.
    vals = top_k_eigenpairs(path_graph(5), 5)[1][0]
    s3 = 3**0.5
    torch.testing.assert_close(vals, torch.tensor([s3, -s3, 1.0, -1.0, 0.0]), atol=1e-5, rtol=0)
    # Star K_{1,4}: eigenvalues ±2 and 0 (x3); ordering by |λ|, positive first on a tie.
    star = torch.zeros(5, 5)
    star[0, 1:] = 1.0
    star[1:, 0] = 1.0
    vals = top_k_eigenpairs(star, 2)[1][0]
    torch.testing.assert_close(vals, torch.tensor([2.0, -2.0]), atol=1e-5, rtol=0)


def test_order_is_by_decreasing_absolute_value() -> None:
    vals = top_k_eigenpairs(random_graphs(16, 12, seed=3), 12)[1]
    mags = vals.abs()
    assert bool((mags[:, :-1] >= mags[:, 1:] - 1e-4).all())
    assert bool((vals < 0).any()), "negative eigenvalues must keep their sign"


def test_sign_rule_first_significant_entry_positive() -> None:
    a = random_graphs(8, 10, seed=1)
    a[:, 0, :] = 0.0  # node 0 isolated: its entry is ~0 in most eigenvectors
    a[:, :, 0] = 0.0
    vecs = top_k_eigenpairs(a, 10)[0]
    significant = vecs.abs() > 1e-10
    first = significant.to(torch.uint8).argmax(dim=1, keepdim=True)
    pivots = vecs.gather(1, first)
    assert bool((pivots > 0).all())


def test_reconstruction_when_k_equals_n() -> None:
    a = random_graphs(5, 9, seed=2)
    vecs, vals = top_k_eigenpairs(a, 9)
    recon = vecs @ torch.diag_embed(vals) @ vecs.mT
    torch.testing.assert_close(recon, a, atol=1e-5, rtol=0)


def test_input_is_symmetrised() -> None:
    a = torch.rand(3, 6, 6)
    vecs, vals = top_k_eigenpairs(a, 6)
    torch.testing.assert_close(
        vecs @ torch.diag_embed(vals) @ vecs.mT, (a + a.mT) / 2, atol=1e-5, rtol=0
    )


def test_padding_when_k_exceeds_n() -> None:
    a = random_graphs(3, 5, p=0.6, seed=4)
    vecs, vals = top_k_eigenpairs(a, 8)
    assert vecs.shape == (3, 5, 8) and vals.shape == (3, 8)
    assert bool((vecs[..., 5:] == 0).all()) and bool((vals[:, 5:] == 0).all())
    ref_vecs, ref_vals = top_k_eigenpairs(a, 5)
    torch.testing.assert_close(vecs[..., :5], ref_vecs)
    torch.testing.assert_close(vals[:, :5], ref_vals)


def test_batched_matches_per_graph() -> None:
    a = random_graphs(6, 11, seed=5)
    vecs, vals = top_k_eigenpairs(a, 4)
    for i in range(6):
        v_i, l_i = top_k_eigenpairs(a[i], 4)
        torch.testing.assert_close(vecs[i], v_i[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(vals[i], l_i[0], atol=1e-5, rtol=0)


def test_integer_input_and_bad_arguments() -> None:
    vals = top_k_eigenpairs(path_graph(3).long(), 1)[1]
    assert vals.dtype == torch.float32
    with pytest.raises(ValueError):
        top_k_eigenpairs(torch.zeros(3, 3), 0)
    with pytest.raises(ValueError):
        top_k_eigenpairs(torch.zeros(2, 3, 4), 2)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("k", [8, 16])
def test_parameter_counts(name: str, k: int) -> None:
    model = build_model(name, k=k)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[(name, k)]


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(
    ("b", "n", "k"), [(4, 20, 8), (3, 20, 16), (2, 5, 8), (1, 7, 1), (5, 3, 4)]
)
def test_output_shape_and_symmetry(name: str, b: int, n: int, k: int) -> None:
    model = build_model(name, k=k)
    logits = model(random_graphs(b, n, seed=n + k))
    assert logits.shape == (b, n, n)
    assert bool(torch.isfinite(logits).all())
    assert torch.equal(logits, logits.mT)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_different_sizes_in_successive_calls(name: str) -> None:
    model = build_model(name, k=8)
    for n in (20, 6, 50, 3):
        assert model(random_graphs(2, n, seed=n)).shape == (2, n, n)
    assert model(random_graphs(1, 9)[0]).shape == (9, 9)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, k=8)
    if isinstance(model, LinearPE):
        with torch.no_grad():
            model.b.normal_()  # non-zero bias so its gradient is not trivially symmetric
    clean = random_graphs(4, 12, seed=7)
    noisy = random_graphs(4, 12, seed=8)
    loss = masked_bce_with_logits(model(noisy), clean)
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert bool(torch.isfinite(param.grad).all()), pname
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(grads.abs().sum()) > 0
    if isinstance(model, LinearPE):
        assert float(model.b.grad[:12].abs().sum()) > 0
        assert bool((model.b.grad[12:] == 0).all())


def test_linear_pe_formula_and_bias() -> None:
    model = LinearPE(k=4, max_nodes=10)
    with torch.no_grad():
        model.b.copy_(torch.arange(10.0))
    a = random_graphs(2, 6, seed=9)
    vecs, _ = top_k_eigenpairs(a, 4)
    w = (model.W + model.W.T) / 2
    expected = vecs @ w @ vecs.mT + torch.arange(6.0)[:, None] + torch.arange(6.0)[None, :]
    torch.testing.assert_close(model(a), expected.detach(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_nodes"):
        model(random_graphs(1, 11))


def test_filter_bank_formula() -> None:
    model = FilterBank(k=3, degree=3)
    a = random_graphs(2, 6, p=0.5, seed=10)
    vecs, vals = top_k_eigenpairs(a, 3)
    out = model(a)
    for i in range(2):
        lam = vals[i] / vals[i].abs().max()
        w = sum(torch.diag(lam**ell) @ model.H[ell] for ell in range(3))
        logits = vecs[i] @ w @ vecs[i].T
        torch.testing.assert_close(out[i], ((logits + logits.T) / 2).detach(), atol=1e-5, rtol=0)
    # All-zero spectrum: the 1e-6 floor avoids 0/0, and only H^(0) contributes.
    assert bool(torch.isfinite(model(torch.zeros(1, 4, 4))).all())


def test_self_attention_formula() -> None:
    model = SelfAttention(k=4, d_k=16)
    a = random_graphs(2, 7, seed=11)
    vecs, _ = top_k_eigenpairs(a, 4)
    logits = (vecs @ model.W_Q) @ (vecs @ model.W_K).mT / 4.0
    torch.testing.assert_close(model(a), ((logits + logits.mT) / 2).detach(), atol=1e-5, rtol=0)


def test_registry_and_unknown_model() -> None:
    expected = {"linear_pe": LinearPE, "filter_bank": FilterBank, "self_attention": SelfAttention}
    assert expected == MODELS
    assert isinstance(build_model("filter_bank", k=4, degree=2), FilterBank)
    assert build_model("self_attention", k=2, d_k=8).W_Q.shape == (2, 8)
    with pytest.raises(ValueError, match="gnn") as info:
        build_model("gnn", k=8)
    for known in MODEL_NAMES:
        assert known in str(info.value)
