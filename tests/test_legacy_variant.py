"""The earlier system's variant of the task (issue 14): each option changes what it says,
and only that; at their defaults nothing changes (stage-1 ids are pinned in test_plan).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tmgg.task.data import TrainBatches, build_graph_splits, compositions
from tmgg.task.metrics import (
    edge_accuracy,
    logit_metrics,
    masked_bce_with_logits,
    predict,
    prediction_metrics,
)
from tmgg.task.models import build_model
from tmgg.task.module import DenoisingModule, GraphDenoisingData, reference_metrics

LEVELS = [0.01, 0.1, 0.3]
PARTITIONS = {"name": "sbm_partitions", "num_nodes": 20, "min_blocks": 2, "max_blocks": 4,
              "min_block_size": 2, "max_block_size": 15, "num_train_graphs": 10,
              "num_val_graphs": 5, "num_test_graphs": 10, "samples_per_epoch": 1000,
              "val_samples": 40, "test_samples": 40, "batch_size": 8}
LEGACY_OVERRIDES = ["data.self_loops=true", "data.test_split=outside_train",
                    "model.symmetrize=false", "objective.loss_diagonal=true",
                    "objective.metrics_diagonal=true", "trainer.test_checkpoint=last"]


def _diagonals(x: torch.Tensor) -> torch.Tensor:
    return x.diagonal(dim1=-2, dim2=-1)


def _off_diagonal(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    return x[..., ~torch.eye(n, dtype=torch.bool)]


# --------------------------------------------------------------------------- data


def _data(**variant: Any) -> GraphDenoisingData:
    data = GraphDenoisingData({**PARTITIONS, **variant}, LEVELS, seed=3, max_steps=4)
    data.setup()
    return data


def test_self_loops_put_ones_on_the_clean_and_noisy_diagonals_and_nothing_else() -> None:
    plain, loops = _data(), _data(self_loops=True)
    assert loops.self_loops and not plain.self_loops
    for split in ("train", "val", "test"):
        graphs, reference = getattr(loops.splits, split), getattr(plain.splits, split)
        assert bool((_diagonals(graphs) == 1).all())
        assert torch.equal(_off_diagonal(graphs), _off_diagonal(reference))
    for with_loops, without in zip(loops.test_levels + loops.val_levels,
                                   plain.test_levels + plain.val_levels, strict=True):
        assert bool((_diagonals(with_loops.clean) == 1).all())
        assert bool((_diagonals(with_loops.noisy) == 1).all())
        # The noise draws are the same: only the diagonal differs.
        assert torch.equal(_off_diagonal(with_loops.noisy), _off_diagonal(without.noisy))
    stream = TrainBatches(loops.splits.train, 8, 3, LEVELS, seed=5, self_loops=True)
    plain_stream = TrainBatches(plain.splits.train, 8, 3, LEVELS, seed=5)
    for batch, reference in zip(stream, plain_stream, strict=True):
        for key in ("clean", "noisy"):
            assert bool((_diagonals(batch[key]) == 1).all())
            assert torch.equal(_off_diagonal(batch[key]), _off_diagonal(reference[key]))
        assert bool((_diagonals(reference["noisy"]) == 0).all())


def test_self_loops_reach_every_family_and_bad_values_are_refused() -> None:
    tree = build_graph_splits("tree", {"num_nodes": 12, "num_train_graphs": 2,
                                       "num_val_graphs": 1, "num_test_graphs": 1,
                                       "self_loops": True}, 0)
    assert bool((_diagonals(tree.train) == 1).all())
    with pytest.raises(ValueError, match="data.self_loops"):
        build_graph_splits("tree", {"num_nodes": 12, "num_train_graphs": 2,
                                    "num_val_graphs": 1, "num_test_graphs": 1,
                                    "self_loops": "yes"}, 0)
    with pytest.raises(ValueError, match="data.test_split"):
        build_graph_splits("sbm_partitions", {**PARTITIONS, "test_split": "mixed"}, 0)


def _composition_ids(graphs: torch.Tensor) -> set[bytes]:
    return {g.to(torch.bool).numpy().tobytes() for g in graphs}


def test_outside_train_split_may_overlap_validation_but_never_training() -> None:
    overlaps_val = 0
    for seed in range(60):
        disjoint = build_graph_splits("sbm_partitions", PARTITIONS, seed)
        legacy = build_graph_splits("sbm_partitions", {**PARTITIONS,
                                                       "test_split": "outside_train"}, seed)
        # Train and validation are those of the disjoint rule; only test is redrawn.
        assert torch.equal(legacy.train, disjoint.train)
        assert torch.equal(legacy.val, disjoint.val)
        train, val, test = (_composition_ids(s) for s in (legacy.train, legacy.val, legacy.test))
        assert len(test) == 10 and not test & train
        overlaps_val += bool(test & val)
        d_train, d_val, d_test = (_composition_ids(s) for s in
                                  (disjoint.train, disjoint.val, disjoint.test))
        assert not d_test & (d_train | d_val)
    # P(a seed's 10 test draws from 573 compositions hit one of the 5 validation ones)
    # is about 8 %: over 60 seeds some must (and not nearly all).
    assert 0 < overlaps_val < 30


def test_outside_train_split_needs_only_room_outside_the_training_set() -> None:
    available = len(compositions(20, 2, 4, 2, 15))
    big = {**PARTITIONS, "num_train_graphs": available - 10, "num_val_graphs": 10,
           "num_test_graphs": 10}
    with pytest.raises(ValueError, match="disjoint"):
        build_graph_splits("sbm_partitions", big, 0)
    splits = build_graph_splits("sbm_partitions", {**big, "test_split": "outside_train"}, 0)
    assert splits.test.shape[0] == 10


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("name", ["linear_pe", "filter_bank", "self_attention"])
def test_unsymmetrised_logits_are_not_symmetric_and_stack_like_solo(name: str) -> None:
    from tmgg.task.spectral import top_k_eigenpairs

    torch.manual_seed(0)
    graphs = _data(self_loops=True).test_levels[1].noisy[:6]
    symmetric = build_model(name, k=8)
    assert torch.equal(symmetric(graphs), symmetric(graphs).mT)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(build_model(name, k=8, symmetrize=False))
    raw = models[0](graphs)
    assert not torch.allclose(raw, raw.mT, atol=1e-4)
    assert "symmetrize=False" in models[0].extra_repr()  # fused banks keep them apart
    assert "symmetrize" not in symmetric.extra_repr()
    # The functional forward with parameters stacked on a leading member dim.
    stacked = {key: torch.stack([dict(m.named_parameters())[key] for m in models])
               for key, _ in models[0].named_parameters()}
    vecs, vals = top_k_eigenpairs(graphs, 8)
    together = models[0].symmetric_logits(stacked, vecs, vals)
    for member, model in zip(together, models, strict=True):
        assert torch.allclose(member, model(graphs), atol=1e-5)


# --------------------------------------------------------------------------- loss, metrics


def test_diagonal_loss_takes_the_diagonal_logits_and_off_diagonal_loss_ignores_them() -> None:
    clean = _data(self_loops=True).test_levels[0].clean[:4]
    logits = torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    moved = logits.clone()
    _diagonals(moved).add_(3.0)
    assert masked_bce_with_logits(moved, clean) == masked_bce_with_logits(logits, clean)
    assert masked_bce_with_logits(moved, clean, True) != masked_bce_with_logits(logits, clean,
                                                                                 True)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, clean)
    assert torch.allclose(masked_bce_with_logits(logits, clean, True), expected)


def test_a_stacked_bank_takes_each_members_loss_scope() -> None:
    from tmgg.task.metrics import member_bce_with_logits

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 7, 7, generator=generator)
    clean = (torch.rand(4, 7, 7, generator=generator) > 0.5).float()
    flags = [False, True, False]
    expected = torch.stack([masked_bce_with_logits(row, clean, flag)
                            for row, flag in zip(logits, flags, strict=True)])
    assert torch.allclose(member_bce_with_logits(logits, clean, flags), expected)
    assert torch.allclose(member_bce_with_logits(logits, clean), torch.stack(
        [masked_bce_with_logits(row, clean) for row in logits]))


def test_diagonal_metrics_count_every_self_loop_as_a_missed_edge() -> None:
    clean = _data(self_loops=True).test_levels[0].clean
    n = clean.shape[-1]
    perfect_logits = clean * 2 - 1  # P = A off the diagonal; P's diagonal is zeroed
    assert bool((_diagonals(predict(perfect_logits)) == 0).all())
    off = logit_metrics(perfect_logits, clean)
    full = logit_metrics(perfect_logits, clean, diagonal=True)
    assert off["mse"] == 0 and off["accuracy"] == 1
    assert torch.isclose(full["mse"], torch.tensor(1 / n))  # n misses of n*n entries
    assert torch.isclose(full["frobenius_error"], torch.tensor(float(n) ** 0.5))
    assert full["f1"] < 1 and full["eigenvalue_error"] > 0
    assert torch.isclose(edge_accuracy(perfect_logits, clean, True), full["accuracy"])
    assert torch.isclose(edge_accuracy(perfect_logits, clean), off["accuracy"])
    # Without self-loops the diagonal is always right: the same errors over more entries.
    plain = _data().test_levels[0]
    logits = plain.noisy * 2 - 1
    off, full = (prediction_metrics(predict(logits), plain.clean, diagonal=d)
                 for d in (False, True))
    assert torch.isclose(full["mse"], off["mse"] * (n - 1) / n)


def test_reference_scores_follow_the_metric_scope() -> None:
    data = _data(self_loops=True)
    n = data.test_levels[0].clean.shape[-1]
    off = reference_metrics(data.test_levels, "test")
    full = reference_metrics(data.test_levels, "test", diagonal=True)
    clean = data.test_levels[0].clean
    edges_off = float(_off_diagonal(clean).mean())
    # "no edges" misses every edge, the n self-loops included, over n*n entries.
    assert off["test_reference_no_edges/mse"] == pytest.approx(edges_off)
    assert full["test_reference_no_edges/mse"] == pytest.approx(
        (edges_off * n * (n - 1) + n) / (n * n))
    # "noisy input" is a prediction too: its diagonal is zeroed, so the self-loops miss.
    noisy_off = off["test_reference_noisy_input/mse"]
    assert full["test_reference_noisy_input/mse"] == pytest.approx(
        (noisy_off * n * (n - 1) + n) / (n * n), rel=1e-5)


def test_the_module_scores_with_its_objective() -> None:
    def module(**objective: bool) -> DenoisingModule:
        torch.manual_seed(0)
        return DenoisingModule(model={"name": "linear_pe", "k": 8, "max_nodes": 200},
                               optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0},
                               scheduler={"name": "none"}, max_steps=10,
                               objective={"name": "bce", **objective})

    level = _data(self_loops=True).test_levels[1]
    spec, legacy = module(), module(loss_diagonal=True, metrics_diagonal=True)
    assert (spec.loss_diagonal, spec.metrics_diagonal) == (False, False)
    logits = spec.model(level.noisy)
    assert spec.compute_loss(logits, level.clean) == masked_bce_with_logits(logits, level.clean)
    assert legacy.compute_loss(logits, level.clean) == masked_bce_with_logits(
        logits, level.clean, True)
    assert legacy.compute_metrics(logits, level.clean)["mse"] > spec.compute_metrics(
        logits, level.clean)["mse"]
    assert spec.metric_scope != legacy.metric_scope
    with pytest.raises(ValueError, match="objective.name"):
        module(name="mse")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- config


def test_defaults_are_todays_task_and_each_legacy_option_changes_the_job_id(
        tmp_path: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from tmgg.jobs.compose import compose_sweep

    # An empty ledger: the config ids themselves (stage 1's records are pinned apart).
    base = ["stage=stage1", "model=self_attention", "optimizer.lr=1e-3",
            "optimizer.weight_decay=1e-2", "model.k=8", "seed=1",
            f"experiments_dir={tmp_path}"]
    explicit = ["data.self_loops=false", "data.test_split=disjoint", "model.symmetrize=true",
                "objective.loss_diagonal=false", "objective.metrics_diagonal=false",
                "trainer.test_checkpoint=best"]
    default_id = compose_sweep([*base, *explicit]).jobs[0].job_id
    HydraConfig.instance().cfg = None
    plain = compose_sweep(base)
    HydraConfig.instance().cfg = None
    assert plain.jobs[0].job_id == default_id
    ids = {default_id}
    for override in LEGACY_OVERRIDES:
        changed = compose_sweep([*base, override])
        HydraConfig.instance().cfg = None
        ids.add(changed.jobs[0].job_id)
    assert len(ids) == 1 + len(LEGACY_OVERRIDES)


def test_model_and_objective_options_fuse_and_data_options_split_the_stream() -> None:
    from hydra.core.hydra_config import HydraConfig

    from tmgg.jobs.compose import compose_sweep
    from tmgg.jobs.fusion import stream_key

    sweep = compose_sweep(["stage=smoke", "seed=1", "model=self_attention"])
    HydraConfig.instance().cfg = None
    config = sweep.jobs[0].task_config
    key = stream_key(config)
    member_options = {"model": {"symmetrize": False},
                      "objective": {"loss_diagonal": True, "metrics_diagonal": True},
                      "trainer": {"test_checkpoint": "last"}}
    for group, values in member_options.items():
        assert stream_key({**config, group: {**config[group], **values}}) == key, group
    for values in ({"self_loops": True}, {"test_split": "outside_train"}):
        assert stream_key({**config, "data": {**config["data"], **values}}) != key


def test_bad_values_are_refused_naming_the_field() -> None:
    from tmgg.jobs.compose import compose_sweep
    from tmgg.jobs.plan import PlanError

    for override, field in (("data.self_loops=1", "data.self_loops"),
                            ("data.test_split=overlap", "data.test_split"),
                            ("model.symmetrize=maybe", "model.symmetrize"),
                            ("objective.loss_diagonal=2", "objective.loss_diagonal"),
                            ("trainer.test_checkpoint=first", "trainer.test_checkpoint")):
        with pytest.raises(PlanError, match=field.replace(".", r"\.")):
            compose_sweep(["stage=smoke", "seed=1", "model=linear_pe", override])


NEW_STAGES = {"stage1_legacy": 108, "stage1b": 144,
              **{f"stage1_legacy_ablate_{option}": 18 for option in (
                  "self_loops", "symmetrize", "loss_diagonal", "metrics_diagonal",
                  "test_split", "test_checkpoint", "precision")}}


@pytest.mark.slow
def test_issue14_stages_plan_unique_jobs_at_the_team_destination(tmp_path: Any) -> None:
    from hydra.core.hydra_config import HydraConfig

    from tmgg.cli.reporting.compare import LEGACY_VALUES
    from tmgg.cli.reporting.report import select
    from tmgg.jobs.compose import compose_sweep

    for stage, count in NEW_STAGES.items():
        jobs = compose_sweep([f"stage={stage}", f"experiments_dir={tmp_path}"]).jobs
        HydraConfig.instance().cfg = None
        assert len(jobs) == count, stage
        assert len({job.job_id for job in jobs}) == len({job.run_name for job in jobs}) == count
        for job in jobs:
            logger = job.task_config["logger"]
            assert (logger["entity"], logger["project"], logger["group"]) == (
                "graph_denoise_team", "spectral_denoising", stage)
        if stage.startswith("stage1_legacy"):
            # Every legacy option at its legacy value, but the one an ablation sweeps.
            swept = {path for path in LEGACY_VALUES
                     if len({str(select(job.task_config, path)) for job in jobs}) > 1}
            assert len(swept) == (0 if stage == "stage1_legacy" else 1), stage
            for path, value in LEGACY_VALUES.items():
                if path not in swept:
                    assert {select(job.task_config, path) for job in jobs} == {value}, path
        else:
            assert {job.task_config["optimizer"]["lr"] for job in jobs} == {
                1e-2, 5e-2, 1e-1, 2e-1}
            assert not any(job.task_config["data"]["self_loops"] for job in jobs)
