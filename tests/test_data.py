"""Graph families, splits, batch sampling and evaluation sets (SPEC section 2)."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch.utils.data import DataLoader

from tmgg.task.data import (
    EvalLevel,
    GraphSplits,
    TrainBatches,
    block_adjacency,
    build_graph_splits,
    compositions,
    erdos_renyi_adjacency,
    make_eval_set,
    regular_adjacency,
    sample_batch,
    sbm_adjacency,
    tree_adjacency,
)

LEVELS = [0.01, 0.05, 0.1, 0.2, 0.3]
SPLIT_COUNTS = {"num_train_graphs": 10, "num_val_graphs": 5, "num_test_graphs": 10}
PARTITIONS = {"num_nodes": 20, "min_blocks": 2, "max_blocks": 4, "min_block_size": 2,
              "max_block_size": 15, **SPLIT_COUNTS}
SINGLE = {"num_nodes": 50, "block_sizes": [17, 17, 16], "p_in": 0.7, "p_out": 0.05,
          "graph_seed": 42}
FAMILIES = {
    "er": {"num_nodes": 50, "p": 0.1, **SPLIT_COUNTS},
    "regular": {"num_nodes": 50, "degree": 3, **SPLIT_COUNTS},
    "tree": {"num_nodes": 50, **SPLIT_COUNTS},
}


def assert_graphs(adj: torch.Tensor) -> None:
    """Symmetric, 0/1, zero diagonal, float32, for (n, n) or (G, n, n)."""
    assert adj.dtype == torch.float32
    assert torch.equal(adj, adj.transpose(-1, -2))
    assert torch.all(adj.diagonal(dim1=-2, dim2=-1) == 0)
    assert set(adj.unique().tolist()) <= {0.0, 1.0}


def keys(graphs: torch.Tensor) -> set[bytes]:
    return {g.to(torch.bool).numpy().tobytes() for g in graphs}


# ----------------------------------------------------------------------- compositions


def test_compositions_of_20() -> None:
    comps = compositions(20, 2, 4, 2, 15)
    assert len(comps) == 583
    assert len(set(comps)) == 583
    assert comps == sorted(comps)
    assert (5, 15) in comps and (15, 5) in comps
    assert all(sum(c) == 20 and 2 <= len(c) <= 4 and min(c) >= 2 and max(c) <= 15
               for c in comps)
    assert compositions(4, 1, 4, 1, 4) == [(1, 1, 1, 1), (1, 1, 2), (1, 2, 1), (1, 3),
                                           (2, 1, 1), (2, 2), (3, 1), (4,)]


def test_block_adjacency() -> None:
    sizes = [3, 5, 2]
    adj = block_adjacency(sizes)
    assert adj.shape == (10, 10)
    assert_graphs(adj)
    expected = torch.tensor([s - 1 for s in sizes for _ in range(s)], dtype=torch.float32)
    assert torch.equal(adj.sum(1), expected)
    assert adj[0, 3] == 0 and adj[3, 7] == 1


# ----------------------------------------------------------------------- sbm_partitions


def partition_splits(seed: int) -> GraphSplits:
    return build_graph_splits("sbm_partitions", PARTITIONS, seed)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 12345])
def test_partition_splits_disjoint_and_sized(seed: int) -> None:
    splits = partition_splits(seed)
    assert splits.train.shape == (10, 20, 20)
    assert splits.val.shape == (5, 20, 20)
    assert splits.test.shape == (10, 20, 20)
    for part in (splits.train, splits.val, splits.test):
        assert_graphs(part)
    train, val, test = keys(splits.train), keys(splits.val), keys(splits.test)
    assert len(train) == 10 and len(val) == 5 and len(test) == 10
    assert not (train & val) and not (train & test) and not (val & test)


def test_partition_splits_seeded() -> None:
    a, b, c = partition_splits(1), partition_splits(1), partition_splits(2)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.train, c.train)


def test_partition_params_checked() -> None:
    too_many = {**PARTITIONS, "num_train_graphs": 600}
    with pytest.raises(ValueError, match="num_train_graphs"):
        build_graph_splits("sbm_partitions", too_many, 0)
    with pytest.raises(ValueError, match="max_blokcs"):
        build_graph_splits("sbm_partitions", {**PARTITIONS, "max_blokcs": 3}, 0)
    missing = {k: v for k, v in PARTITIONS.items() if k != "min_block_size"}
    with pytest.raises(ValueError, match="min_block_size"):
        build_graph_splits("sbm_partitions", missing, 0)
    sampling = {**PARTITIONS, "name": "sbm_partitions", "samples_per_epoch": 1000,
                "val_samples": 500, "test_samples": 500, "batch_size": 100}
    assert torch.equal(build_graph_splits("sbm_partitions", sampling, 1).train,
                       partition_splits(1).train)
    with pytest.raises(ValueError, match="sbm_partitions"):
        build_graph_splits("nope", PARTITIONS, 0)


# ----------------------------------------------------------------------- other families


def test_sbm_single() -> None:
    splits = build_graph_splits("sbm_single", SINGLE, 7)
    assert splits.train.shape == (1, 50, 50)
    assert_graphs(splits.train)
    assert torch.equal(splits.train, splits.val) and torch.equal(splits.train, splits.test)
    # The graph depends on graph_seed only, not on the run seed.
    assert torch.equal(build_graph_splits("sbm_single", SINGLE, 8).train, splits.train)
    assert torch.equal(splits.train[0], sbm_adjacency([17, 17, 16], 0.7, 0.05, 42))
    other = build_graph_splits("sbm_single", {**SINGLE, "graph_seed": 43}, 7)
    assert not torch.equal(other.train, splits.train)
    with pytest.raises(ValueError, match="block_sizes"):
        build_graph_splits("sbm_single", {**SINGLE, "block_sizes": [17, 17, 17]}, 0)


def test_sbm_adjacency_densities() -> None:
    adj = sbm_adjacency([100, 100], 0.6, 0.1, 0)
    assert_graphs(adj)
    within = adj[:100, :100].sum() / (100 * 99)
    between = adj[:100, 100:].mean()
    assert abs(within - 0.6) < 0.05 and abs(between - 0.1) < 0.03


def test_generators_direct() -> None:
    assert_graphs(erdos_renyi_adjacency(50, 0.1, 0))
    assert torch.equal(regular_adjacency(50, 3, 5), regular_adjacency(50, 3, 5))
    assert tree_adjacency(seed=1).shape == (50, 50)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_random_families(name: str) -> None:
    splits = build_graph_splits(name, FAMILIES[name], 3)
    assert splits.train.shape == (10, 50, 50)
    assert splits.val.shape == (5, 50, 50) and splits.test.shape == (10, 50, 50)
    all_graphs = torch.cat([splits.train, splits.val, splits.test])
    assert_graphs(all_graphs)
    assert len(keys(all_graphs)) == 25  # every graph distinct, so the splits are disjoint
    again = build_graph_splits(name, FAMILIES[name], 3)
    assert torch.equal(again.train, splits.train) and torch.equal(again.test, splits.test)
    assert not torch.equal(build_graph_splits(name, FAMILIES[name], 4).train, splits.train)
    for adj in all_graphs:
        degrees = adj.sum(1)
        if name == "regular":
            assert torch.all(degrees == 3)
        if name == "tree":
            assert adj.sum() == 2 * 49
            assert nx.is_connected(nx.from_numpy_array(adj.numpy()))


def test_random_family_params_checked() -> None:
    with pytest.raises(ValueError, match="degree"):
        build_graph_splits("regular", {**FAMILIES["regular"], "num_nodes": 51}, 0)
    with pytest.raises(ValueError, match="'p'"):
        build_graph_splits("er", {k: v for k, v in FAMILIES["er"].items() if k != "p"}, 0)
    with pytest.raises(ValueError, match="p"):
        build_graph_splits("er", {**FAMILIES["er"], "p": 1.5}, 0)


# ----------------------------------------------------------------------- sampling


def test_sample_batch_permutes_source_graphs() -> None:
    graphs = torch.stack([block_adjacency([2, 18]), block_adjacency([5, 5, 10])])
    batch = sample_batch(graphs, 64, torch.Generator().manual_seed(0))
    assert batch.shape == (64, 20, 20)
    assert_graphs(batch)
    signatures = {(g.sum().item(), tuple(sorted(g.sum(1).tolist()))) for g in graphs}
    seen = set()
    for g in batch:
        sig = (g.sum().item(), tuple(sorted(g.sum(1).tolist())))
        assert sig in signatures
        seen.add(sig)
    assert seen == signatures
    # Permutations are not trivial: node 0 is not always in the 2-clique / first block.
    assert len({tuple(g[0].tolist()) for g in batch}) > 2
    again = sample_batch(graphs, 64, torch.Generator().manual_seed(0))
    assert torch.equal(batch, again)


def test_sample_batch_is_conjugation() -> None:
    graph = erdos_renyi_adjacency(12, 0.4, 1)
    batch = sample_batch(graph[None], 5, torch.Generator().manual_seed(3))
    for g in batch:
        gm = nx.from_numpy_array(graph.numpy())
        assert nx.is_isomorphic(gm, nx.from_numpy_array(g.numpy()))


def test_train_batches() -> None:
    graphs = partition_splits(1).train
    ds = TrainBatches(graphs, batch_size=100, num_batches=40, levels=LEVELS, seed=5)
    assert len(ds) == 40
    batches = list(DataLoader(ds, batch_size=None))
    assert len(batches) == 40
    eps_seen = set()
    for b in batches:
        assert b["clean"].shape == b["noisy"].shape == (100, 20, 20)
        assert b["eps"].dim() == 0 and b["eps"].dtype == torch.float32
        eps = b["eps"].item()
        assert any(abs(eps - level) < 1e-6 for level in LEVELS)
        eps_seen.add(round(eps, 4))
        assert_graphs(b["noisy"])
        rate = (b["noisy"] != b["clean"]).float().sum().item() / (100 * 20 * 19)
        assert abs(rate - eps) < 0.015 + 0.1 * eps
    assert len(eps_seen) >= 4
    again = list(ds)
    for a, b in zip(batches, again, strict=True):
        assert torch.equal(a["clean"], b["clean"]) and torch.equal(a["noisy"], b["noisy"])
        assert torch.equal(a["eps"], b["eps"])
    other = next(iter(TrainBatches(graphs, 100, 1, LEVELS, seed=6)))
    assert not torch.equal(other["noisy"], batches[0]["noisy"])


def test_train_batches_resumed_mid_stream_continue_it() -> None:
    graphs = partition_splits(1).train
    whole = list(TrainBatches(graphs, batch_size=10, num_batches=12, levels=LEVELS, seed=5))
    rest = list(TrainBatches(graphs, batch_size=10, num_batches=12, levels=LEVELS, seed=5,
                             start=7))
    assert len(rest) == 5
    for a, b in zip(whole[7:], rest, strict=True):
        assert torch.equal(a["noisy"], b["noisy"]) and torch.equal(a["eps"], b["eps"])
    with pytest.raises(ValueError, match="start"):
        TrainBatches(graphs, 10, 12, LEVELS, seed=5, start=13)


def test_train_batches_rejects_bad_levels() -> None:
    with pytest.raises(ValueError, match="1.5"):
        TrainBatches(partition_splits(1).train, 10, 1, [0.1, 1.5], 0)


def test_make_eval_set() -> None:
    graphs = partition_splits(1).val
    first = make_eval_set(graphs, 500, LEVELS, seed=11)
    second = make_eval_set(graphs, 500, LEVELS, seed=11)
    assert [lv.eps for lv in first] == LEVELS
    assert all(isinstance(lv, EvalLevel) for lv in first)
    for a, b in zip(first, second, strict=True):
        assert a.clean.shape == a.noisy.shape == (500, 20, 20)
        assert torch.equal(a.clean, b.clean) and torch.equal(a.noisy, b.noisy)
        assert_graphs(a.noisy)
        rate = (a.noisy != a.clean).float().sum().item() / (500 * 20 * 19)
        assert abs(rate - a.eps) < 0.01
    # Every level sees the same clean samples; a different seed changes them.
    assert all(torch.equal(lv.clean, first[0].clean) for lv in first)
    assert not torch.equal(make_eval_set(graphs, 500, LEVELS, seed=12)[0].clean, first[0].clean)
