"""Tests written against bugs planted by hand in the core (issue 25): each one fails when
its bug is put back. The bug each test catches is named in its docstring.

- a stacked bank applying member 0's weight decay, clip or betas to every member;
- the ledger gluing an append to a torn line (its layout on disk, not only its reading);
- ``append_many`` without its lock (concurrent appenders racing a torn tail) or fsync;
- ``tmgg-sweep sync`` exiting 0 when an upload failed;
- the W&B guard comparing the project but not the entity (end to end, entity only);
- reconcile calling every job ok (the superseded case with a negative row).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from tmgg.jobs.ledger import Ledger

# --------------------------------------------------------------------------- stacked bank


def _bank_members() -> list[dict[str, Any]]:
    """Four members of one bank, each with its own hyper-parameters (one plain Adam: its
    weight decay is an L2 term in the gradient, not a decoupled decay)."""
    import torch

    return [
        dict(kind=torch.optim.AdamW, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.999),
             eps=1e-8, clip=0.0),
        dict(kind=torch.optim.AdamW, lr=2e-2, weight_decay=0.3, betas=(0.8, 0.99),
             eps=1e-6, clip=0.5),
        dict(kind=torch.optim.AdamW, lr=5e-2, weight_decay=0.05, betas=(0.5, 0.9),
             eps=1e-8, clip=3.0),
        dict(kind=torch.optim.Adam, lr=3e-2, weight_decay=0.2, betas=(0.7, 0.95),
             eps=1e-7, clip=0.0),
    ]


def _optimiser(model: Any, spec: dict[str, Any]) -> Any:
    return spec["kind"](model.parameters(), lr=spec["lr"], betas=spec["betas"],
                        eps=spec["eps"], weight_decay=spec["weight_decay"])


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / 3)


def _inputs(steps: int, members: int) -> Any:
    import torch

    generator = torch.Generator().manual_seed(7)
    return torch.randn(steps, members, 16, 5, generator=generator) * 3


def _loss(output: Any) -> Any:
    return (output ** 2).mean() * 10  # large gradients: clipping at 0.5 and 3.0 bites


def test_stacked_bank_members_with_their_own_decay_clip_and_betas_match_their_solo_runs(
        ) -> None:
    """Planted bug: the bank uses member 0's weight decay, clip or betas for every
    member (``self.weight_decay = [wd0] * M`` and so on in ``StackedBank.__init__``)."""
    import torch
    from torch.func import functional_call

    from tmgg.task.stacked_optim import StackedBank

    torch.manual_seed(0)
    template = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                   torch.nn.Linear(7, 3))
    specs = _bank_members()
    steps = 6
    inputs = _inputs(steps, len(specs))

    solo_models = []
    for j, spec in enumerate(specs):
        model = copy.deepcopy(template)
        optimizer = _optimiser(model, spec)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup)
        for step in range(steps):
            optimizer.zero_grad()
            _loss(model(inputs[step, j])).backward()
            if spec["clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
            optimizer.step()
            schedule.step()
        solo_models.append((model, optimizer))

    models = [copy.deepcopy(template) for _ in specs]
    optimizers = [_optimiser(m, s) for m, s in zip(models, specs, strict=True)]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, _warmup) for o in optimizers]
    bank = StackedBank(list(range(len(specs))), models, optimizers, schedules,
                       [s["clip"] for s in specs])
    for step in range(steps):
        bank.zero_grad()
        total = sum(_loss(functional_call(template, {name: bank.params[name][j]
                                                     for name in bank.names},
                                          (inputs[step, j],)))
                    for j in range(len(specs)))
        total.backward()
        bank.clip_gradients()
        bank.optimizer_step()
    bank.write_back()

    for j, ((solo, solo_optimizer), stacked) in enumerate(zip(solo_models, models,
                                                              strict=True)):
        for (name, expected), actual in zip(solo.named_parameters(), stacked.parameters(),
                                            strict=True):
            difference = float((expected - actual).detach().abs().max())
            assert difference < 1e-5, (j, name, difference)
            state = solo_optimizer.state[expected]
            stacked_state = optimizers[j].state[actual]
            assert float((state["exp_avg_sq"] - stacked_state["exp_avg_sq"]).abs().max()) < 1e-5
        assert optimizers[j].param_groups[0]["lr"] == pytest.approx(
            solo_optimizer.param_groups[0]["lr"])
    # The members really differ: the same start, four different end points.
    ends = [torch.cat([p.flatten() for p in m.parameters()]) for m in models]
    assert min(float((ends[a] - ends[b]).abs().max())
               for a in range(len(ends)) for b in range(a + 1, len(ends))) > 1e-3


# --------------------------------------------------------------------------- the ledger


def _event(number: int, writer: str = "t") -> dict[str, Any]:
    return {"event": "planned", "job_id": f"{writer}-{number:04d}", "run_name": f"job_{number}",
            "overrides": [f"seed={number}"], "time": "2026-01-01T00:00:00.000+00:00"}


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, sort_keys=True).encode()


def test_an_append_after_a_torn_line_starts_a_line_of_its_own_on_disk(tmp_path: Path) -> None:
    """Planted bug: ``append_many`` no longer closes a torn line before writing (the
    ``_ends_mid_line`` check). Reading still recovers the glued event, so only the bytes
    on disk show it."""
    ledger = Ledger(tmp_path, "smoke")
    ledger.append_many([_event(1), _event(2)])
    whole = ledger.events_path.read_bytes()
    torn = whole[:-25]
    ledger.events_path.write_bytes(torn)
    ledger.append_many([_event(3), _event(4)])

    lines = ledger.events_path.read_bytes().split(b"\n")
    assert lines == [_line(_event(1)), torn.split(b"\n")[1], _line(_event(3)),
                     _line(_event(4)), b""]
    assert [number for number, _ in ledger.damaged_lines()] == [2]


# One process of the race: appends its events one call at a time once the go file exists.
APPENDER = textwrap.dedent("""
    import os, sys, time
    from tmgg.jobs.ledger import Ledger
    root, writer, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    while not os.path.exists(go):
        time.sleep(0.005)
    ledger = Ledger(root, "smoke")
    for number in range(count):
        ledger.append({"event": "planned", "job_id": f"{writer}-{number:04d}",
                       "run_name": f"job_{number}", "overrides": [f"seed={number}"],
                       "time": "2026-01-01T00:00:00.000+00:00"})
    open(os.path.join(root, f"done-{writer}"), "w").close()
""")

# The writer that dies inside append_many: it writes its first 9 bytes, opens the gate,
# waits until every appender is done (or 2 s: with the lock they wait for it), writes 9
# more bytes and dies (os._exit: its lock goes with it), its line torn.
DYING_WRITER = textwrap.dedent("""
    import os, sys, time
    from tmgg.jobs.ledger import Ledger
    root, go, appenders = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_write = os.write
    pieces = []
    def dribble(fd, data):
        if pieces:
            real_write(fd, bytes(data[:9]))
            os._exit(1)
        pieces.append(real_write(fd, bytes(data[:9])))
        open(go, "w").close()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if len([n for n in os.listdir(root) if n.startswith("done-")]) == appenders:
                break
            time.sleep(0.01)
        return pieces[0]
    os.write = dribble
    Ledger(root, "smoke").append_many([{"event": "planned", "job_id": "dying-0000",
                                        "run_name": "dying", "overrides": []}])
""")


def test_concurrent_appenders_racing_a_torn_tail_each_get_whole_lines(tmp_path: Path) -> None:
    """Planted bug: ``append_many`` without its lock (and fsync). A writer dies midway
    through its append while three others append: with the lock they wait for it and
    then start a fresh line; without it their events land inside its torn line."""
    ledger = Ledger(tmp_path, "smoke")
    ledger.append(_event(0, "first"))
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    writers = ["a", "b", "c"]
    count = 15
    appenders = [subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path), writer,
                                   str(count), str(go)], env=env) for writer in writers]
    dying = subprocess.Popen([sys.executable, "-c", DYING_WRITER, str(tmp_path), str(go),
                              str(len(writers))], env=env)
    assert dying.wait(timeout=120) == 1
    for process in appenders:
        assert process.wait(timeout=120) == 0

    lines = [line for line in ledger.events_path.read_bytes().split(b"\n") if line]
    whole = [json.loads(line) for line in lines if line.startswith(b"{") and
             line.endswith(b"}") and b"dying" not in line]
    assert sorted(event["job_id"] for event in whole) == sorted(
        ["first-0000"] + [f"{w}-{n:04d}" for w in writers for n in range(count)])
    # The dying writer's two pieces form the one damaged line; nothing else is.
    assert [text for _, text in ledger.damaged_lines()] == ['{"event": "planned']
    assert len(lines) == 1 + 1 + len(writers) * count


def test_append_many_makes_its_lines_durable(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted bug: ``append_many`` without its fsync (a power cut loses events the
    launcher has already acted on). The ledger file's descriptor is synced before
    close."""
    ledger = Ledger(tmp_path, "smoke")
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    ledger.append_many([_event(1), _event(2)])
    assert synced == [ledger.events_path.stat().st_ino]


# --------------------------------------------------------------------------- W&B


TINY = ["stage=smoke", "model=linear_pe", "seed=1", "trainer.max_steps=2",
        "trainer.val_check_interval=1", "data.val_samples=20", "data.test_samples=20"]


def _dirs(root: Path) -> list[str]:
    return [f"experiments_dir={root / 'exp'}", f"outputs_dir={root / 'out'}"]


def _run_module(root: Path, module: str, args: list[str], env: dict[str, str]
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args, *_dirs(root)], cwd=root,
                          text=True, capture_output=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def offline_run(wandb_server: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[Path, list[str]]:
    """One tiny job that logged offline, pinned to the test server: a run to upload."""
    from wandb_server.fixtures import online_env

    root = tmp_path_factory.mktemp("offline_run")
    args = [*TINY, "logger.mode=offline", "logger.project=sync_refused",
            f"logger.base_url={wandb_server.base_url}"]
    ran = _run_module(root, "tmgg.cli.app", args, online_env(root, None))
    assert ran.returncode == 0, ran.stderr[-3000:]
    return root, args


@pytest.mark.slow
def test_sync_exits_non_zero_when_the_uploader_fails(wandb_server: Any,
                                                     offline_run: tuple[Path, list[str]]
                                                     ) -> None:
    """Planted bug: ``tmgg-sweep sync`` ignores a failed upload and exits 0. Here nothing
    can upload (no API key anywhere, no terminal to ask for one): refused, naming the job."""
    from wandb_server.fixtures import online_env

    root, args = offline_run
    env = online_env(root, None, NETRC=str(root / "no-netrc"), HOME=str(root / "home"))
    synced = subprocess.run([sys.executable, "-m", "tmgg.cli.tmgg_sweep", "sync", *args,
                             *_dirs(root)], cwd=root, text=True, capture_output=True,
                            env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert synced.returncode != 0, synced.stdout[-2000:] + synced.stderr[-2000:]
    assert "nothing uploaded to graph_denoise_team/sync_refused" in synced.stderr
    assert "smoke_linear_pe_lr1e-3_wd1e-2_k8_s1" in synced.stderr
    assert not wandb_server.runs_in(project="sync_refused")


@pytest.mark.slow
def test_sync_exits_non_zero_when_the_server_refuses_the_upload(
        wandb_server: Any, offline_run: tuple[Path, list[str]]) -> None:
    """The key's user (mallory) may not write to the stage's entity: nothing is uploaded,
    so sync must not exit 0."""
    from wandb_server.fixtures import online_env, user

    root, args = offline_run
    mallory = user(wandb_server, "mallory").api_key
    synced = _run_module(root, "tmgg.cli.tmgg_sweep", ["sync", *args],
                         online_env(root, mallory))
    assert not wandb_server.runs_in(project="sync_refused")
    assert synced.returncode != 0, synced.stdout[-2000:] + synced.stderr[-2000:]


def test_an_entity_only_misroute_is_refused_end_to_end_before_the_first_step(
        tmp_path: Path) -> None:
    """Planted bug: the W&B guard compares the live run's project with the pinned one
    but not its entity. Here only the entity is wrong (the key's personal entity, the
    stage-1 incident), the project is the pinned one."""
    from test_wandb_guard import TINY as GUARD_TINY
    from test_wandb_guard import job_dirs, job_records, run_app

    steps = tmp_path / "steps.txt"
    result = run_app(tmp_path, [*GUARD_TINY, "seed=1"], script=True, TEST_MISROUTE="1",
                     TEST_STEPS_FILE=str(steps), WANDB_ENTITY="someone_personal",
                     WANDB_PROJECT="spectral_denoising")
    assert result.returncode != 0
    expected = ("W&B run resolved to someone_personal/spectral_denoising, job is pinned to "
                "graph_denoise_team/spectral_denoising")
    assert expected in result.stderr
    (record,) = job_records(tmp_path).values()
    assert record["status"] == "FAILED" and expected in record["error"]
    assert not steps.exists(), "a training step ran"
    (directory,) = job_dirs(tmp_path)
    assert not (directory / "metrics.json").exists()


def test_reconcile_of_a_superseded_job_still_reports_the_current_jobs_problems(
        tmp_path: Path) -> None:
    """Planted bug: reconcile judges every job ok. The superseded case's negative rows:
    the earlier config's run is at the pinned destination under the same name, yet the
    current job's own run is missing (or it failed), and reconcile must say so."""
    from test_identity import _Run, _Runs

    from tmgg.cli.reconcile import reconcile_jobs
    from tmgg.config.identity import wandb_run_id
    from tmgg.jobs.compose import compose_sweep
    from tmgg.jobs.ledger import FAILED, FINISHED, JobState

    (job,) = compose_sweep(["stage=smoke", "model=linear_pe", "seed=1",
                            f"experiments_dir={tmp_path}"]).jobs
    old = JobState(job_id="smoke-0123456789", run_name=job.run_name, status=FINISHED,
                   overrides=list(job.overrides),
                   record={"wandb": {"run_id": wandb_run_id("smoke-0123456789")}})
    old_run = _Run(wandb_run_id(old.job_id), job.run_name)
    own_run = _Run(wandb_run_id(job.job_id), job.run_name)

    def verdict(status: str, runs: list[Any], error: str = "") -> tuple[str, str]:
        current = JobState(job_id=job.job_id, run_name=job.run_name, status=status,
                           record={"error": error} if error else {})
        (row,) = reconcile_jobs([job], {old.job_id: old, job.job_id: current}, "smoke",
                                mode="online", api=_Runs(runs))
        return row.status, row.detail

    assert verdict(FINISHED, [old_run, own_run])[0] == "ok"
    status, detail = verdict(FINISHED, [old_run])
    assert status == "missing" and "no run of this job was found at graph_denoise_team/" in detail
    status, detail = verdict(FAILED, [old_run, own_run], "RuntimeError: out of memory")
    assert status == "failed" and "out of memory" in detail
    # A third run under the job's name, of neither config, is still a duplicate.
    stray = _Run("strayrun0001", job.run_name)
    assert verdict(FINISHED, [old_run, own_run, stray])[0] == "duplicated"


def test_composing_in_process_leaves_hydras_global_state_as_it_was(tmp_path: Path) -> None:
    """The known order dependence: a composition left HydraConfig set (a job run later
    in the process took the master's output dir) and the version base at 1.3 (a later
    ``@hydra.main`` of another version base behaved differently). Fixed where it arises,
    in ``compose.hydra_session``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.version import VersionBase

    from tmgg.jobs.compose import compose_sweep
    from tmgg.task.train import job_output_dir

    before = VersionBase.instance().getbase()
    (job,) = compose_sweep(["stage=smoke", "model=linear_pe", "seed=1",
                            f"outputs_dir={tmp_path}/out", f"experiments_dir={tmp_path}"]).jobs
    assert not HydraConfig.initialized()
    assert VersionBase.instance().getbase() == before
    from omegaconf import OmegaConf

    assert job_output_dir(OmegaConf.create(job.task_config)) == (
        tmp_path / "out" / "smoke" / job.run_name)


# --------------------------------------------------------------------------- the fold
# Mutation survivors of ledger.py (``make mutate``): how events and job records fold into
# one state per job, and the files' exact layout, asserted in-process.


def _fold(tmp_path: Path, events: list[dict[str, Any]],
          records: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    ledger = Ledger(tmp_path, "s")
    ledger.append_many(events)
    for job_id, record in (records or {}).items():
        ledger.write_job_record(job_id, record)
    return ledger._fold()  # the fold alone: no claims are consulted


def test_events_fold_into_one_state_per_job(tmp_path: Path) -> None:
    from tmgg.jobs.ledger import CANCELLED, DISPATCHED, FINISHED, PLANNED

    states = _fold(tmp_path, [
        {"event": "planned", "job_id": "a", "run_name": "ra", "overrides": ["x=1"]},
        {"event": "planned", "job_id": "b", "run_name": "rb", "overrides": ["x=2"]},
        {"event": "planned", "job_id": "c", "run_name": "rc"},
        {"event": "planned", "job_id": "d", "run_name": "rd"},
        {"event": "dispatched"},  # no job: ignored
        {"event": "dispatched", "job_id": "b", "call_id": "fc-1"},
        {"event": "dispatched", "job_id": "b"},  # a retry without a call keeps the call
        {"event": "dispatched", "job_id": "c", "call_id": "fc-2"},
        {"event": "outcome", "job_id": "c", "status": FINISHED, "duration_s": 3.5,
         "metrics": {"test/mse": 0.25}, "error": None},
        {"event": "outcome", "job_id": "c", "note": "no status: the status stays"},
        {"event": "cancelled", "job_id": "d"},
        {"event": "planned", "job_id": "a", "overrides": ["x=9"]},
        {"event": "planned", "job_id": "b", "overrides": ["x=3"]},
        {"event": "outcome", "job_id": "e"},  # never planned: MISSING, with its record
    ])
    assert list(states) == ["a", "b", "c", "d", "e"]  # plan order
    a, b, c, d, e = states.values()
    assert (a.status, a.run_name, a.overrides, a.call_id) == (PLANNED, "ra", ["x=9"], None)
    assert a.plan == {"event": "planned", "job_id": "a", "overrides": ["x=9"]}
    assert (b.status, b.call_id, b.overrides) == (DISPATCHED, "fc-1", ["x=3"])
    assert (c.status, c.call_id) == (FINISHED, "fc-2")
    assert c.record["note"] == "no status: the status stays"
    assert (c.duration_s, c.metrics, c.error) == (3.5, {"test/mse": 0.25}, None)
    assert d.status == CANCELLED and d.run_name == "rd"
    assert (e.status, e.run_name, e.overrides) == ("MISSING", "", [])
    assert (a.metrics, a.duration_s, a.error, a.claim, a.superseded_by) == (
        {}, None, None, None, None)


def test_supersede_events_and_a_new_plan_of_the_same_job(tmp_path: Path) -> None:
    states = _fold(tmp_path, [
        {"event": "planned", "job_id": "a", "run_name": "ra"},
        {"event": "planned", "job_id": "b", "run_name": "rb"},
        {"event": "superseded", "job_id": "a", "by": "a2"},
        {"event": "superseded", "job_id": "b"},
        {"event": "superseded", "job_id": "c", "by": "c2"},
        {"event": "planned", "job_id": "c", "run_name": "rc"},  # current again
    ])
    assert {job_id: s.superseded_by for job_id, s in states.items()} == {
        "a": "a2", "b": "?", "c": None}


def test_a_jobs_own_record_is_the_truth_except_a_stale_running(tmp_path: Path) -> None:
    from tmgg.jobs.ledger import DISPATCHED, FAILED, FINISHED, PLANNED, RUNNING

    planned = [{"event": "planned", "job_id": j, "run_name": f"r{j}"} for j in "abcdefg"]
    states = _fold(tmp_path, [
        *planned,
        {"event": "dispatched", "job_id": "a"},
        {"event": "dispatched", "job_id": "b"},
        {"event": "dispatched", "job_id": "c"},
        {"event": "outcome", "job_id": "d", "status": FAILED},
        {"event": "cancelled", "job_id": "f"},
        {"event": "outcome", "job_id": "g", "status": RUNNING},
    ], {
        "a": {"job_id": "a", "status": RUNNING},  # running now: RUNNING
        "b": {"job_id": "b", "status": FINISHED, "metrics": {"m": 1}},  # ended: FINISHED
        "d": {"job_id": "d", "status": RUNNING},  # stale, after its outcome
        "e": {"job_id": "e"},  # no status: damaged (fence's schema), planned stays planned
        "f": {"job_id": "f", "status": RUNNING},  # stale, after a cancel
        "g": {"job_id": "g", "status": FINISHED},
        "h": {"job_id": "h", "run_name": "rh", "status": FAILED, "overrides": ["y=1"]},
        # A record without an id has the wrong shape for the typed schema (branch fence):
        # it is damaged, left out of the fold, and named, never trusted under its file's name.
        "other": {"status": FINISHED},
    })
    status = {job_id: s.status for job_id, s in states.items()}
    assert status == {"a": RUNNING, "b": FINISHED, "c": DISPATCHED, "d": FAILED,
                      "e": PLANNED, "f": "CANCELLED", "g": FINISHED, "h": FAILED}
    damaged = Ledger(tmp_path, "s").damaged_files()
    assert [d.path.name for d in damaged] == ["e.json", "other.json"]
    assert "status" in damaged[0].reason and "job_id" in damaged[1].reason
    assert states["b"].metrics == {"m": 1}
    assert states["d"].record == {"job_id": "d", "status": RUNNING}  # the record wins
    assert (states["h"].run_name, states["h"].overrides) == ("rh", ["y=1"])


def test_the_ledgers_files_and_their_exact_layout(tmp_path: Path) -> None:
    import stat

    ledger = Ledger(tmp_path, "s")
    assert ledger.root == tmp_path / "s" and ledger.stage == "s"
    assert ledger.events_path == tmp_path / "s" / "ledger.jsonl"
    assert ledger.jobs_dir == tmp_path / "s" / "jobs"
    assert ledger.plan_path == tmp_path / "s" / "plan.json"
    ledger.append_many([])
    assert not ledger.events_path.exists()  # nothing to append: no file
    assert ledger.plan() is None and ledger.job_record("a") is None
    assert ledger.job_records() == {} and ledger.damaged_lines() == []
    ledger.append({"job_id": "a", "event": "planned", "when": Path("/x")})
    assert ledger.events_path.read_text() == (
        '{"event": "planned", "job_id": "a", "when": "/x"}\n')  # sorted keys, str()
    assert stat.S_IMODE(ledger.events_path.stat().st_mode) == 0o644

    # A plan of the typed schema's shape (branch fence: a stage, jobs with their ids).
    ledger.write_plan({"stage": "s", "jobs": [{"job_id": "a"}], "when": Path("/y")})
    assert ledger.plan_path.read_text() == (
        '{\n  "stage": "s",\n  "jobs": [\n    {\n      "job_id": "a"\n    }\n  ],\n'
        '  "when": "/y"\n}\n')  # indented, str()
    assert stat.S_IMODE(ledger.plan_path.stat().st_mode) == 0o644
    assert ledger.plan() == {"stage": "s", "jobs": [{"job_id": "a"}], "when": "/y"}
    ledger.write_plan({"jobs": [1], "when": Path("/y")})  # the wrong shape: damaged
    assert ledger.plan() is None
    assert [d.path.name for d in ledger.damaged_files()] == ["plan.json"]
    ledger.write_plan({"stage": "s", "jobs": [{"job_id": "a"}], "when": Path("/y")})
    ledger.write_job_record("a", {"job_id": "a", "status": "FINISHED"})
    assert ledger.is_finished("a") and not ledger.is_finished("b")
    ledger.write_job_record("b", {"job_id": "b", "status": "FAILED"})
    assert not ledger.is_finished("b")
    (ledger.jobs_dir / "c.json").write_text("{torn")  # unreadable: left out
    (ledger.jobs_dir / "notes.txt").write_text("{}")  # not a record
    assert sorted(ledger.job_records()) == ["a", "b"]
    assert ledger.job_record("c") is None
    assert sorted(p.name for p in ledger.jobs_dir.iterdir()) == [
        "a.json", "b.json", "c.json", "notes.txt"]  # no temporary file left behind
    ledger.plan_path.write_text("[1, ")
    assert ledger.plan() is None


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(
        tmp_path: Path) -> None:
    from tmgg.jobs.ledger import atomic_write_json

    target = tmp_path / "new" / "dir" / "record.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {1j: 2})  # a key JSON cannot write
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]


def test_blank_lines_are_skipped_and_a_non_object_line_is_damaged(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "s")
    ledger.root.mkdir(parents=True)
    lines = [json.dumps(_event(1)), "", "   ", "[1, 2]", "7", "x" * 100,
             "garbage " + json.dumps(_event(2)), json.dumps(_event(3))]
    ledger.events_path.write_text("\n".join(lines) + "\n")
    assert [e["job_id"] for e in ledger.events()] == ["t-0001", "t-0002", "t-0003"]
    assert ledger.damaged_lines() == [(4, "[1, 2]"), (5, "7"), (6, "x" * 80),
                                      (7, ("garbage " + json.dumps(_event(2)))[:80])]
