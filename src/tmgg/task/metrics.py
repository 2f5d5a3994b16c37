"""Loss and evaluation metrics for edge denoising (SPEC sections 1 and 6).

Everything is computed on off-diagonal entries only (the clean graphs have no
self-loops, so the diagonal carries no information), pooled over the batch, and
vectorised over graphs so evaluation stays cheap next to training.

``diagonal=True`` is the earlier system's variant (issue 14): the loss and every
metric take all n x n entries. The prediction P = (L > 0) still has a zero diagonal
(no self-loops are predicted), while the target keeps its own diagonal, so on graphs
with self-loops every diagonal entry counts as a missed edge, for the model and for
the "no edges" and "noisy input" references alike (the references are predictions
too: their diagonal is zeroed as well).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tmgg.task.spectral import top_k_eigenpairs

__all__ = [
    "SPECTRAL_K",
    "distinct_graph_eigenpairs",
    "edge_accuracy",
    "logit_metrics",
    "masked_bce_with_logits",
    "member_bce_gradient",
    "member_bce_with_logits",
    "member_losses_finite",
    "off_diagonal_mask",
    "predict",
    "prediction_metrics",
    "reference_scores",
]

#: Number of largest-|λ| eigenpairs compared by the spectral metrics.
SPECTRAL_K = 4


def off_diagonal_mask(n: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean (n, n) mask that is True off the diagonal: the entries that are scored."""
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _zero_diagonal(x: Tensor) -> Tensor:
    """Copy of x with a zero diagonal, so self-loops never influence a metric."""
    out = x.clone()
    out.diagonal(dim1=-2, dim2=-1).zero_()
    return out


def masked_bce_with_logits(logits: Tensor, target: Tensor, diagonal: bool = False) -> Tensor:
    """Mean BCE-with-logits over the off-diagonal entries of every graph in the batch
    (``diagonal``: over all n x n entries, the raw diagonal logits included).

    A 0/1 weight instead of boolean-mask indexing: the same mean without gathering a
    copy of both tensors, about a tenth of a stage-1 training step.
    """
    if diagonal:
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
    n = logits.shape[-1]
    weight = off_diagonal_mask(n, logits.device).to(logits.dtype)
    total = F.binary_cross_entropy_with_logits(
        logits, target.to(logits.dtype), weight=weight, reduction="sum"
    )
    return total / (logits.numel() // n * (n - 1))


def _member_weights(logits: Tensor, diagonal: Sequence[bool] | bool) -> tuple[Tensor, Tensor]:
    """Per-entry 0/1 weights (broadcast to (M, B, n, n)) and each model's divisor, the
    number of entries its loss averages over, for M stacked models' logits."""
    m, n = logits.shape[0], logits.shape[-1]
    flags = [bool(diagonal)] * m if isinstance(diagonal, bool) else [bool(d) for d in diagonal]
    if len(flags) != m:
        raise ValueError(f"diagonal: {len(flags)} flags for {m} models")
    off = off_diagonal_mask(n, logits.device).to(logits.dtype)
    if not any(flags):
        weight, entries = off, torch.full((m,), float(n * (n - 1)), dtype=logits.dtype)
    else:
        on = torch.tensor(flags, device=logits.device)
        weight = torch.where(on[:, None, None, None], torch.ones_like(off), off)
        entries = torch.where(on, float(n * n), float(n * (n - 1))).to(logits.dtype)
    graphs = logits[0].numel() // (n * n)
    return weight, entries.to(logits.device) * graphs


def member_bce_with_logits(logits: Tensor, target: Tensor,
                           diagonal: Sequence[bool] | bool = False) -> Tensor:
    """``masked_bce_with_logits`` of each of M models at once: logits (M, B, n, n), the
    shared target (B, n, n); one loss per model (M,), summed in a different order only.
    ``diagonal``: per model (or for all), whether its loss takes all n x n entries.
    """
    weight, divisor = _member_weights(logits, diagonal)
    per_entry = F.binary_cross_entropy_with_logits(
        logits, target.to(logits.dtype).expand_as(logits), weight=weight, reduction="none")
    return per_entry.flatten(1).sum(1) / divisor


def member_bce_gradient(logits: Tensor, target: Tensor, diagonal: Sequence[bool] | bool,
                        rows: Tensor) -> Tensor:
    """d(Σ_m rows[m] · loss_m)/d(logits) of ``member_bce_with_logits``, in closed form.

    Bit for bit what autograd returns (the same float operations in the same order:
    σ(L) − A, times the divisor's reciprocal, times the weight), without the loss's
    log-sigmoid: a fused group needs the gradient every step and the loss only when
    it is logged, and the log-sigmoid is most of the cost of the BCE. ``rows`` (M,)
    is 1 for a model whose loss is trained, 0 for one whose row is dropped.
    """
    weight, divisor = _member_weights(logits, diagonal)
    scale = rows.to(logits.dtype) / divisor  # what DivBackward hands on: grad / divisor
    return (logits.sigmoid() - target.to(logits.dtype)).mul_(scale[:, None, None, None]) \
        .mul_(weight)


def member_losses_finite(logits: Tensor) -> Tensor:
    """(M,) True where ``member_bce_with_logits`` is surely finite, without computing it.

    Each entry's BCE is at most |L| + log 2, so a model's mean cannot overflow while
    every |L| stays below max / (2 · entries); a NaN or infinite logit makes it False.
    False means "compute the loss and see", not "the loss is infinite".
    """
    bound = torch.finfo(logits.dtype).max / (2 * logits[0].numel())
    rows = logits.detach().flatten(1)  # max and min: two reads, no |L| copy; NaN is False
    return (rows.amax(1) < bound) & (rows.amin(1) > -bound)


def predict(logits: Tensor) -> Tensor:
    """Binary prediction P = (L > 0) as float, diagonal 0 (no self-loops are predicted)."""
    pred = (logits > 0).to(logits.dtype if logits.is_floating_point() else torch.float32)
    pred.diagonal(dim1=-2, dim2=-1).zero_()
    return pred


def _scored_target(target: Tensor, diagonal: bool) -> Tensor:
    """The target as the metrics see it: float, its diagonal zeroed unless it is scored."""
    a = target.to(target.dtype if target.is_floating_point() else torch.float32)
    return a if diagonal else _zero_diagonal(a)


def target_eigenpairs(target: Tensor, diagonal: bool = False) -> tuple[Tensor, Tensor]:
    """The clean graphs' top-k eigenpairs that ``prediction_metrics`` compares with.

    Computed once, they serve every model scored against the same clean graphs (the
    members of a fused group); the numbers are those computed inside each call.
    """
    return top_k_eigenpairs(_scored_target(target, diagonal), SPECTRAL_K)


def _spectral_errors(pred: Tensor, target: Tensor,
                     target_pairs: tuple[Tensor, Tensor] | None = None,
                     pred_pairs: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Per-graph relative eigenvalue error and top-k projector distance (both (B,))."""
    vecs_a, vals_a = target_pairs or top_k_eigenpairs(target, SPECTRAL_K)
    vecs_p, vals_p = pred_pairs or top_k_eigenpairs(pred, SPECTRAL_K)
    eig_err = torch.linalg.vector_norm(vals_a - vals_p, dim=-1) / torch.linalg.vector_norm(
        vals_a, dim=-1
    ).clamp_min(1e-12)
    # Projectors are invariant to sign and to rotations within the kept subspace.
    proj_diff = vecs_a @ vecs_a.mT - vecs_p @ vecs_p.mT
    sub_dist = torch.linalg.matrix_norm(proj_diff, ord="fro")
    return eig_err, sub_dist


def prediction_metrics(pred: Tensor, target: Tensor,
                       target_pairs: tuple[Tensor, Tensor] | None = None,
                       diagonal: bool = False,
                       pred_pairs: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """Score binary predictions P against clean graphs A, both (B, n, n), off-diagonal only.

    accuracy, f1 and mse are pooled over all off-diagonal entries of the batch;
    frobenius_error, eigenvalue_error and subspace_distance are per graph, averaged.
    F1 is 1 when neither side has an edge (nothing to find, nothing wrongly found).
    ``diagonal``: all n x n entries are scored, P with its diagonal zeroed and A as
    it is (the spectral metrics then compare with A's own spectrum, self-loops
    included). ``target_pairs`` / ``pred_pairs``: the top-k eigenpairs of A and of P
    (P's diagonal zeroed) when the caller has them (``distinct_graph_eigenpairs``).
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(
            f"pred and target must both be (B, n, n); got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}"
        )
    dtype = pred.dtype if pred.is_floating_point() else torch.float32
    p = _zero_diagonal(pred.to(dtype))
    a = _scored_target(target.to(dtype), diagonal)
    if diagonal:
        p_off, a_off = p.flatten(-2), a.flatten(-2)  # (B, n*n): every entry is scored
    else:
        mask = off_diagonal_mask(p.shape[-1], p.device)
        p_off = p[..., mask]  # (B, n(n-1))
        a_off = a[..., mask]
    p_edge = p_off > 0.5
    a_edge = a_off > 0.5

    accuracy = (p_edge == a_edge).to(dtype).mean()
    mse = (p_off - a_off).square().mean()

    tp = (p_edge & a_edge).sum()
    fp = (p_edge & ~a_edge).sum()
    fn = (~p_edge & a_edge).sum()
    denom = (2 * tp + fp + fn).to(dtype)
    f1 = torch.where(denom > 0, 2 * tp.to(dtype) / denom.clamp_min(1), torch.ones_like(denom))

    # Diagonals are zero unless scored, so the full norm is the scored entries' one.
    frobenius = torch.linalg.matrix_norm(a - p, ord="fro").mean()

    eig_err, sub_dist = _spectral_errors(p, a, target_pairs, pred_pairs)
    return {
        "accuracy": accuracy,
        "f1": f1,
        "mse": mse,
        "frobenius_error": frobenius,
        "eigenvalue_error": eig_err.mean(),
        "subspace_distance": sub_dist.mean(),
    }


def logit_metrics(logits: Tensor, target: Tensor,
                  target_pairs: tuple[Tensor, Tensor] | None = None,
                  diagonal: bool = False, loss_diagonal: bool | None = None,
                  pred_pairs: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """BCE loss plus every prediction metric of P = predict(logits).

    ``diagonal`` scores all n x n entries; ``loss_diagonal`` (default: ``diagonal``)
    says whether the reported loss takes the diagonal too, as the training loss does.
    """
    return {
        "loss": masked_bce_with_logits(
            logits, target, diagonal if loss_diagonal is None else loss_diagonal),
        **prediction_metrics(predict(logits), target, target_pairs, diagonal, pred_pairs),
    }


def distinct_graph_eigenpairs(graphs: Tensor, k: int = SPECTRAL_K) -> tuple[Tensor, Tensor]:
    """``top_k_eigenpairs`` of (N, n, n) graphs, each distinct 0/1 graph decomposed once.

    A fused group scores every member's predictions on one evaluation batch, and many
    members predict the same graph (about half of stage 1's at the end of training):
    one eigendecomposition per distinct graph serves them all, with the very numbers
    each would get alone (eigh decomposes each matrix of a batch on its own). Graphs
    that are not exactly 0/1, or not on the CPU, are decomposed as they are.
    """
    if graphs.device.type != "cpu" or graphs.dim() != 3:
        return top_k_eigenpairs(graphs, k)
    edges = graphs.flatten(1) > 0.5
    if not torch.equal(edges.to(graphs.dtype), graphs.flatten(1)):
        return top_k_eigenpairs(graphs, k)
    packed = np.packbits(edges.numpy(), axis=1)
    keys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    vecs, vals = top_k_eigenpairs(graphs[torch.from_numpy(first)], k)
    rows = torch.from_numpy(inverse.reshape(-1))
    return vecs[rows], vals[rows]


def edge_accuracy(logits: Tensor, target: Tensor, diagonal: bool = False) -> Tensor:
    """The ``accuracy`` of ``logit_metrics`` alone, without its eigendecompositions.

    P = (L > 0) is an edge exactly where the logit is positive (never on the
    diagonal); compared with A on the scored entries, pooled over the batch, as
    ``prediction_metrics`` does.
    """
    n = logits.shape[-1]
    hits = (logits > 0) == (target > 0.5)
    if diagonal:
        # P's diagonal is 0: a diagonal entry is a hit exactly where A has no self-loop.
        hits.diagonal(dim1=-2, dim2=-1).copy_(target.diagonal(dim1=-2, dim2=-1) <= 0.5)
        return hits.to(logits.dtype).mean()
    return hits[..., off_diagonal_mask(n, logits.device)].to(logits.dtype).mean()


def reference_scores(noisy: Tensor, clean: Tensor,
                     diagonal: bool = False) -> dict[str, dict[str, Tensor]]:
    """Scores of the trivial baselines a model must beat: predict no edges / echo the input.

    Both are predictions, so their diagonal is zeroed like P's.
    """
    return {
        "no_edges": prediction_metrics(torch.zeros_like(clean), clean, diagonal=diagonal),
        "noisy_input": prediction_metrics(_zero_diagonal(noisy), clean, diagonal=diagonal),
    }
