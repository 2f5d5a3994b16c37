"""Fusion's grouping (tmgg.jobs.fusion) pinned down where mutation testing found it
unexamined (issue 25): which settings keep jobs apart, how a large group is cut, how
the plan describes a task, how many local workers run.

Fast and in-process (plain PlannedJobs, no Hydra): part of ``make mutate``'s selection.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from omegaconf import OmegaConf

from tmgg.jobs.fusion import (
    DEFAULT_MAX_MEMBERS,
    balance_groups,
    bank_key,
    describe_groups,
    fusion_settings,
    group_jobs,
    local_workers,
    near_equal_parts,
    split_group,
    stream_key,
)
from tmgg.jobs.plan import PlanError, PlannedJob

TRAINER = {"max_steps": 40, "val_check_interval": 20, "gradient_clip_val": 1.0,
           "checkpoint": True, "resume": True}
DATA = {"name": "sbm", "batch_size": 8}


def task(seed: int = 1, model: str = "linear_pe", k: int = 8, **trainer: Any
         ) -> dict[str, Any]:
    return {"seed": seed, "data": dict(DATA), "noise": {"kind": "gaussian"},
            "trainer": {**TRAINER, **trainer}, "model": {"name": model, "k": k}}


def job(position: int, config: dict[str, Any], tmgg: bool = True) -> PlannedJob:
    return PlannedJob(index=position, job_id=f"s-{position:010d}", run_name=f"run{position}",
                      stage="s", overrides=[], sweep_config=None, task_config=config,
                      is_tmgg_job=tmgg)


def test_fusion_settings_come_from_the_launcher_and_bad_ones_name_the_field() -> None:
    assert fusion_settings(None) == ("off", 1)
    assert fusion_settings({"fuse": "off"}) == ("off", DEFAULT_MAX_MEMBERS)
    assert fusion_settings({"fuse": "auto"}) == ("auto", 64)
    swept = OmegaConf.create({"hydra": {"launcher": {"fuse": "auto", "fuse_max_members": 3}}})
    assert fusion_settings(swept) == ("auto", 3)
    assert fusion_settings(OmegaConf.create({"hydra": {}})) == ("off", 1)
    with pytest.raises(PlanError) as bad_mode:
        fusion_settings({"fuse": "sometimes"})
    assert str(bad_mode.value) == "hydra.launcher.fuse: 'sometimes' is not one of auto, off"
    for cap in (True, "3", 0, 2.0):
        with pytest.raises(PlanError) as bad_cap:
            fusion_settings({"fuse": "auto", "fuse_max_members": cap})
        assert str(bad_cap.value) == (
            f"hydra.launcher.fuse_max_members: {cap!r} is not an integer >= 1")
    assert fusion_settings({"fuse": "auto", "fuse_max_members": 1}) == ("auto", 1)


def test_the_stream_key_ignores_member_settings_and_keeps_stream_settings_apart() -> None:
    assert stream_key({}) is None
    assert stream_key({"trainer": {}}) is None and stream_key({"data": {}}) is None
    base = stream_key(task())
    assert base is not None
    # A member may clip, test a checkpoint, and use its own model and optimiser.
    assert stream_key(task(gradient_clip_val=5.0, test_checkpoint="best")) == base
    assert stream_key(task(model="filter_bank", k=16)) == base
    # The stream depends on the seed, the data, the noise and the rest of the trainer.
    assert stream_key(task(seed=2)) != base
    assert stream_key(task(max_steps=80)) != base
    assert stream_key({**task(), "data": {**DATA, "batch_size": 16}}) != base
    assert stream_key({**task(), "noise": {"kind": "edge_flip"}}) != base
    assert stream_key({**task(), "noise": None}) != base
    # Without checkpoints nothing resumes, whatever resume says; with them it matters.
    assert stream_key(task(checkpoint=False, resume=True)) == \
        stream_key(task(checkpoint=False, resume=False))
    assert stream_key(task(resume=False)) != base
    assert stream_key(task(checkpoint=False)) != base


def test_bank_key_is_the_models_name_and_its_settings() -> None:
    assert bank_key(job(0, task())) == ("linear_pe", '{"k": 8, "name": "linear_pe"}')
    assert bank_key(job(0, task(k=16)))[0] == "linear_pe"
    assert bank_key(job(0, task(k=16))) != bank_key(job(0, task()))
    assert bank_key(job(0, {})) == ("None", "{}")


def test_jobs_sharing_a_stream_are_grouped_bank_by_bank_in_first_appearance_order() -> None:
    jobs = [job(0, task(model="self_attention")), job(1, task(seed=2)),
            job(2, task(model="filter_bank")), job(3, task(model="self_attention")),
            job(4, task(), tmgg=False), job(5, task(seed=2, model="filter_bank"))]
    assert group_jobs(jobs) == [[2, 0, 3], [5, 1], [4]]
    assert group_jobs(jobs, "off") == [[p] for p in range(6)]
    with pytest.raises(PlanError, match=r"hydra\.launcher\.fuse: 'on' is not one of auto, off"):
        group_jobs(jobs, "on")
    unfusable = [job(0, {"seed": 1}), job(1, {"seed": 1})]
    assert group_jobs(unfusable) == [[0], [1]]


def test_a_group_beyond_the_cap_is_cut_into_near_equal_groups() -> None:
    jobs = [job(p, task(k=p)) for p in range(7)]
    assert group_jobs(jobs, "auto", 7) == [list(range(7))]
    assert [len(g) for g in group_jobs(jobs, "auto", 3)] == [3, 2, 2]
    assert [len(g) for g in group_jobs(jobs, "auto", 6)] == [4, 3]
    assert sorted(p for g in group_jobs(jobs, "auto", 2) for p in g) == list(range(7))
    assert near_equal_parts(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert near_equal_parts([5, 6], 1) == [[5, 6]]
    assert near_equal_parts([5, 6], 2) == [[5], [6]]


def test_splitting_deals_whole_banks_or_cuts_in_order() -> None:
    group = list(range(8))
    two_banks = {p: p % 2 for p in group}
    assert split_group(group, 2, two_banks.__getitem__) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert split_group(group, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    one_bank = {p: 0 for p in group}  # cannot be dealt into equal parts: cut in order
    assert split_group(group, 2, one_bank.__getitem__) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_group([0, 1], 5) == [[0], [1]]  # never more parts than members
    three = {0: "a", 1: "a", 2: "a", 3: "b", 4: "c"}  # 3 + 1 + 1 into 2: 3 | 2
    assert split_group(list(range(5)), 2, three.__getitem__) == [[0, 1, 2], [3, 4]]


def test_balancing_splits_only_the_last_rounds_groups() -> None:
    groups = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert balance_groups(groups, 2) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11]]
    assert balance_groups(groups, 3) == groups
    assert balance_groups(groups, 0) == groups
    # Two fused groups on 3 workers: both split, largest first; the solo job last, whole.
    assert balance_groups([[0, 1, 2, 3], [4], [5, 6]], 3) == [[0, 1], [2], [3], [5], [6], [4]]
    # No full round on 4 workers: every group is split, into members here.
    assert balance_groups(groups, 4) == [[p] for p in range(12)]


def test_local_workers_are_the_configured_count_or_the_cpus_never_more_than_jobs() -> None:
    cpus = os.cpu_count() or 1
    assert local_workers({"n_workers": 3}, 10) == 3
    assert local_workers({"n_workers": 3}, 2) == 2
    assert local_workers({"n_workers": 3}, 0) == 1
    assert local_workers({"n_workers": None}, 1000) == min(cpus, 1000)
    assert local_workers(None, 1000) == min(cpus, 1000)
    assert local_workers(OmegaConf.create({"n_workers": 2}), 5) == 2


def test_the_plan_describes_each_task() -> None:
    jobs = [job(0, task(model="filter_bank", k=16)), job(1, task()), job(2, task(seed=3))]
    rows = describe_groups(jobs, [[0, 1], [2]])
    assert rows == [
        {"group": 0, "members": 2, "seed": 1, "batch_size": 8, "max_steps": 40,
         "stacked_models": "filter_bank/k16, linear_pe/k8", "jobs": ["run0", "run1"]},
        {"group": 1, "members": 1, "seed": 3, "batch_size": 8, "max_steps": 40,
         "stacked_models": "linear_pe/k8", "jobs": ["run2"]},
    ]
    bare = describe_groups([job(0, {})], [[0]])
    assert bare[0]["batch_size"] is None and bare[0]["max_steps"] is None
    assert bare[0]["stacked_models"] == "None/kNone"


def test_the_stream_key_reads_settings_not_their_spelling_order_or_type() -> None:
    shuffled = task()
    shuffled["trainer"] = dict(reversed(list(shuffled["trainer"].items())))
    shuffled["data"] = dict(reversed(list(shuffled["data"].items())))
    assert stream_key(shuffled) == stream_key(task())  # one stream, whatever the key order
    from pathlib import Path

    with_path = {**task(), "data": {**DATA, "root": Path("/data")}}
    assert stream_key(with_path) == stream_key({**task(), "data": {**DATA, "root": "/data"}})
    assert bank_key(job(0, {"model": {"name": "m", "root": Path("/w")}}))[1] == \
        '{"name": "m", "root": "/w"}'


def test_resume_counts_unless_checkpoints_are_off() -> None:
    without_checkpoint_key = task()
    del without_checkpoint_key["trainer"]["checkpoint"]  # checkpoints on by default
    resuming_off = task(resume=False)
    del resuming_off["trainer"]["checkpoint"]
    assert stream_key(without_checkpoint_key) != stream_key(resuming_off)
    no_resume_key = task(checkpoint=False)
    del no_resume_key["trainer"]["resume"]  # resumes by default, but has nothing to resume
    assert stream_key(no_resume_key) == stream_key(task(checkpoint=False, resume=False))


def test_balancing_keeps_the_given_order_when_the_workers_divide_the_groups() -> None:
    groups = [[0], [1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert balance_groups(groups, 3) == groups  # 3 fused groups on 3 workers: as given
    # The last round's groups are dealt bank by bank when the banks are known.
    three = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert balance_groups(three, 2, lambda p: p % 2)[2:] == [[8, 10], [9, 11]]
    assert balance_groups(three, 2)[2:] == [[8, 9], [10, 11]]


def test_dealing_puts_the_largest_bank_first_into_the_part_with_fewest_members() -> None:
    # Banks of 3, 3 and 2 into 3 parts: whole banks make parts of at most ceil(8 / 3) = 3.
    banks = {0: "a", 1: "a", 2: "a", 3: "b", 4: "b", 5: "b", 6: "c", 7: "c"}
    assert split_group(list(range(8)), 3, banks.__getitem__) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    # Banks of 1, 1 and 2 into 2 parts: the pair first, then one single to each side.
    small_first = {0: "x", 1: "y", 2: "z", 3: "z"}
    assert split_group([0, 1, 2, 3], 2, small_first.__getitem__) == [[2, 3], [0, 1]]
    # The part with fewest members, not the first in list order, takes the next bank.
    fewest = {5: "a", 0: "b", 1: "b", 2: "c"}
    assert split_group([0, 1, 5, 2], 2, fewest.__getitem__) == [[0, 1], [5, 2]]


def test_without_a_cpu_count_one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert local_workers(None, 10) == 1
    assert local_workers({"n_workers": 0}, 10) == 1


def test_dealt_banks_are_kept_when_no_part_exceeds_its_share() -> None:
    # Three interleaved banks of 3, 3 and 2 into 3 parts of at most ceil(8 / 3) = 3.
    banks = {0: "a", 3: "a", 6: "a", 1: "b", 4: "b", 7: "b", 2: "c", 5: "c"}
    assert split_group(list(range(8)), 3, banks.__getitem__) == [[0, 3, 6], [1, 4, 7], [2, 5]]
    # A bank goes to the part with fewest members, not to the first part in list order.
    pair_then_singles = {9: "b", 0: "c", 5: "a", 6: "a"}
    assert split_group([9, 0, 5, 6], 2, pair_then_singles.__getitem__) == [[5, 6], [9, 0]]
