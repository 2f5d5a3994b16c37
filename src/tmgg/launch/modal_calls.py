"""Detached Modal calls: call records beside the ledger, polling, folding and cancel.

A detached sweep (``hydra.launcher.detach=true``) returns once every job is spawned;
each job's call id is in the ledger and in ``experiments/<stage>/modal_calls/``.
``tmgg-sweep status`` folds finished calls into the ledger (``poll_detached``);
``tmgg-sweep cancel`` stops the rest (``cancel_main``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tmgg.launch.modal_results import (
    LAUNCHER,
    member_outputs,
    read_result_data,
    record_result,
    to_job_return,
)
from tmgg.launch.modal_settings import (
    MODAL_TOKEN_HELP,
    ModalSettings,
    modal_config_path,
    modal_credentials_available,
)
from tmgg.launch.modal_transport import LOCAL_CALL_PREFIX, local_call_arguments
from tmgg.launch.process_identity import ProcessIdentity, why_not_ours
from tmgg.orchestration.executor import JobFailure
from tmgg.orchestration.ledger import DISPATCHED, LOST, RUNNING, Ledger, atomic_write_json
from tmgg.orchestration.plan import PlannedJob
from tmgg.orchestration.records import utc_now
from tmgg.orchestration.sweep import ledger_for

log = logging.getLogger(__name__)

CALLS_DIR = "modal_calls"  # under experiments/<stage>/: one JSON per detached job
PENDING = object()


def local_calls_dir(ledger_root: Path) -> Path:
    return ledger_root / CALLS_DIR / "local"


def local_call_process(call_id: str, ledger_root: Path) -> ProcessIdentity | None:
    """The live process of a detached local call, proved to be it; None otherwise."""
    calls_dir = local_calls_dir(ledger_root)
    identity = ProcessIdentity.read(calls_dir / f"{call_id}.proc.json")
    if why_not_ours(identity, local_call_arguments(calls_dir, call_id)) is None:
        return identity
    return None


def poll_call(call_id: str, ledger_root: Path) -> Any:
    """The call's output (result data, pickled JobReturn or exception), or PENDING."""
    if call_id.startswith(LOCAL_CALL_PREFIX):
        calls_dir = local_calls_dir(ledger_root)
        out = calls_dir / f"{call_id}.out"
        if out.exists():
            return read_result_data(out)
        if local_call_process(call_id, ledger_root) is not None:
            return PENDING
        if out.exists():  # finished between the two checks
            return read_result_data(out)
        return JobFailure("ContainerCrashed", f"local call {call_id} ended without a result "
                          f"(see {calls_dir / (call_id + '.log')})", "")
    import modal

    try:
        return modal.FunctionCall.from_id(call_id).get(timeout=0)
    except TimeoutError as error:
        if isinstance(error, modal.exception.Error):  # a function timeout is a result
            return error
        return PENDING
    except Exception as error:  # noqa: BLE001 - the remote failure is the result
        return error


def call_in_flight(ledger: Ledger, call_id: str) -> bool:
    """Whether a detached call holding a job's claim still runs (then it is polled, never
    sent again). An ended call's result is folded into the ledger first, so the caller
    sees the job FINISHED or FAILED. Without Modal credentials a Modal call cannot be
    asked, and counts as running."""
    if not call_id.startswith(LOCAL_CALL_PREFIX) and not modal_credentials_available():
        return True
    if poll_call(call_id, ledger.root) is PENDING:
        return True
    poll_detached(ledger)
    return False


class CancelRefused(RuntimeError):
    """A call whose process cannot be proved to be the one tmgg started: not signalled."""


def cancel_call(call_id: str, ledger_root: Path) -> None:
    """Stop a call. A local call's process group is signalled only when the recorded
    process is proved to be the call (host, boot, start time and command line)."""
    if call_id.startswith(LOCAL_CALL_PREFIX):
        calls_dir = local_calls_dir(ledger_root)
        identity = ProcessIdentity.read(calls_dir / f"{call_id}.proc.json")
        reason = why_not_ours(identity, local_call_arguments(calls_dir, call_id))
        if reason is not None:
            raise CancelRefused(f"not signalled: {reason}")
        assert identity is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(identity.pid) == identity.pid:  # the call leads its own group
                os.killpg(identity.pid, signal.SIGTERM)
        return
    import modal

    modal.FunctionCall.from_id(call_id).cancel(terminate_containers=True)


def call_record_path(ledger_root: Path, job_id: str) -> Path:
    return ledger_root / CALLS_DIR / f"{job_id}.json"


def _job_from_call_record(record: dict[str, Any]) -> PlannedJob:
    task = record["task_config"]
    return PlannedJob(index=int(record.get("index", 0)), job_id=record["job_id"],
                      run_name=record["run_name"], stage=str(task["stage"]["name"]),
                      overrides=list(record.get("overrides") or []),
                      sweep_config=OmegaConf.create({}), task_config=task)


def poll_detached(ledger: Ledger) -> int:
    """Fold the results of finished detached calls into the ledger; how many were folded.

    Used by ``tmgg-sweep status``. Calls on Modal need credentials; without them they
    are left as they are (a warning says so).
    """
    folded = 0
    warned = False
    for state in ledger.states().values():
        if state.status not in (DISPATCHED, RUNNING, LOST) or not state.call_id:
            continue
        path = call_record_path(ledger.root, state.job_id)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("no call record for %s at %s; cannot fold its result",
                        state.run_name, path)
            continue
        if record.get("call_id") != state.call_id:
            continue
        if not state.call_id.startswith(LOCAL_CALL_PREFIX) and not modal_credentials_available():
            if not warned:
                print(MODAL_TOKEN_HELP.format(path=modal_config_path()).replace(
                    "Nothing was dispatched.", "Detached Modal calls were not polled."),
                    file=sys.stderr)
                warned = True
            continue
        output = poll_call(state.call_id, ledger.root)
        if output is PENDING:
            continue
        if record.get("member") is not None:  # one call ran this job's fused group
            output = member_outputs(output, int(record["group_size"]))[int(record["member"])]
        job = _job_from_call_record(record)
        settings = ModalSettings(**record["settings"])
        record_result(job, to_job_return(job, output), settings, record.get("volume_root"),
                call_id=state.call_id)
        folded += 1
    return folded


def cancel_main(argv: list[str]) -> int:
    """``tmgg-sweep cancel stage=...``: cancel a detached sweep's calls still running."""
    parser = argparse.ArgumentParser(
        prog="tmgg-sweep cancel",
        description="Cancel the detached Modal calls of a stage that have not finished "
                    "(finished ones are first folded into the ledger).")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides as for `tmgg-train -m`, e.g. stage=stage1")
    args = parser.parse_args(argv)
    from tmgg.orchestration.compose import stage_ledger

    ledger = stage_ledger(args.overrides)
    running = [s for s in ledger.states().values()
               if s.status in (DISPATCHED, RUNNING) and s.call_id]
    if any(not s.call_id.startswith(LOCAL_CALL_PREFIX) for s in running if s.call_id) \
            and not modal_credentials_available():
        print(MODAL_TOKEN_HELP.format(path=modal_config_path()).replace(
            "Nothing was dispatched.", "Nothing was cancelled."), file=sys.stderr)
        return 1
    poll_detached(ledger)
    cancelled = refused = 0
    # A fused group's members share one call: it is cancelled once, for all of them.
    by_call: dict[str, list[Any]] = {}
    for state in ledger.states().values():
        if state.status in (DISPATCHED, RUNNING) and state.call_id:
            by_call.setdefault(state.call_id, []).append(state)
    for call_id, states in by_call.items():
        names = ", ".join(state.run_name for state in states)
        try:
            cancel_call(call_id, ledger.root)
        except Exception as error:  # noqa: BLE001 - report and go on with the others
            print(f"could not cancel {names} ({call_id}): {error}", file=sys.stderr)
            refused += 1
            continue
        for state in states:
            ledger.append({"event": "cancelled", "time": utc_now(), "job_id": state.job_id,
                           "run_name": state.run_name, "launcher": LAUNCHER,
                           "call_id": call_id})
        cancelled += 1
        print(f"cancelled {names} ({call_id})")
    print(f"{cancelled} call(s) cancelled in stage {ledger.stage}"
          + (f", {refused} could not be" if refused else ""))
    return 1 if refused else 0


def write_call_record(job: PlannedJob, call_id: str, settings: ModalSettings,
                      root: str | None, member: int | None = None,
                      group_size: int | None = None) -> None:
    """What ``status`` needs to fold the call's result later, beside the ledger.

    A fused group's members share one call: ``member`` is the job's place in the
    group's payload (its result's place in the call's output), ``group_size`` the
    group's members.
    """
    if not job.is_tmgg_job:
        return
    path = call_record_path(ledger_for(job.task_config).root, job.job_id)
    atomic_write_json(path, {
        "member": member, "group_size": group_size,
        "job_id": job.job_id, "run_name": job.run_name, "index": job.index,
        "call_id": call_id, "dispatched_at": utc_now(), "overrides": list(job.overrides),
        "settings": dataclasses.asdict(settings), "volume_root": root,
        "task_config": job.task_config,
    })
