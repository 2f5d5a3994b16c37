"""Graph data sets for spectral denoising (SPEC section 2).

Everything here is seeded: the same run seed must give the same train/val/test graphs,
the same training batch stream and the same evaluation set, on any machine. Graphs are
float32 (n, n) adjacency matrices, symmetric, 0/1, with zero diagonal, unless a data
config asks for the earlier system's variant (issue 14): ``self_loops`` puts ones on
the diagonal of the clean and the noisy graphs, and ``test_split: outside_train``
draws the test compositions from all compositions outside the training set.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from tmgg.task.noise import edge_flip, validate_levels

__all__ = [
    "GraphSplits",
    "EvalLevel",
    "TrainBatches",
    "block_adjacency",
    "build_graph_splits",
    "compositions",
    "erdos_renyi_adjacency",
    "make_eval_set",
    "regular_adjacency",
    "sample_batch",
    "sbm_adjacency",
    "tree_adjacency",
    "KNOWN_FAMILIES",
]

# Keys a data config may carry that belong to batching/sampling, not to graph generation.
SAMPLING_KEYS = frozenset({"name", "samples_per_epoch", "val_samples", "test_samples",
                           "batch_size"})

_SPLIT_KEYS = ("num_train_graphs", "num_val_graphs", "num_test_graphs")

#: Optional keys every family takes, with their default: the task's variant, not the
#: graphs' generation. ``self_loops``: a one on every diagonal entry (clean and noisy).
VARIANT_DEFAULTS: dict[str, Any] = {"self_loops": False}
#: ``sbm_partitions``'s rule for the test compositions: ``disjoint`` from train and
#: validation (SPEC.md section 2), or ``outside_train``, the earlier system's rule (any
#: composition not used for training, so a test graph may also be a validation graph).
TEST_SPLITS = ("disjoint", "outside_train")
_FAMILY_OPTIONAL: dict[str, dict[str, Any]] = {"sbm_partitions": {"test_split": "disjoint"}}

_FAMILY_KEYS: dict[str, tuple[str, ...]] = {
    "sbm_partitions": ("num_nodes", "min_blocks", "max_blocks", "min_block_size",
                       "max_block_size", *_SPLIT_KEYS),
    "sbm_single": ("num_nodes", "block_sizes", "p_in", "p_out", "graph_seed"),
    "er": ("num_nodes", "p", *_SPLIT_KEYS),
    "regular": ("num_nodes", "degree", *_SPLIT_KEYS),
    "tree": ("num_nodes", *_SPLIT_KEYS),
}
KNOWN_FAMILIES = tuple(_FAMILY_KEYS)


# --------------------------------------------------------------------------- seeds


def _derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``parts``; decorrelates streams that share a run seed."""
    ints = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) % 2**64 for p in parts]
    state = np.random.SeedSequence(ints).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _generator(seed: int) -> torch.Generator:
    """A CPU torch.Generator seeded with ``seed`` (kept separate from global RNG state)."""
    g = torch.Generator()
    g.manual_seed(int(seed) % 2**63)
    return g


# --------------------------------------------------------------------------- graphs


def compositions(
    n: int, min_parts: int, max_parts: int, min_size: int, max_size: int
) -> list[tuple[int, ...]]:
    """All ordered compositions of ``n`` with a bounded number and size of parts.

    Order matters ((5, 15) and (15, 5) are both returned); the list is lexicographic so
    that a seeded choice of indices is reproducible.
    """
    out: list[tuple[int, ...]] = []

    def extend(prefix: tuple[int, ...], remaining: int) -> None:
        if remaining == 0:
            if len(prefix) >= min_parts:
                out.append(prefix)
            return
        if len(prefix) >= max_parts:
            return
        for size in range(min_size, min(max_size, remaining) + 1):
            extend((*prefix, size), remaining - size)

    if n > 0 and min_size >= 1:
        extend((), n)
    return out


def block_adjacency(sizes: Sequence[int]) -> Tensor:
    """Disjoint union of cliques of the given sizes, no self-loops (SBM, p_in=1, p_out=0)."""
    sizes_t = torch.as_tensor(list(sizes), dtype=torch.long)
    labels = torch.repeat_interleave(torch.arange(len(sizes_t)), sizes_t)
    adj = (labels[:, None] == labels[None, :]).to(torch.float32)
    adj.fill_diagonal_(0.0)
    return adj


def _to_tensor(graph: nx.Graph, n: int) -> Tensor:
    """Dense float32 adjacency with nodes in order 0..n-1 and the diagonal cleared."""
    adj = torch.from_numpy(nx.to_numpy_array(graph, nodelist=range(n), dtype=np.float32))
    adj.fill_diagonal_(0.0)
    return adj


def sbm_adjacency(sizes: Sequence[int], p_in: float, p_out: float, seed: int) -> Tensor:
    """General stochastic block model via networkx, seeded, no self-loops."""
    sizes = [int(s) for s in sizes]
    k = len(sizes)
    probs = [[p_in if i == j else p_out for j in range(k)] for i in range(k)]
    graph = nx.stochastic_block_model(sizes, probs, seed=seed, selfloops=False)
    return _to_tensor(graph, sum(sizes))


def erdos_renyi_adjacency(n: int = 50, p: float = 0.1, seed: int = 0) -> Tensor:
    """G(n, p) Erdős–Rényi graph, seeded."""
    return _to_tensor(nx.gnp_random_graph(n, p, seed=seed), n)


def regular_adjacency(n: int = 50, d: int = 3, seed: int = 0) -> Tensor:
    """Uniform random d-regular graph on n nodes, seeded (n * d must be even)."""
    return _to_tensor(nx.random_regular_graph(d, n, seed=seed), n)


def tree_adjacency(n: int = 50, seed: int = 0) -> Tensor:
    """Uniformly random labelled tree on n nodes (networkx >= 3.5 ``random_labeled_tree``)."""
    if hasattr(nx, "random_labeled_tree"):
        graph = nx.random_labeled_tree(n, seed=seed)
    else:  # pragma: no cover - older networkx
        graph = nx.random_tree(n, seed=seed)
    return _to_tensor(graph, n)


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class GraphSplits:
    """The graphs of each split, stacked as (G, n, n) float32."""

    train: Tensor
    val: Tensor
    test: Tensor


def _read_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Return exactly the family's generation params; reject unknown and missing keys.

    The optional keys (``VARIANT_DEFAULTS`` and the family's own) get their default
    when absent.
    """
    expected = _FAMILY_KEYS[name]
    optional = {**VARIANT_DEFAULTS, **_FAMILY_OPTIONAL.get(name, {})}
    given = {str(k): v for k, v in params.items() if str(k) not in SAMPLING_KEYS}
    unknown = sorted(set(given) - set(expected) - set(optional))
    if unknown:
        raise ValueError(f"data ({name}): unknown parameter(s) {unknown}; "
                         f"expected {list(expected)}")
    missing = [k for k in expected if k not in given]
    if missing:
        raise ValueError(f"data ({name}): missing parameter(s) {missing}")
    return {**optional, **given}


def _int(params: Mapping[str, Any], key: str, minimum: int) -> int:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"data.{key}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"data.{key}: {value} is below the minimum {minimum}")
    return int(value)


def _prob(params: Mapping[str, Any], key: str) -> float:
    value = params[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"data.{key}: expected a number, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"data.{key}: {value} is outside [0, 1]")
    return float(value)


def _split_counts(params: Mapping[str, Any]) -> tuple[int, int, int]:
    return tuple(_int(params, key, 1) for key in _SPLIT_KEYS)  # type: ignore[return-value]


def _sbm_partitions(p: Mapping[str, Any], seed: int) -> GraphSplits:
    n = _int(p, "num_nodes", 1)
    min_blocks = _int(p, "min_blocks", 1)
    max_blocks = _int(p, "max_blocks", min_blocks)
    min_size = _int(p, "min_block_size", 1)
    max_size = _int(p, "max_block_size", min_size)
    n_train, n_val, n_test = _split_counts(p)
    comps = compositions(n, min_blocks, max_blocks, min_size, max_size)
    test_split = p["test_split"]
    if test_split not in TEST_SPLITS:
        raise ValueError(f"data.test_split: unknown rule {test_split!r}; "
                         f"expected one of {', '.join(TEST_SPLITS)}")
    if test_split == "disjoint" and n_train + n_val + n_test > len(comps):
        raise ValueError(
            f"data.num_train_graphs + num_val_graphs + num_test_graphs = "
            f"{n_train + n_val + n_test} exceeds the "
            f"{len(comps)} compositions of num_nodes={n} into {min_blocks}-{max_blocks} blocks "
            f"of size {min_size}-{max_size}; the splits must be disjoint"
        )
    if n_train + max(n_val, n_test) > len(comps):
        raise ValueError(
            f"data.num_train_graphs + max(num_val_graphs, num_test_graphs) = "
            f"{n_train + max(n_val, n_test)} exceeds the {len(comps)} compositions of "
            f"num_nodes={n}; validation and test must lie outside the training set"
        )
    order = torch.randperm(len(comps), generator=_generator(_derive_seed(seed, "sbm_partitions")))
    if test_split == "disjoint":
        test_ids = order[n_train + n_val:n_train + n_val + n_test]
    else:
        # Train and validation as under "disjoint"; test drawn anew from everything
        # outside the training set, validation compositions included.
        outside = order[n_train:]
        pick = torch.randperm(len(outside), generator=_generator(
            _derive_seed(seed, "sbm_partitions", "outside_train")))
        test_ids = outside[pick[:n_test]]

    def stack(ids: Tensor) -> Tensor:
        return torch.stack([block_adjacency(comps[i]) for i in ids.tolist()])

    return GraphSplits(
        train=stack(order[:n_train]),
        val=stack(order[n_train:n_train + n_val]),
        test=stack(test_ids),
    )


def _sbm_single(p: Mapping[str, Any]) -> GraphSplits:
    n = _int(p, "num_nodes", 1)
    raw_sizes = p["block_sizes"]
    if isinstance(raw_sizes, (str, bytes)) or not isinstance(raw_sizes, Sequence):
        try:
            raw_sizes = list(raw_sizes)  # omegaconf ListConfig and other iterables
        except TypeError:
            raise ValueError(f"data.block_sizes: expected a list of integers, "
                             f"got {raw_sizes!r}") from None
    sizes = []
    for s in raw_sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise ValueError(f"data.block_sizes: {s!r} is not a positive integer")
        sizes.append(int(s))
    if not sizes or sum(sizes) != n:
        raise ValueError(f"data.block_sizes: {sizes} sums to {sum(sizes)}, "
                         f"but num_nodes is {n}")
    graph_seed = _int(p, "graph_seed", 0)
    adj = sbm_adjacency(sizes, _prob(p, "p_in"), _prob(p, "p_out"), graph_seed)[None]
    return GraphSplits(train=adj, val=adj, test=adj)


def _random_family(name: str, p: Mapping[str, Any], seed: int) -> GraphSplits:
    n = _int(p, "num_nodes", 2 if name == "tree" else 1)
    if name == "er":
        prob = _prob(p, "p")

        def make(s: int) -> Tensor:
            return erdos_renyi_adjacency(n, prob, s)
    elif name == "regular":
        degree = _int(p, "degree", 0)
        if degree >= n or (n * degree) % 2:
            raise ValueError(f"data.degree: {degree}-regular graphs on num_nodes={n} nodes do "
                             "not exist (need degree < num_nodes and an even num_nodes*degree)")

        def make(s: int) -> Tensor:
            return regular_adjacency(n, degree, s)
    else:

        def make(s: int) -> Tensor:
            return tree_adjacency(n, s)

    counts = _split_counts(p)
    rng = np.random.default_rng(_derive_seed(seed, name))
    graphs: list[Tensor] = []
    seen: set[bytes] = set()
    attempts = 0
    # Draw until we have enough pairwise-distinct adjacency matrices, so no graph is
    # shared between train, val and test; the cap only triggers for tiny families.
    while len(graphs) < sum(counts):
        attempts += 1
        if attempts > 100 * sum(counts) + 100:
            raise ValueError(f"data ({name}): could not draw {sum(counts)} distinct graphs with "
                             f"num_nodes={n}; lower num_train/val/test_graphs")
        adj = make(int(rng.integers(2**31 - 1)))
        key = adj.to(torch.bool).numpy().tobytes()
        if key not in seen:
            seen.add(key)
            graphs.append(adj)
    n_train, n_val, _ = counts
    return GraphSplits(
        train=torch.stack(graphs[:n_train]),
        val=torch.stack(graphs[n_train:n_train + n_val]),
        test=torch.stack(graphs[n_train + n_val:]),
    )


def build_graph_splits(name: str, params: Mapping[str, Any], seed: int) -> GraphSplits:
    """Build the train/val/test graphs of data family ``name`` for run seed ``seed``.

    ``params`` is the data config; the sampling keys (name, samples_per_epoch,
    val_samples, test_samples, batch_size) are ignored, every other key must be a known
    parameter of the family and all of them must be present, so a misspelt option fails
    loudly instead of silently using a default.
    """
    if name not in _FAMILY_KEYS:
        raise ValueError(f"data.name: unknown data family {name!r}; "
                         f"known: {', '.join(KNOWN_FAMILIES)}")
    p = _read_params(name, params)
    if name == "sbm_partitions":
        splits = _sbm_partitions(p, seed)
    elif name == "sbm_single":
        splits = _sbm_single(p)
    else:
        splits = _random_family(name, p, seed)
    if p["self_loops"] is True:
        return GraphSplits(*(_with_self_loops(g) for g in (splits.train, splits.val, splits.test)))
    if p["self_loops"] is not False:
        raise ValueError(f"data.self_loops: expected true or false, got {p['self_loops']!r}")
    return splits


def _with_self_loops(graphs: Tensor) -> Tensor:
    """The graphs with a one on every diagonal entry (the earlier system's data)."""
    out = graphs.clone()
    out.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    return out


# --------------------------------------------------------------------------- sampling


def sample_batch(graphs: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
    """Uniformly chosen graphs, each under a uniformly random node permutation.

    Permutations are argsorts of uniforms; sample b is ``graphs[idx[b]][perm[b]][:, perm[b]]``
    (``P A Pᵀ``). Rows and columns are permuted in one flat ``index_select``, which is
    several times faster on CPU than the equivalent 3-D advanced indexing.
    """
    num_graphs, n, _ = graphs.shape
    device = graphs.device
    idx = torch.randint(num_graphs, (batch_size,), generator=generator, device=device)
    perm = torch.rand((batch_size, n), generator=generator, device=device).argsort(dim=1)
    if graphs.numel() < 2**31:  # int32 offsets halve the index arithmetic
        idx, perm = idx.int(), perm.int()
    row_start = idx[:, None] * (n * n) + perm * n  # (B, n): flat offset of each permuted row
    flat = (row_start[:, :, None] + perm[:, None, :]).reshape(-1)
    return graphs.reshape(-1).index_select(0, flat).view(batch_size, n, n)


class TrainBatches(IterableDataset):
    """An epoch of ``num_batches`` noisy training batches, reproducible from ``seed``.

    Each batch draws one noise level uniformly from ``levels``. Iterating restarts the
    generator, so two passes (or two runs with one seed) see bit-identical batches. Use
    with ``DataLoader(ds, batch_size=None)``. With several workers every worker replays
    the stream and keeps its round-robin share, so the order is unchanged.

    ``start`` skips the stream's first batches (a job resumed from a checkpoint taken
    after ``start`` steps): they are drawn and dropped, so the batches that follow are
    those an uninterrupted run would have seen. The length stays ``num_batches``: a
    resumed Lightning loop counts its batches from where the checkpoint left off.

    ``self_loops``: the graphs carry self-loops, and the noisy graphs keep them (the
    noise never flips the diagonal; the random draws are the same either way).
    """

    def __init__(
        self,
        graphs: Tensor,
        batch_size: int,
        num_batches: int,
        levels: Sequence[float],
        seed: int,
        start: int = 0,
        self_loops: bool = False,
    ) -> None:
        super().__init__()
        if graphs.dim() != 3 or graphs.shape[0] == 0:
            raise ValueError(f"graphs must be a non-empty (G, n, n) tensor, got "
                             f"{tuple(graphs.shape)}")
        if batch_size < 1 or num_batches < 0:
            raise ValueError(f"batch_size must be >= 1 and num_batches >= 0, got "
                             f"{batch_size}, {num_batches}")
        if not 0 <= start <= num_batches:
            raise ValueError(f"start must be in [0, num_batches={num_batches}], got {start}")
        self.graphs = graphs
        self.batch_size = int(batch_size)
        self.num_batches = int(num_batches)
        self.levels = validate_levels(levels)
        self.seed = int(seed)
        self.start = int(start)
        self.self_loops = bool(self_loops)
        self._level_values = torch.tensor(self.levels, dtype=torch.float32)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        generator = _generator(self.seed)
        for step in range(self.num_batches):
            clean = sample_batch(self.graphs, self.batch_size, generator)
            k = int(torch.randint(len(self.levels), (1,), generator=generator))
            noisy = corrupt(clean, self.levels[k], generator, self.self_loops)
            if step >= self.start and (step - self.start) % num_workers == worker:
                yield {"clean": clean, "noisy": noisy, "eps": self._level_values[k].clone()}


@dataclass
class EvalLevel:
    """The fixed evaluation samples at one noise level."""

    eps: float
    clean: Tensor
    noisy: Tensor


def corrupt(clean: Tensor, eps: float, generator: torch.Generator, self_loops: bool) -> Tensor:
    """``edge_flip``; with ``self_loops`` the noisy graph keeps the clean one's diagonal."""
    noisy = edge_flip(clean, eps, generator)
    if self_loops:
        noisy.diagonal(dim1=-2, dim2=-1).copy_(clean.diagonal(dim1=-2, dim2=-1))
    return noisy


def make_eval_set(
    graphs: Tensor, num_samples: int, levels: Sequence[float], seed: int,
    self_loops: bool = False,
) -> list[EvalLevel]:
    """A deterministic evaluation set: one ``EvalLevel`` per level, in the given order.

    The clean samples (graph + permutation) are drawn once and shared by all levels;
    each level's noise comes from its own seed derived from ``seed`` and the level's
    index, so validation numbers are comparable between epochs and runs.
    """
    values = validate_levels(levels)
    clean = sample_batch(graphs, num_samples, _generator(_derive_seed(seed, "eval-samples")))
    out = []
    for k, eps in enumerate(values):
        noisy = corrupt(clean, eps, _generator(_derive_seed(seed, "eval-noise", k)), self_loops)
        out.append(EvalLevel(eps=eps, clean=clean, noisy=noisy))
    return out
