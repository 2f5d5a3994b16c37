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
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tmgg.jobs.ledger import DISPATCHED, LOST, RUNNING, Ledger, atomic_write_json
from tmgg.jobs.plan import PlannedJob
from tmgg.jobs.process_identity import ProcessIdentity, why_not_ours
from tmgg.jobs.records import utc_now
from tmgg.jobs.sweep import ledger_for
from tmgg.launch.modal.results import (
    LAUNCHER,
    group_returns,
    read_result_data,
    record_result,
    to_job_return,
)
from tmgg.launch.modal.settings import (
    MODAL_TOKEN_HELP,
    ModalSettings,
    modal_config_path,
    modal_credentials_available,
)
from tmgg.launch.modal.transport import (
    LOCAL_CALL_PREFIX,
    CallInFlight,
    client_error_cause,
    local_call_arguments,
)
from tmgg.run.executor import JobFailure

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
    """The call's output (result data, pickled JobReturn or the exception the call ended
    with), ``PENDING`` while it runs, or ``CallInFlight`` when the client could not ask
    (unknown id, credentials, connection, expired output): never the job's outcome."""
    if call_id.startswith(LOCAL_CALL_PREFIX):
        return _poll_local_call(call_id, ledger_root)
    import modal

    try:
        return modal.FunctionCall.from_id(call_id).get(timeout=0)
    except Exception as error:  # noqa: BLE001 - sorted below: the call's, or the client's
        return classify_poll_error(call_id, error)


def classify_poll_error(call_id: str, error: BaseException) -> Any:
    """What a ``FunctionCall.get(timeout=0)`` that raised ``error`` says about the call.

    modal 1.6.4 raises the builtin ``TimeoutError`` while the call runs (PENDING);
    ``modal.exception.TimeoutError`` subclasses (a function time-out) are results."""
    import modal

    if isinstance(error, TimeoutError) and not isinstance(error, modal.exception.Error):
        return PENDING
    cause = client_error_cause(error)
    if cause is not None:
        return CallInFlight(call_id, cause)
    return error


def _poll_local_call(call_id: str, ledger_root: Path) -> Any:
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


class LocalCall:
    """A detached local call with a ``modal.FunctionCall``'s surface (object_id, get,
    cancel): ``get`` raises the call's failure and the builtin ``TimeoutError`` when
    ``timeout`` passes first, as Modal's does."""

    def __init__(self, call_id: str, ledger_root: Path) -> None:
        self.object_id = call_id
        self.ledger_root = ledger_root

    def get(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            output = _poll_local_call(self.object_id, self.ledger_root)
            if output is not PENDING:
                if isinstance(output, BaseException):
                    raise output
                return output
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError()
            time.sleep(0.2)

    def cancel(self, terminate_containers: bool = False) -> None:
        cancel_call(self.object_id, self.ledger_root)


class LocalFunction:
    """Detached local calls with a ``modal.Function``'s ``spawn`` (``local_calls=true``)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner  # modal_transport._LocalRunner, whose spawn starts a call
        self.ledger_root = Path(runner.calls_dir).parent.parent

    def spawn(self, *args: Any) -> LocalCall:
        return LocalCall(self.runner.spawn(tuple(args)), self.ledger_root)

    @staticmethod
    def call_from_id(calls_dir: Path) -> Any:
        """``FunctionCall.from_id`` for this stage's local calls."""
        ledger_root = Path(calls_dir).parent.parent
        return lambda call_id: LocalCall(call_id, ledger_root)


def call_in_flight(ledger: Ledger, call_id: str) -> bool:
    """Whether a detached call holding a job's claim still runs (then it is polled, never
    sent again). An ended call's result is folded into the ledger first, so the caller
    sees the job FINISHED or FAILED. A call that cannot be asked (no credentials, no
    connection, unknown to this Modal profile, output expired) counts as running."""
    if not call_id.startswith(LOCAL_CALL_PREFIX) and not modal_credentials_available():
        return True
    output = poll_call(call_id, ledger.root)
    if output is PENDING or isinstance(output, CallInFlight):  # may run: never sent again
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
        if isinstance(output, CallInFlight):  # the client's trouble, not the job's outcome
            note_in_flight(path, record, state.run_name, output)
            continue
        job = _job_from_call_record(record)
        settings = ModalSettings(**record["settings"])
        root = record.get("volume_root")
        if record.get("member") is not None:  # one call ran this job's fused group
            member, size = int(record["member"]), int(record["group_size"])
            result = group_returns([job] * size, output, settings, root)[member]
        else:
            result = to_job_return(job, output)
        record_result(job, result, settings, root, call_id=state.call_id,
                      ticket=record.get("ticket"))
        folded += 1
    return folded


def note_in_flight(path: Path, record: dict[str, Any], run_name: str,
                   unreachable: CallInFlight) -> None:
    """Say why a call was not collected, on the console and in its call record; the job
    stays in flight (its claim names the call) and the next ``status`` polls again."""
    print(f"{run_name}: still in flight, call {unreachable.call_id} not collected: "
          f"{unreachable.cause}", file=sys.stderr)
    atomic_write_json(path, {**record, "last_poll": {"time": utc_now(), "collected": False,
                                                     "cause": unreachable.cause}})


def cancel_main(argv: list[str]) -> int:
    """``tmgg-sweep cancel stage=...``: cancel a detached sweep's calls still running."""
    parser = argparse.ArgumentParser(
        prog="tmgg-sweep cancel",
        description="Cancel the detached Modal calls of a stage that have not finished "
                    "(finished ones are first folded into the ledger).")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides as for `tmgg-train -m`, e.g. stage=stage1")
    args = parser.parse_args(argv)
    from tmgg.jobs.compose import stage_ledger

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
                      group_size: int | None = None, ticket: str | None = None) -> None:
    """What ``status`` needs to fold the call's result later, beside the ledger.

    A fused group's members share one call: ``member`` is the job's place in the
    group's payload (its result's place in the call's output), ``group_size`` the
    group's members. ``ticket``: the launcher's claim ticket, which fences the folded
    outcome (refused once another dispatch holds a newer generation).
    """
    if not job.is_tmgg_job:
        return
    path = call_record_path(ledger_for(job.task_config).root, job.job_id)
    atomic_write_json(path, {
        "member": member, "group_size": group_size,
        "job_id": job.job_id, "run_name": job.run_name, "index": job.index,
        "call_id": call_id, "ticket": ticket, "dispatched_at": utc_now(),
        "overrides": list(job.overrides),
        "settings": dataclasses.asdict(settings), "volume_root": root,
        "task_config": job.task_config,
    })
