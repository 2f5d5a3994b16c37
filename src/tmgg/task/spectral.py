"""Spectral front end shared by every denoising model and by the spectral metrics.

Keeping the eigen-decomposition, ordering, sign convention and padding in one place
means models and metrics agree on what "the top-k eigenpairs" of a graph are.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SIGN_TOLERANCE", "select_top_k", "symmetric_eigh", "top_k_eigenpairs"]

#: Entries with |v| at or below this are skipped when choosing an eigenvector's sign.
SIGN_TOLERANCE = 1e-10


def top_k_eigenpairs(adjacency: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Return the k eigenpairs of largest |λ| of each (symmetrised) graph.

    Args:
        adjacency: (B, n, n) or (n, n) matrices; an (n, n) input is treated as B = 1.
        k: number of eigenpairs to keep (>= 1). If k > n, V gets zero columns and
            Λ zero entries up to k, so models work for any graph size.

    Returns:
        V of shape (B, n, k) and Λ of shape (B, k), ordered by decreasing |λ| with
        eigenvalues keeping their sign; magnitudes equal to within sqrt(eps) relative
        (e.g. the ±λ pairs of bipartite graphs) put the positive eigenvalue first.
        Each eigenvector is flipped so that its first entry with |v| > 1e-10 is positive,
        which makes V a deterministic function of A (up to rotations inside degenerate
        eigenspaces).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    evals, evecs = symmetric_eigh(adjacency)
    return select_top_k(evals, evecs, k)


def symmetric_eigh(adjacency: Tensor) -> tuple[Tensor, Tensor]:
    """Ascending eigenvalues (B, n) and eigenvectors (B, n, n) of the symmetrised graphs.

    The expensive half of :func:`top_k_eigenpairs`, split out so that jobs trained on
    one batch (a fused group) decompose it once and select each k from the result.
    """
    a = adjacency.unsqueeze(0) if adjacency.dim() == 2 else adjacency
    if a.dim() != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"expected (B, n, n) or (n, n) input, got shape {tuple(adjacency.shape)}")
    if a.dtype not in (torch.float32, torch.float64):
        # eigh has no half/bfloat16/integer kernels.
        a = a.to(torch.float32)
    sym = torch.add(a, a.mT).mul_(0.5)
    return torch.linalg.eigh(sym)  # ascending eigenvalues


def select_top_k(evals: Tensor, evecs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k eigenpairs of largest |λ| from :func:`symmetric_eigh`'s output (see
    :func:`top_k_eigenpairs` for the order, sign and padding conventions)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = evals.shape[-1]
    m = min(k, n)
    # Rank by |λ|, but let +λ win over -λ when the two are equal up to round-off: a
    # bipartite graph has exact ±λ pairs, and without a tie-break their order (and which
    # one survives the cut at k) would depend on eigensolver noise.
    absval = evals.abs()
    tol = math.sqrt(torch.finfo(evals.dtype).eps)
    scale = absval.amax(dim=-1, keepdim=True).clamp_min_(1.0).mul_(tol)
    key = torch.addcmul(absval, (evals > 0).to(evals.dtype), scale)
    # One topk both selects and orders (descending); no second sort needed.
    idx = key.topk(m, dim=-1, sorted=True).indices  # (B, m)
    lam = evals.gather(-1, idx)
    vec = evecs.gather(-1, idx.unsqueeze(-2).expand(-1, n, -1))  # (B, n, m)

    # Sign fix: max(dim) returns the first maximal index, i.e. the first |v| > tol row
    # (bool max is ~4x faster than argmax on a converted mask).
    first = vec.abs().gt_(SIGN_TOLERANCE).max(dim=-2, keepdim=True).indices  # (B, 1, m)
    negative = vec.gather(-2, first) < 0  # (B, 1, m); all-zero columns stay unflipped
    vec = torch.where(negative, -vec, vec)

    if k > n:
        vec = torch.nn.functional.pad(vec, (0, k - n))
        lam = torch.nn.functional.pad(lam, (0, k - n))
    return vec, lam
