"""Edge-flip noise and noise-level validation (SPEC section 3)."""

from __future__ import annotations

import math

import pytest
import torch

from tmgg.task.data import block_adjacency
from tmgg.task.noise import edge_flip, validate_levels


def _clean_batch(batch: int = 8) -> torch.Tensor:
    return block_adjacency([5, 7, 8]).expand(batch, -1, -1).clone()


def _off_diagonal(n: int) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3, 0.5, 1.0])
def test_result_is_a_graph(eps: float) -> None:
    clean = _clean_batch()
    noisy = edge_flip(clean, eps, _gen())
    assert noisy.dtype == clean.dtype and noisy.shape == clean.shape
    assert torch.equal(noisy, noisy.transpose(1, 2))
    assert torch.all(noisy.diagonal(dim1=1, dim2=2) == 0)
    assert set(noisy.unique().tolist()) <= {0.0, 1.0}


def test_eps_zero_is_identity_and_one_complements() -> None:
    clean = _clean_batch()
    assert torch.equal(edge_flip(clean, 0.0, _gen()), clean)
    flipped = edge_flip(clean, 1.0, _gen())
    mask = _off_diagonal(clean.shape[-1])
    assert torch.equal(flipped[:, mask], 1 - clean[:, mask])
    assert torch.all(flipped.diagonal(dim1=1, dim2=2) == 0)


def test_empirical_flip_rate_matches_eps() -> None:
    batch, n, eps = 2000, 20, 0.1
    clean = (torch.rand(batch, n, n, generator=_gen(1)) < 0.5).float()
    clean = torch.triu(clean, 1)
    clean = clean + clean.transpose(1, 2)
    noisy = edge_flip(clean, eps, _gen(2))
    pairs = batch * n * (n - 1) // 2
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    rate = (noisy != clean)[:, upper].float().mean().item()
    std = math.sqrt(eps * (1 - eps) / pairs)  # ~4.9e-4
    assert abs(rate - eps) < 5 * std


def test_per_graph_eps_tensor() -> None:
    n = 30
    clean = torch.zeros(3, n, n)
    noisy = edge_flip(clean, torch.tensor([0.0, 1.0, 0.5]), _gen())
    mask = _off_diagonal(n)
    assert noisy[0].sum() == 0
    assert torch.all(noisy[1][mask] == 1)
    rate = noisy[2][mask].mean().item()
    assert 0.4 < rate < 0.6
    assert torch.equal(noisy, noisy.transpose(1, 2))


def test_generator_determinism_and_dtypes() -> None:
    clean = _clean_batch()
    a = edge_flip(clean, 0.2, _gen(7))
    b = edge_flip(clean, 0.2, _gen(7))
    c = edge_flip(clean, 0.2, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for dtype in (torch.float64, torch.bool, torch.uint8):
        out = edge_flip(clean.to(dtype), 0.2, _gen(7))
        assert out.dtype == dtype
        assert torch.equal(out.to(torch.float32), a)


def test_bad_eps_rejected() -> None:
    clean = _clean_batch(2)
    with pytest.raises(ValueError, match="1.5"):
        edge_flip(clean, 1.5)
    with pytest.raises(ValueError, match="shape"):
        edge_flip(clean, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="B, n, n"):
        edge_flip(clean[0], 0.1)


def test_validate_levels() -> None:
    assert validate_levels([0.01, 0.05, 0.1, 0.2, 0.3]) == [0.01, 0.05, 0.1, 0.2, 0.3]
    assert validate_levels((0, 1)) == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"1\.5 is outside \[0, 1\]"):
        validate_levels([0.1, 1.5])
    with pytest.raises(ValueError, match=r"-0\.1"):
        validate_levels([-0.1])
    with pytest.raises(ValueError, match=r"\[\]"):
        validate_levels([])
    with pytest.raises(ValueError, match="'0.1'"):
        validate_levels(["0.1"])
    with pytest.raises(ValueError, match="True"):
        validate_levels([True])
    with pytest.raises(ValueError):
        validate_levels("0.1")
    with pytest.raises(ValueError, match="nan"):
        validate_levels([float("nan")])
