"""Loss and metrics on hand-computed cases (SPEC sections 1 and 6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tmgg.task.metrics import (
    logit_metrics,
    masked_bce_with_logits,
    off_diagonal_mask,
    predict,
    prediction_metrics,
    reference_scores,
)

METRIC_NAMES = {"accuracy", "f1", "mse", "frobenius_error", "eigenvalue_error", "subspace_distance"}
PHI = (1 + math.sqrt(5)) / 2


def graph(n: int, edges: list[tuple[int, int]]) -> torch.Tensor:
    a = torch.zeros(n, n)
    for i, j in edges:
        a[i, j] = a[j, i] = 1.0
    return a


def as_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def assert_metrics(got: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    for name, value in expected.items():
        assert float(got[name]) == pytest.approx(value, abs=1e-5), name


def random_graphs(b: int, n: int, p: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    upper = (torch.rand(b, n, n, generator=gen) < p).float().triu(diagonal=1)
    return upper + upper.mT


def test_off_diagonal_mask() -> None:
    mask = off_diagonal_mask(3, "cpu")
    assert mask.dtype == torch.bool and mask.shape == (3, 3)
    assert torch.equal(mask, torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=torch.bool))


def test_one_wrong_edge_on_four_nodes() -> None:
    # A = path 0-1-2-3; P adds the edge {0, 3} (a 4-cycle): 2 of 12 off-diagonal entries wrong.
    a = graph(4, [(0, 1), (1, 2), (2, 3)])[None]
    p = graph(4, [(0, 1), (1, 2), (2, 3), (0, 3)])[None]
    got = prediction_metrics(p, a)
    assert set(got) == METRIC_NAMES
    for value in got.values():
        assert value.dim() == 0 and value.is_floating_point()
    # Spectra: P4 has ±φ, ±1/φ; C4 has 2, -2, 0, 0 (same order: positive first on ties).
    lam_a = torch.tensor([PHI, -PHI, 1 / PHI, -1 / PHI])
    lam_p = torch.tensor([2.0, -2.0, 0.0, 0.0])
    eig_err = float((lam_a - lam_p).norm() / lam_a.norm())  # sqrt((2(2-φ)² + 2/φ²) / 6)
    assert_metrics(
        got,
        {
            "accuracy": 10 / 12,
            "mse": 2 / 12,
            "f1": 2 * 3 / (2 * 3 + 1 + 0),  # 3 true positives, 1 false positive
            "frobenius_error": math.sqrt(2),
            "eigenvalue_error": eig_err,
            "subspace_distance": 0.0,  # k = 4 = n: both projectors are the identity
        },
    )
    assert eig_err == pytest.approx(0.41946, abs=1e-4)


def test_relabelled_path_has_same_spectrum_but_other_subspace() -> None:
    # A = path 0-1-2-3-4, P = path 0-1-2-4-3. Both spectra are ±√3, ±1, 0, so the
    # top-4 projector is I - u uᵀ with u the null vector: u = (1,0,-1,0,1)/√3 for A and
    # w = (1,0,-1,1,0)/√3 for P; u·w = 2/3 so the distance is sqrt(2 - 2 (2/3)²) = √10/3.
    a = graph(5, [(0, 1), (1, 2), (2, 3), (3, 4)])[None]
    p = graph(5, [(0, 1), (1, 2), (2, 4), (4, 3)])[None]
    assert_metrics(
        prediction_metrics(p, a),
        {
            "accuracy": 16 / 20,
            "mse": 4 / 20,
            "f1": 6 / 8,  # tp 3, fp 1, fn 1
            "frobenius_error": 2.0,
            "eigenvalue_error": 0.0,
            "subspace_distance": math.sqrt(10) / 3,
        },
    )


def test_perfect_prediction() -> None:
    a = random_graphs(6, 10, 0.3, seed=0)
    assert_metrics(
        prediction_metrics(a.clone(), a),
        {
            "accuracy": 1.0,
            "mse": 0.0,
            "f1": 1.0,
            "frobenius_error": 0.0,
            "eigenvalue_error": 0.0,
            "subspace_distance": 0.0,
        },
    )


def test_empty_prediction_against_a_graph() -> None:
    a = graph(6, [(0, 1), (1, 2), (0, 2), (3, 4)])[None]  # triangle + edge: 8 of 30 entries
    got = prediction_metrics(torch.zeros_like(a), a)
    assert_metrics(
        got,
        {
            "accuracy": 22 / 30,
            "mse": 8 / 30,
            "f1": 0.0,
            "frobenius_error": math.sqrt(8),
            "eigenvalue_error": 1.0,  # ‖λ_A - 0‖ / ‖λ_A‖
        },
    )
    assert float(got["subspace_distance"]) >= 0.0


def test_f1_edge_cases() -> None:
    empty = torch.zeros(2, 5, 5)
    one_edge = graph(5, [(1, 3)]).expand(2, 5, 5).clone()
    assert float(prediction_metrics(empty, empty)["f1"]) == 1.0  # nothing to find, none found
    assert float(prediction_metrics(one_edge, empty)["f1"]) == 0.0  # only predicted edges
    assert float(prediction_metrics(empty, one_edge)["f1"]) == 0.0  # only true edges


def test_pooling_over_the_batch_is_micro() -> None:
    # Graph 1: one edge, predicted exactly (F1 = 1). Graph 2: path with 3 edges, predicted
    # empty (F1 = 0). Micro F1 = 2·1 / (2·1 + 0 + 3) = 0.4, not the per-graph mean 0.5.
    a = torch.stack([graph(4, [(0, 1)]), graph(4, [(0, 1), (1, 2), (2, 3)])])
    p = torch.stack([graph(4, [(0, 1)]), torch.zeros(4, 4)])
    got = prediction_metrics(p, a)
    assert_metrics(
        got,
        {
            "f1": 0.4,
            "accuracy": (12 + 6) / 24,
            "mse": 6 / 24,
            "frobenius_error": (0 + math.sqrt(6)) / 2,
            "eigenvalue_error": 0.5,  # 0 for graph 1, 1 for graph 2
        },
    )


def test_diagonal_of_prediction_is_ignored() -> None:
    a = random_graphs(4, 8, 0.4, seed=1)
    p = random_graphs(4, 8, 0.4, seed=2)
    with_diag = p + torch.eye(8)
    assert as_floats(prediction_metrics(with_diag, a)) == pytest.approx(
        as_floats(prediction_metrics(p, a))
    )


def test_predict_thresholds_and_zeroes_diagonal() -> None:
    logits = torch.tensor([[[5.0, -1.0, 0.0], [2.0, 3.0, 0.5], [-2.0, 0.1, 7.0]]])
    expected = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])
    assert torch.equal(predict(logits), expected)
    assert predict(logits).dtype == torch.float32


def test_bce_matches_torch_on_off_diagonal_entries() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 7, 7, generator=gen)
    target = random_graphs(5, 7, 0.3, seed=4)
    mask = ~torch.eye(7, dtype=torch.bool)
    expected = F.binary_cross_entropy_with_logits(logits[:, mask], target[:, mask])
    got = masked_bce_with_logits(logits, target)
    assert got.dim() == 0
    torch.testing.assert_close(got, expected)
    # A wild diagonal must not change the loss.
    wild = logits + torch.diag(torch.full((7,), 100.0))
    torch.testing.assert_close(masked_bce_with_logits(wild, target), expected)


def test_bce_is_differentiable() -> None:
    logits = torch.randn(2, 4, 4, requires_grad=True)
    masked_bce_with_logits(logits, random_graphs(2, 4, 0.5, seed=5)).backward()
    assert logits.grad is not None
    assert bool((logits.grad.diagonal(dim1=-2, dim2=-1) == 0).all())


def test_logit_metrics_combines_loss_and_prediction_metrics() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 6, 6, generator=gen)
    target = random_graphs(3, 6, 0.3, seed=7)
    got = logit_metrics(logits, target)
    assert set(got) == METRIC_NAMES | {"loss"}
    torch.testing.assert_close(got["loss"], masked_bce_with_logits(logits, target))
    for name, value in prediction_metrics(predict(logits), target).items():
        torch.testing.assert_close(got[name], value)
    # A large positive diagonal in the logits changes nothing.
    wild = logits + torch.diag(torch.full((6,), 50.0))
    assert as_floats(logit_metrics(wild, target)) == pytest.approx(as_floats(got))


def test_reference_scores() -> None:
    clean = random_graphs(10, 9, 0.25, seed=8)
    flips = random_graphs(10, 9, 0.1, seed=9)
    noisy = (clean + flips) % 2 + torch.eye(9)  # self-loops in the noisy input are ignored
    refs = reference_scores(noisy, clean)
    assert set(refs) == {"no_edges", "noisy_input"}
    mask = ~torch.eye(9, dtype=torch.bool)
    non_edge_fraction = float((clean[:, mask] == 0).float().mean())
    assert float(refs["no_edges"]["accuracy"]) == pytest.approx(non_edge_fraction)
    assert float(refs["no_edges"]["f1"]) == 0.0
    assert float(refs["no_edges"]["eigenvalue_error"]) == pytest.approx(1.0)
    flip_fraction = float(flips[:, mask].mean())
    assert float(refs["noisy_input"]["mse"]) == pytest.approx(flip_fraction)
    assert float(refs["noisy_input"]["accuracy"]) == pytest.approx(1 - flip_fraction)


def test_distinct_graph_eigenpairs_equal_each_graphs_own_with_repeats_in_the_batch() -> None:
    from tmgg.task.metrics import SPECTRAL_K, distinct_graph_eigenpairs
    from tmgg.task.spectral import top_k_eigenpairs

    torch.manual_seed(0)
    graphs = (torch.rand(6, 12, 12) < 0.4).float()
    graphs = ((graphs + graphs.mT) > 0).float()
    graphs.diagonal(dim1=-2, dim2=-1).zero_()
    batch = torch.cat([graphs, graphs[[3, 0]], torch.zeros(2, 12, 12)])  # repeats
    vecs, vals = distinct_graph_eigenpairs(batch)
    alone = [top_k_eigenpairs(g, SPECTRAL_K) for g in batch]
    assert vecs.shape == (10, 12, SPECTRAL_K) and vals.shape == (10, SPECTRAL_K)
    for row, (v, lam) in enumerate(alone):  # bit for bit each graph's own pairs
        assert torch.equal(vecs[row], v[0]) and torch.equal(vals[row], lam[0])
    # Not 0/1: decomposed as given (the same numbers as top_k_eigenpairs).
    weighted = batch * 0.5
    assert torch.equal(distinct_graph_eigenpairs(weighted)[1],
                       top_k_eigenpairs(weighted, SPECTRAL_K)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_member_bce_gradient_is_autograds_bit_for_bit(dtype: torch.dtype) -> None:
    from tmgg.task.metrics import (
        member_bce_gradient,
        member_bce_with_logits,
        member_losses_finite,
    )

    torch.manual_seed(1)
    logits = (torch.randn(4, 8, 10, 10, dtype=dtype) * 30).requires_grad_(True)
    target = (torch.rand(8, 10, 10) < 0.3).float()
    diagonal = [False, True, False, True]
    losses = member_bce_with_logits(logits, target, diagonal)
    losses[[0, 1, 3]].sum().backward()  # member 2's loss is not trained
    rows = torch.tensor([1.0, 1.0, 0.0, 1.0])
    gradient = member_bce_gradient(logits.detach(), target, diagonal, rows)
    assert torch.equal(gradient, logits.grad)
    assert not gradient[2].any()
    # Finite logits: the bound says so; a NaN or infinite logit makes a member suspect.
    suspect = logits.detach().clone()
    suspect[1, 0, 0, 1], suspect[3, 2, 2, 2] = float("nan"), float("inf")
    assert member_losses_finite(suspect).tolist() == [True, False, True, False]
