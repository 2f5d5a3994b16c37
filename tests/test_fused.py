"""Fused sweeps: which jobs train together, and that each member is still its own job.

The training tests share one composed sweep and one solo run of each job (module
fixtures): a fused group must reproduce the solo numbers within FUSED_TOLERANCE.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from omegaconf import DictConfig, OmegaConf

from tmgg.jobs.fusion import balance_groups, fusion_settings, group_jobs
from tmgg.jobs.plan import PlanError

# A fused member's weights and losses differ from its solo run's by float32
# reassociation inside the batched matmuls (measured: under 1e-7); the bound held here.
FUSED_TOLERANCE = 1e-5
# Metrics of the binary prediction P = (L > 0) (accuracy, f1, mse, frobenius and the
# spectral errors) jump when a logit within that error of 0 changes sign: one flipped
# pair moves a 50-graph average by about 0.002. Bound: 1 % of the value (or 0.01).
THRESHOLDED_TOLERANCE = 0.01
STEPS = ["trainer.max_steps=20", "trainer.val_check_interval=10", "data.val_samples=50",
         "data.test_samples=50"]


def _compose(*overrides: str) -> Any:
    from hydra.core.hydra_config import HydraConfig

    from tmgg.jobs.compose import compose_sweep

    sweep = compose_sweep(list(overrides))
    HydraConfig.instance().cfg = None  # jobs below run outside a Hydra job
    return sweep


# --------------------------------------------------------------------------- grouping


@pytest.fixture(scope="module")
def grid_jobs(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    root = tmp_path_factory.mktemp("grid")
    name = ("stage.run_name=g_${model.name}_b${data.batch_size}"
            "_c${trainer.gradient_clip_val}_s${seed}")
    return _compose("stage=smoke", "data.batch_size=50,100", "trainer.gradient_clip_val=0,1",
                    name, f"outputs_dir={root}/out", f"experiments_dir={root}/exp").jobs


def _stream(job: Any) -> tuple[Any, ...]:
    return job.task_config["seed"], job.task_config["data"]["batch_size"]


def test_jobs_of_one_batch_stream_form_one_group(grid_jobs: list[Any]) -> None:
    groups = group_jobs(grid_jobs, "auto", 64)
    assert len(grid_jobs) == 24
    # seeds {1, 2} x batch sizes {50, 100}: four streams; models and clipping fuse.
    assert sorted(len(g) for g in groups) == [6, 6, 6, 6]
    for group in groups:
        assert len({_stream(grid_jobs[p]) for p in group}) == 1
        assert len({grid_jobs[p].task_config["model"]["name"] for p in group}) == 3
    assert sorted(p for g in groups for p in g) == list(range(24))


def test_different_seeds_or_batch_sizes_or_budgets_never_share_a_group(
        grid_jobs: list[Any]) -> None:
    changed = grid_jobs[0].task_config["trainer"]["max_steps"] + 1
    job = grid_jobs[1]
    other_budget = type(job)(**{**job.__dict__, "task_config": json.loads(json.dumps(
        {**job.task_config, "trainer": {**job.task_config["trainer"], "max_steps": changed}}))})
    jobs = [*grid_jobs, other_budget]
    for group in group_jobs(jobs, "auto", 64):
        keys = {(*_stream(jobs[p]), jobs[p].task_config["trainer"]["max_steps"]) for p in group}
        assert len(keys) == 1
    assert [len(g) for g in group_jobs(jobs, "auto", 64)].count(1) == 1


def test_the_cap_splits_a_group_and_off_runs_every_job_alone(grid_jobs: list[Any]) -> None:
    capped = group_jobs(grid_jobs, "auto", 4)
    assert sorted(len(g) for g in capped) == [3] * 8  # 6 per stream -> two groups of 3
    assert all(len(g) == 1 for g in group_jobs(grid_jobs, "off", 64))


def test_groups_are_split_so_that_the_workers_finish_together() -> None:
    seeds = [list(range(0, 36)), list(range(36, 72)), list(range(72, 108))]
    # 3 seed groups on 2 workers: two stay whole and the third is split in two, so that
    # each worker runs one whole seed and half of the third (not 2 rounds of one group).
    balanced = balance_groups(seeds, 2)
    assert [len(g) for g in balanced] == [36, 36, 18, 18]
    assert balanced[:2] == seeds[:2]
    # Largest first whatever the order given; solo jobs come last, unsplit.
    mixed = balance_groups([[200], seeds[2][:30], seeds[0], [201], seeds[1]], 2)
    assert [len(g) for g in mixed] == [36, 36, 15, 15, 1, 1]
    assert mixed[:2] == [seeds[0], seeds[1]] and mixed[-2:] == [[200], [201]]
    # The split deals out whole stacked banks (6 banks of 6: 3 per part, alternating),
    # and cuts in order only where whole banks cannot give equal parts.
    bank = {p: p // 6 for p in range(108)}
    dealt = balance_groups(seeds, 2, bank.__getitem__)
    assert [len(g) for g in dealt] == [36, 36, 18, 18]
    assert [sorted({bank[p] for p in part}) for part in dealt[2:]] == [[12, 14, 16],
                                                                         [13, 15, 17]]
    uneven = {p: 0 if p < 80 else 1 for p in range(72, 108)}  # banks of 8 and 28
    assert [len(g) for g in balance_groups(seeds, 2, uneven.__getitem__)[2:]] == [18, 18]
    assert sorted(p for g in balanced for p in g) == list(range(108))
    # Kept whole when the workers divide the groups, and solo jobs are never split.
    assert balance_groups(seeds[:2], 2) == seeds[:2]
    assert balance_groups([[0], [1], [2]], 2) == [[0], [1], [2]]
    assert balance_groups(seeds, 1) == seeds


def test_bad_fusion_settings_are_refused_naming_the_field() -> None:
    with pytest.raises(PlanError, match="hydra.launcher.fuse"):
        fusion_settings({"fuse": "sometimes"})
    with pytest.raises(PlanError, match="fuse_max_members"):
        fusion_settings({"fuse": "auto", "fuse_max_members": 0})
    assert fusion_settings({"fuse": "auto", "fuse_max_members": 5}) == ("auto", 5)
    assert fusion_settings({}) == ("off", 1)  # launchers without fusion run jobs alone


# --------------------------------------------------------------------------- training


class Sweep:
    """Three smoke jobs of seed 1 (two linear_pe lrs stacked, one filter_bank).

    ``extra`` overrides apply to all three; ``tweak`` edits the composed configs.
    """

    def __init__(self, root: Path, extra: tuple[str, ...] = (),
                 tweak: Callable[[list[DictConfig]], None] | None = None) -> None:
        self.root = root
        sweep = _compose("stage=smoke", "seed=1", "model=linear_pe,filter_bank",
                         "optimizer.lr=1e-3,5e-3", *STEPS, *extra, f"outputs_dir={root}/solo",
                         f"experiments_dir={root}/exp")
        jobs = {(j.task_config["model"]["name"], j.task_config["optimizer"]["lr"]): j
                for j in sweep.jobs}
        self.configs = [OmegaConf.create(jobs[key].task_config)
                        for key in (("linear_pe", 1e-3), ("linear_pe", 5e-3),
                                    ("filter_bank", 1e-3))]
        for cfg in self.configs:
            cfg.logger.mode = "offline"
        if tweak is not None:
            tweak(self.configs)
        self.solo = [self.run_solo(cfg) for cfg in self.configs]

    def run_solo(self, cfg: DictConfig) -> dict[str, Any]:
        from tmgg.task.train import run_training

        solo = OmegaConf.create(OmegaConf.to_container(cfg))
        solo.logger = {"name": "csv"}
        return run_training(solo)

    def run_group(self, name: str, configs: list[DictConfig]) -> list[Any]:
        from tmgg.task.fused import FusedMember, run_fused_training

        members = [FusedMember(cfg=cfg, output_dir=self.root / name / str(cfg.job.run_name))
                   for cfg in configs]
        run_fused_training(members)
        return members


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    return Sweep(tmp_path_factory.mktemp("fused"))


@pytest.fixture(scope="module")
def fused(sweep: Sweep) -> list[Any]:
    return sweep.run_group("fused", sweep.configs)


def _numbers(result: dict[str, Any]) -> dict[str, float]:
    skip = {"train_seconds", "fused_members", "resumed_from_step", "global_step"}
    return {k: v for k, v in result.items() if isinstance(v, float) and k not in skip}


def _assert_same_numbers(a: dict[str, Any], b: dict[str, Any]) -> None:
    numbers_a, numbers_b = _numbers(a), _numbers(b)
    assert numbers_a.keys() == numbers_b.keys()
    for key, value in numbers_a.items():
        difference = abs(value - numbers_b[key])
        if key.endswith("/loss") or "_reference_" in key:
            assert difference <= FUSED_TOLERANCE, (key, difference)
        else:
            assert difference <= THRESHOLDED_TOLERANCE * max(1.0, abs(value)), (key, difference)


def _weights(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_a_fused_member_trains_as_its_solo_run(sweep: Sweep, fused: list[Any]) -> None:
    for member, solo in zip(fused, sweep.solo, strict=True):
        assert member.error is None
        _assert_same_numbers(member.result, solo)
        assert member.result["global_step"] == solo["global_step"] == 20
        solo_dir = sweep.root / "solo" / "smoke" / str(member.cfg.job.run_name)
        for name in ("best.ckpt", "last.ckpt"):
            fused_w = _weights(member.output_dir / "checkpoints" / name)
            solo_w = _weights(solo_dir / "checkpoints" / name)
            assert fused_w.keys() == solo_w.keys()
            for key in fused_w:
                assert (fused_w[key] - solo_w[key]).abs().max() <= FUSED_TOLERANCE
        assert json.loads((member.output_dir / "metrics.json").read_text()) == member.result


# The earlier system's variant (issue 14), with per-member differences inside one group:
# member 0 trains off the diagonal, stacked with member 1, which tests its last weights;
# member 2 scores off the diagonal (its own references).
LEGACY = ("data.self_loops=true", "data.test_split=outside_train", "model.symmetrize=false",
          "objective.loss_diagonal=true", "objective.metrics_diagonal=true")


def _mixed_legacy_members(configs: list[DictConfig]) -> None:
    configs[1].trainer.test_checkpoint = "last"
    configs[1].optimizer.lr = 0.5  # overshoots: its best val/loss is not its last
    configs[0].objective.loss_diagonal = False
    configs[2].objective.metrics_diagonal = False


@pytest.fixture(scope="module")
def legacy_sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    return Sweep(tmp_path_factory.mktemp("fused_legacy"), LEGACY, _mixed_legacy_members)


def test_a_fused_member_trains_as_its_solo_run_under_the_legacy_options(
        legacy_sweep: Sweep) -> None:
    fused = legacy_sweep.run_group("fused", legacy_sweep.configs)
    for member, solo in zip(fused, legacy_sweep.solo, strict=True):
        assert member.error is None
        _assert_same_numbers(member.result, solo)
    # The legacy options took effect: self-loops score as missed edges under the
    # diagonal metrics ("no edges" is worse there), and not off the diagonal.
    legacy, off_diagonal = fused[0].result, fused[2].result
    no_edges = "test_reference_no_edges/mse"
    assert legacy[no_edges] > off_diagonal[no_edges]
    assert fused[0].result["test/mse"] != fused[1].result["test/mse"]


def test_test_checkpoint_last_tests_the_final_weights(legacy_sweep: Sweep) -> None:
    import torch

    from tmgg.task.module import DenoisingModule, GraphDenoisingData
    from tmgg.task.train import objective_config

    cfg = legacy_sweep.configs[1]  # test_checkpoint: last
    out = legacy_sweep.root / "solo" / "smoke" / str(cfg.job.run_name) / "checkpoints"
    data = GraphDenoisingData(OmegaConf.to_container(cfg.data, resolve=True),
                              list(cfg.noise.levels), int(cfg.seed), 20)
    data.setup()
    module = DenoisingModule(model=OmegaConf.to_container(cfg.model),
                             optimizer=OmegaConf.to_container(cfg.optimizer),
                             scheduler=OmegaConf.to_container(cfg.scheduler),
                             max_steps=20, objective=objective_config(cfg))
    module.load_state_dict(_weights(out / "best.ckpt"))
    assert int(_load(out / "best.ckpt")["global_step"]) < 20
    with torch.no_grad():
        best_mse = float(torch.stack([
            module.compute_metrics(module.model(level.noisy), level.clean)["mse"]
            for level in data.test_levels]).mean())
    # The same job testing its best checkpoint scores exactly that; "last" does not.
    as_best = OmegaConf.create(OmegaConf.to_container(cfg))
    as_best.trainer.test_checkpoint = "best"
    as_best.outputs_dir = str(legacy_sweep.root / "as_best")
    assert legacy_sweep.run_solo(as_best)["test/mse"] == pytest.approx(best_mse, abs=1e-6)
    assert legacy_sweep.solo[1]["test/mse"] != pytest.approx(best_mse, abs=1e-3)


def test_each_member_has_its_own_wandb_run_at_the_pinned_destination(
        fused: list[Any]) -> None:
    from tmgg.cli.reconcile import read_run_file, run_files
    from tmgg.config.identity import wandb_run_id

    for member in fused:
        files = run_files(member.output_dir)
        assert len(files) == 1, files
        run = read_run_file(files[0])
        assert run is not None
        assert (run.entity, run.project) == ("graph_denoise_team", "spectral_denoising")
        assert run.run_id == wandb_run_id(str(member.cfg.job.id))
        assert run.name == member.cfg.job.run_name
        assert run.state == "finished"
        assert member.result["wandb_path"].endswith(run.run_id)


def test_each_members_run_lists_the_installed_packages_as_a_solo_run_does(
        fused: list[Any]) -> None:
    """The group reads the package list once for all its runs (package_list_read_once);
    every run's requirements.txt is still the whole environment, as wandb writes it."""
    import wandb.util

    from tmgg.cli.reconcile import run_files

    expected = {f"{d.key}=={d.version}" for d in wandb.util.working_set()}
    assert any(line.startswith("torch==") for line in expected)
    for member in fused:
        listed = run_files(member.output_dir)[0].parent / "files" / "requirements.txt"
        assert set(listed.read_text().split()) == expected, member.cfg.job.run_name
    assert wandb.util.working_set.__module__ == "wandb.util"  # put back after the group


def test_a_members_learning_rate_changes_only_that_member(sweep: Sweep,
                                                          fused: list[Any]) -> None:
    first, second = (OmegaConf.create(OmegaConf.to_container(c)) for c in sweep.configs[:2])
    second.optimizer.lr = 2e-2
    first.logger = second.logger = {"name": "csv"}
    changed = sweep.run_group("lr_changed", [first, second])
    _assert_same_numbers(changed[0].result, fused[0].result)
    assert abs(changed[1].result["val/loss"] - fused[1].result["val/loss"]) > 1e-4


def test_a_diverging_member_fails_alone(sweep: Sweep) -> None:
    from tmgg.task.fused import MemberFailure

    healthy, diverging = (OmegaConf.create(OmegaConf.to_container(c))
                          for c in sweep.configs[:2])
    diverging.optimizer.lr = 1e38
    diverging.trainer.gradient_clip_val = 0.0
    healthy.logger = diverging.logger = {"name": "csv"}
    members = sweep.run_group("nan", [healthy, diverging])
    assert isinstance(members[1].error, MemberFailure), members[1].error
    assert members[1].result is None
    assert not (members[1].output_dir / "metrics.json").exists()
    assert members[0].error is None
    _assert_same_numbers(members[0].result, sweep.solo[0])


KILLED_GROUP = """
import sys
from pathlib import Path
from omegaconf import OmegaConf
from tmgg.task.fused import FusedMember, run_fused_training
configs = [OmegaConf.load(p) for p in sys.argv[2:]]
members = [FusedMember(cfg=c, output_dir=Path(sys.argv[1]) / str(c.job.run_name))
           for c in configs]
run_fused_training(members)
"""


KILLED_GROUP_STEPS, KILLED_GROUP_CHECKPOINT = 20, 10


@pytest.mark.slow
def test_a_killed_group_resumes_each_member_from_its_own_checkpoint(
        sweep: Sweep, tmp_path: Path) -> None:
    """The group's process holds at its first checkpoint (``tmgg.task.hold``) and is
    SIGKILLed there, never before it nor after the group finished; each member then
    resumes from its own step-10 checkpoint, fused or solo, to the uninterrupted
    numbers."""
    import shutil

    from holds import hold_env, wait_for_holds

    from tmgg.task.fused import FusedMember, run_fused_training
    from tmgg.task.train import run_training

    configs = [OmegaConf.create(OmegaConf.to_container(c)) for c in sweep.configs[:2]]
    paths = []
    for i, cfg in enumerate(configs):
        cfg.logger = {"name": "csv"}
        cfg.trainer.max_steps = KILLED_GROUP_STEPS
        cfg.trainer.val_check_interval = KILLED_GROUP_CHECKPOINT
        paths.append(tmp_path / f"job{i}.yaml")
        OmegaConf.save(cfg, paths[-1])
    reference = sweep.run_group("reference", configs)
    group_dir = tmp_path / "group"
    release = tmp_path / "release"
    env = hold_env(KILLED_GROUP_CHECKPOINT, release, {**os.environ, "PYTHONPATH": str(REPO)})
    process = subprocess.Popen([sys.executable, "-c", KILLED_GROUP, str(group_dir),
                                *map(str, paths)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (held,) = wait_for_holds(release, 1, process)
        assert held == process.pid
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    lasts = [group_dir / str(c.job.run_name) / "checkpoints" / "last.ckpt" for c in configs]
    steps = [int(_load(p)["global_step"]) for p in lasts]
    assert steps == [KILLED_GROUP_CHECKPOINT] * 2
    # Member 1's checkpoints, copied: a member checkpoint resumes a solo job too.
    solo_cfg = OmegaConf.create(OmegaConf.to_container(configs[1]))
    solo_cfg.outputs_dir = str(tmp_path / "solo")
    solo_dir = tmp_path / "solo" / "smoke" / str(solo_cfg.job.run_name)
    shutil.copytree(lasts[1].parent, solo_dir / "checkpoints")

    members = [FusedMember(cfg=c, output_dir=group_dir / str(c.job.run_name)) for c in configs]
    run_fused_training(members)
    for member, ref, step in zip(members, reference, steps, strict=True):
        assert member.error is None
        assert member.result["resumed_from_step"] == step
        _assert_same_numbers(member.result, ref.result)
    solo = run_training(solo_cfg)
    assert solo["resumed_from_step"] == steps[1]
    _assert_same_numbers(solo, reference[1].result)


def _load(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)
