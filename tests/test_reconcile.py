"""``tmgg-sweep reconcile``: expected jobs against wandb's run files or the W&B API."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tmgg.identity import wandb_run_id
from tmgg.orchestration import cli
from tmgg.orchestration.compose import compose_sweep
from tmgg.orchestration.reconcile import (
    iter_records,
    main,
    parse_args,
    read_run_file,
    reconcile_jobs,
    search_paths,
)

TINY = ["stage=smoke", "model=linear_pe", "trainer.max_steps=4", "trainer.val_check_interval=2"]
PINNED = "graph_denoise_team/spectral_denoising"

# The real app, with a training step that crashes (what a preempted/buggy job does).
CRASH_SCRIPT = textwrap.dedent("""
    from lightning.pytorch.callbacks import Callback

    import tmgg.task.train as train


    class Crash(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 1:
                raise RuntimeError("simulated crash")


    original = train.run_training
    train.run_training = lambda cfg, extra_callbacks=None: original(cfg, [Crash()])

    from tmgg.app import main

    main()
""")


def dirs(tmp_path: Path) -> list[str]:
    return [f"experiments_dir={tmp_path / 'exp'}", f"outputs_dir={tmp_path / 'out'}"]


def run_job(tmp_path: Path, command: list[str], args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MODAL_TOKEN"))}
    env.update(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), TMGG_NUM_THREADS="1")
    subprocess.run([sys.executable, *command, *args, *dirs(tmp_path)], cwd=tmp_path,
                   text=True, capture_output=True, env=env, timeout=240)


def test_offline_reconcile_of_a_partly_failed_sweep(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    run_job(tmp_path, ["-m", "tmgg.app", "-m"], [*TINY, "seed=1"])  # finishes
    run_job(tmp_path, [str(script)], [*TINY, "seed=2"])  # crashes at step 1
    # seed=3 never runs.
    overrides = [*TINY, "seed=1,2,3", *dirs(tmp_path)]

    code = cli.main(["reconcile", "--offline", *overrides])
    assert code == 1
    table = capsys.readouterr().out
    assert "3 expected jobs (offline evidence): 1 failed, 1 missing, 1 ok" in table

    sweep = compose_sweep(overrides)
    rows = {row.run_name[-2:]: row for row in
            reconcile_jobs(sweep.jobs, sweep.ledger.states(), sweep.stage, mode="offline")}
    assert {k: r.status for k, r in rows.items()} == {"s1": "ok", "s2": "failed",
                                                      "s3": "missing"}
    assert rows["s1"].destination == PINNED
    assert rows["s1"].run_ids == [wandb_run_id(rows["s1"].job_id)]
    assert rows["s2"].ledger_status == "FAILED" and "simulated crash" in rows["s2"].detail
    assert rows["s2"].run_ids == [wandb_run_id(rows["s2"].job_id)]
    assert rows["s3"].run_ids == [] and "never launched" in rows["s3"].detail

    # A killed writer leaves a torn tail: the records before it still count.
    (crashed,) = (tmp_path / "out").rglob(f"run-{rows['s2'].run_ids[0]}.wandb")
    whole = read_run_file(crashed)
    assert (whole.entity, whole.project, whole.exit_code) == (*PINNED.split("/"), 1)
    torn = tmp_path / f"{crashed.name}"
    torn.write_bytes(crashed.read_bytes()[:-5])
    info = read_run_file(torn)
    assert (info.run_id, info.entity, info.exit_code) == (whole.run_id, whole.entity, None)
    assert len(list(iter_records(torn.read_bytes()))) < len(list(iter_records(
        crashed.read_bytes())))

    # A job that is finished in the ledger but whose run files are gone is not ok.
    for path in (tmp_path / "out").rglob(f"run-{rows['s1'].run_ids[0]}.wandb"):
        path.unlink()
    (row,) = [r for r in reconcile_jobs(sweep.jobs, sweep.ledger.states(), sweep.stage)
              if r.job_id == rows["s1"].job_id]
    assert row.status == "missing" and "ledger says finished" in row.detail


# -- online, against a stand-in with the shape of wandb.Api ---------------------------
@dataclass
class StandInRun:
    """The attributes reconcile reads from a wandb.apis.public.Run."""

    entity: str
    project: str
    id: str
    name: str
    group: str
    state: str


def _matches(run: StandInRun, filters: dict[str, Any]) -> bool:
    """W&B's filter semantics for the fields reconcile uses (name is the run id)."""
    fields = {"name": run.id, "displayName": run.name, "group": run.group, "state": run.state}
    for key, condition in filters.items():
        if key == "$or":
            if not any(_matches(run, sub) for sub in condition):
                return False
        elif isinstance(condition, dict) and "$in" in condition:
            if fields[key] not in condition["$in"]:
                return False
        elif fields[key] != condition:
            return False
    return True


class StandInApi:
    def __init__(self, runs: list[StandInRun]) -> None:
        self._runs = runs
        self.paths: list[str] = []

    def runs(self, path: str, filters: dict[str, Any] | None = None) -> list[StandInRun]:
        self.paths.append(path)
        entity, project = path.split("/")
        if entity == "nobody":
            raise ValueError(f"Could not find project {project}")  # as wandb.Api does
        return [run for run in self._runs if (run.entity, run.project) == (entity, project)
                and _matches(run, filters or {})]


def test_online_reconcile_against_a_stand_in_api(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [*TINY, "seed=1,2,3,4,5", *dirs(tmp_path)]
    sweep = compose_sweep(overrides)
    jobs = {job.run_name[-2:]: job for job in sweep.jobs}
    team, project = PINNED.split("/")

    def run(seed: str, entity: str = team, state: str = "finished", run_id: str | None = None
            ) -> StandInRun:
        job = jobs[seed]
        return StandInRun(entity, project, run_id or wandb_run_id(job.job_id), job.run_name,
                          "smoke", state)

    api = StandInApi([
        run("s1"),
        run("s2", state="failed"),
        run("s3", entity="someone_personal", run_id="x7rand0m"),  # the incident's runs
        run("s4"), run("s4", run_id="dup1d"),
        # s5 ran nowhere; a run of another job of the stage is not ours.
        StandInRun(team, project, "other", "smoke_filter_bank_x", "smoke", "finished"),
    ])
    assert main(["--online", *overrides], api=api) == 1
    out = capsys.readouterr().out
    assert "2 missing" in out  # s3 is not found without searching its entity

    notes: list[str] = []
    rows = {row.run_name[-2:]: row for row in reconcile_jobs(
        sweep.jobs, {}, "smoke", mode="online", search_entities=["nobody", "someone_personal"],
        api=api, notes=notes)}
    assert notes == [f"could not read runs of nobody/{project}: ValueError: Could not find "
                     f"project {project}"]
    assert {k: r.status for k, r in rows.items()} == {
        "s1": "ok", "s2": "failed", "s3": "misrouted", "s4": "duplicated", "s5": "missing"}
    assert f"someone_personal/{project}" in api.paths
    assert f"someone_personal/{project}/x7rand0m" in rows["s3"].detail
    assert rows["s4"].run_ids == sorted([wandb_run_id(jobs["s4"].job_id), "dup1d"])

    only_s1 = [*TINY, "seed=1", *dirs(tmp_path)]
    assert main(["--online", *only_s1], api=api) == 0
    args = parse_args(["stage=smoke", "--search-entity", "alice", "seed=1", "--search-entity",
                       "bob/proj"])
    assert args.search_entity == ["alice", "bob/proj"]
    assert args.overrides == ["stage=smoke", "seed=1"] and args.mode == "auto"
    assert search_paths(args.search_entity, [project]) == [f"alice/{project}", "bob/proj"]
