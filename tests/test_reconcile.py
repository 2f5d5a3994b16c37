"""``tmgg-sweep reconcile``: expected jobs against wandb's run files or the W&B API."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from wandb_server import FakeWandbServer
from wandb_server.fixtures import user

from tmgg.cli import tmgg_sweep as cli
from tmgg.cli.reconcile import (
    iter_records,
    parse_args,
    print_table,
    read_run_file,
    reconcile_jobs,
    search_paths,
)
from tmgg.config.identity import wandb_run_id
from tmgg.jobs.compose import compose_sweep
from tmgg.jobs.plan import PlannedJob

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

    from tmgg.cli.app import main

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
    run_job(tmp_path, ["-m", "tmgg.cli.app", "-m"], [*TINY, "seed=1"])  # finishes
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

    # The advice for the failed and the never-launched job, run as printed, trains them.
    advised = reconcile_jobs(sweep.jobs, sweep.ledger.states(), sweep.stage, mode="offline",
                             overrides=overrides)
    (command,) = {row.advice for row in advised if row.status != "ok"}
    assert command.startswith("tmgg-sweep resume stage=smoke")
    # Printed under the table once for both jobs, whole on one line, as it is run here.
    assert table.count(command) == 1 and f"\n  {command}\n" in table
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MODAL_TOKEN"))}
    env.update(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
               TMGG_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    resumed = subprocess.run(["bash", "-c", command], cwd=tmp_path, text=True,
                             capture_output=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {row.status for row in reconcile_jobs(sweep.jobs, sweep.ledger.states(),
                                                 sweep.stage)} == {"ok"}

    # A job that is finished in the ledger but whose run files are gone is not ok, and
    # offline reconcile says what it read instead of claiming W&B has no run.
    for path in (tmp_path / "out").rglob(f"run-{rows['s1'].run_ids[0]}.wandb"):
        path.unlink()
    (row,) = [r for r in reconcile_jobs(sweep.jobs, sweep.ledger.states(), sweep.stage)
              if r.job_id == rows["s1"].job_id]
    assert row.status == "missing" and "ledger says finished" in row.detail
    assert "in wandb's run files under" in row.detail and "W&B itself was not asked" \
        in row.detail and f"found at {PINNED}" not in row.detail


# -- online: the real wandb.Api against the test suite's W&B server --------------------
@pytest.mark.slow
def test_online_reconcile_of_stage1_with_planted_runs(
        wandb_server: FakeWandbServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The seed incident's shape: 108 jobs (three pages of wandb's 50), 19 runs in the key's
    personal entity, a duplicate, a crashed run, a run with a job's name under a foreign
    id, and a job that never ran. The server applies reconcile's real filters."""
    overrides = ["stage=stage1", f"logger.base_url={wandb_server.base_url}", *dirs(tmp_path)]
    jobs = compose_sweep(overrides).jobs
    assert len(jobs) == 108
    team, project = PINNED.split("/")
    misrouted, (duplicated, crashed, foreign, never), ok = jobs[:19], jobs[19:23], jobs[23:]

    def plant(job: PlannedJob, entity: str = team, run_id: str | None = None,
              state: str = "finished") -> None:
        wandb_server.plant_run(entity, project, run_id or wandb_run_id(job.job_id),
                               display_name=job.run_name, group="stage1", state=state,
                               exit_code=0 if state == "finished" else None)

    for index, job in enumerate(misrouted):  # wandb.init without an entity: the key's own
        plant(job, entity="alice", run_id=None if index % 2 else f"incident{index:02d}")
    for job in [duplicated, *ok]:
        plant(job)
    plant(duplicated, run_id="dup00001")
    plant(crashed, state="crashed")
    plant(foreign, run_id="foreign01")  # its name, someone else's run
    wandb_server.plant_run(team, project, "otherstage", display_name="stage2_x", group="stage2")

    monkeypatch.setenv("WANDB_API_KEY", user(wandb_server, "alice").api_key)
    notes: list[str] = []
    # No api given: reconcile opens wandb.Api on the pinned host, as the command does.
    rows = {row.job_id: row for row in reconcile_jobs(
        jobs, {}, "stage1", mode="online", notes=notes)}
    print_table(list(rows.values()), title="reconcile", mode="online", notes=notes)
    out = capsys.readouterr().out
    assert ("108 expected jobs (online evidence): 1 duplicated, 1 failed, 1 foreign, "
            "19 misrouted, 1 missing, 85 ok") in out
    # alice's own entity and team, with the project and uncategorized, were searched
    # unasked; a project that is not there in an entity she belongs to is no failure.
    assert notes == [f"no project {path} (searched; the key's user belongs to "
                     f"{path.split('/')[0]})"
                     for path in ("alice/uncategorized", f"{team}/uncategorized")]
    # mallory's entity is not alice's to read: what it holds is unknown, and so is
    # every job that W&B evidence there could change.
    unread = {row.job_id: row for row in reconcile_jobs(
        jobs, {}, "stage1", mode="online", search_entities=["mallory"])}
    assert {row.status for job_id, row in unread.items()
            if rows[job_id].status in ("ok", "missing", "foreign")} == {"unknown"}
    assert sum(row.status == "unknown" for row in unread.values()) == 87
    assert (f"could not read mallory/{project} (the key's user cannot read entity mallory"
            in unread[ok[0].job_id].detail)
    for index, job in enumerate(misrouted):
        row = rows[job.job_id]
        run_id = wandb_run_id(job.job_id) if index % 2 else f"incident{index:02d}"
        assert row.status == "misrouted"
        assert row.detail == f"found at alice/{project}/{run_id} (finished)"
    assert rows[duplicated.job_id].status == "duplicated"
    assert rows[duplicated.job_id].run_ids == sorted(["dup00001",
                                                      wandb_run_id(duplicated.job_id)])
    assert (rows[crashed.job_id].status, rows[crashed.job_id].detail) == (
        "failed", f"run {wandb_run_id(crashed.job_id)} crashed")
    assert rows[foreign.job_id].status == "foreign"
    assert "has this job's name but not its run id" in rows[foreign.job_id].detail
    assert (rows[never.job_id].status, rows[never.job_id].run_ids) == ("missing", [])
    assert {rows[job.job_id].status for job in ok} == {"ok"}
    # The pinned project's 88 stage-1 runs came in two pages of 50.
    assert wandb_server.operations.count("Runs") >= 4


def test_reconcile_arguments() -> None:
    args = parse_args(["stage=smoke", "--search-entity", "alice", "seed=1", "--search-entity",
                       "bob/proj"])
    assert args.search_entity == ["alice", "bob/proj"]
    assert args.overrides == ["stage=smoke", "seed=1"] and args.mode == "auto"
    assert search_paths(args.search_entity, ["p"]) == ["alice/p", "bob/proj"]
