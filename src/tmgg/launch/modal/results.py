"""Jobs on the Modal volume, and a transport's outputs as JobReturns and ledger records.

Shared by the blocking launcher (``modal_dispatch``) and by the folding of detached
calls (``modal_calls``): the job as sent (outputs, checkpoints and records under the
volume), and what comes back (a pickled JobReturn or an exception) recorded here,
since the job wrote its own record remotely. A result kept on disk (a detached local
call's ``.out``) is plain JSON data (``result_data``), never a pickle: files under
``experiments/`` are shared, and reading one must not run code (DESIGN.md contract 7).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from omegaconf import open_dict, read_write

from tmgg.jobs.plan import PlannedJob
from tmgg.jobs.sweep import (
    CLAIM_TICKET,
    OUTCOME_RECORDED,
    ledger_for,
    record_outcome,
    skipped_value,
)
from tmgg.launch.modal.settings import ModalSettings
from tmgg.run.executor import JobFailure, deserialize

LAUNCHER = "modal"


def volume_root(settings: ModalSettings) -> str | None:
    """Where the volume is seen by a job: Modal's mount, a local stand-in, or None."""
    if settings.transport == "modal":
        from tmgg.launch.modal.app import VOLUME_MOUNT

        return VOLUME_MOUNT
    if settings.local_volume_dir:
        return str(Path(settings.local_volume_dir).resolve())
    return None


def on_volume(job: PlannedJob, root: str | None) -> PlannedJob:
    """The job as sent: outputs, checkpoints and its own records under the volume.

    The output folder keeps its job-id-derived leaf (hydra.sweep.subdir), so every
    attempt of a job finds the previous attempt's checkpoints.
    """
    if root is None or not job.is_tmgg_job:
        return job
    config = copy.deepcopy(job.sweep_config)
    with read_write(config), open_dict(config):
        config.outputs_dir = f"{root}/outputs"
        config.experiments_dir = f"{root}/experiments"
    with read_write(config.hydra), read_write(config.hydra.sweep):
        config.hydra.sweep.dir = f"{root}/outputs/{job.stage}"
    return dataclasses.replace(job, sweep_config=config)


def _output_dir(result: Any) -> str | None:
    hydra_cfg = getattr(result, "hydra_cfg", None)
    try:
        return str(hydra_cfg.hydra.runtime.output_dir) if hydra_cfg is not None else None
    except Exception:  # noqa: BLE001 - a missing runtime node only loses a detail
        return None


def record_result(job: PlannedJob, result: Any, settings: ModalSettings, root: str | None,
                  call_id: str | None = None, ticket: str | None = None) -> None:
    """Outcome event plus the job's record, written here: the job wrote its own remotely.

    ``ticket``: the ticket of the launcher's claim of the dispatch (the fencing token):
    nothing is written once another dispatch holds a newer generation of the job's claim.
    """
    if not job.is_tmgg_job:
        return
    ledger = ledger_for(job.task_config)
    before = ledger.job_record(job.job_id) or {}
    if skipped_value(result) is not None:  # not run: a skipped event, no record
        record_outcome(job, result, LAUNCHER)
        return
    if not record_outcome(job, result, LAUNCHER, write_job_record=True,
                          ticket=ticket):
        return  # fenced off: the job is another dispatch's now
    record = ledger.job_record(job.job_id) or {}
    if before.get("status") == record.get("status") and before.get("started_at"):
        # transport=local on this disk: the job's own record had its timing and attempts.
        for key in ("started_at", "attempts", "output_dir", "platform"):
            if record.get(key) is None:
                record[key] = before.get(key)
    output_dir = _output_dir(result) or record.get("output_dir")
    record["output_dir"] = output_dir
    modal_info: dict[str, Any] = {"transport": settings.transport, "gpu": settings.gpu,
                                  "volume": settings.volume, "call_id": call_id}
    prefix = f"{root.rstrip('/')}/" if root else None
    if prefix and output_dir and output_dir.startswith(prefix):
        modal_info["volume_path"] = output_dir[len(prefix):]
    record["modal"] = modal_info
    ledger.write_job_record(job.job_id, record)


def to_job_return(job: PlannedJob, output: Any) -> Any:
    """A transport's output (pickled JobReturn, result data, or an exception) as a JobReturn."""
    from hydra.core.utils import JobReturn, JobStatus

    if isinstance(output, dict):
        return job_return_from_data(job, output)
    if isinstance(output, JobReturn):  # a fused group's member, unpickled with its group
        return output
    if isinstance(output, bytes | bytearray):
        try:
            return deserialize(bytes(output))
        except Exception as error:  # noqa: BLE001 - becomes a FAILED job
            output = error
    if not isinstance(output, BaseException):
        output = RuntimeError(f"unexpected result from the remote function: {output!r}")
    failed = JobReturn(overrides=list(job.overrides), status=JobStatus.FAILED)
    failed.return_value = JobFailure.from_exception(output)
    return failed


def member_outputs(output: Any, members: int) -> list[Any]:
    """A fused group's call output split per member (payload order), each as
    ``to_job_return`` takes it: the pickled list of JobReturns from the container, its
    result data (``result_data`` of a list), or one failure for every member."""
    if isinstance(output, bytes | bytearray):
        try:
            output = deserialize(bytes(output))
        except Exception as error:  # noqa: BLE001 - every member fails with it
            output = error
    if isinstance(output, dict) and output.get("format") == RESULT_FORMAT \
            and isinstance(output.get("members"), list):
        output = output["members"]
    if isinstance(output, list):
        if len(output) == members:
            return output
        output = RuntimeError(f"a fused group of {members} jobs returned {len(output)} results")
    return [output] * members


def group_returns(task_jobs: list[PlannedJob], output: Any, settings: ModalSettings,
                  root: str | None) -> list[Any]:
    """A container call's output as one JobReturn per job of its task (payload order).

    A group's call returns its members' results. A call that failed as a whole (its
    container lost after the last retry, a time-out) fails only the members that had
    not finished: a member whose own record on the volume says FINISHED keeps it.
    """
    if len(task_jobs) == 1:
        return [to_job_return(task_jobs[0], output)]
    split = member_outputs(output, len(task_jobs))
    first = split[0]
    whole_call_failed = all(item is first for item in split) and (
        isinstance(first, BaseException)
        or (isinstance(first, dict) and "members" not in first
            and first.get("status") == "FAILED"))
    results = []
    for job, value in zip(task_jobs, split, strict=True):
        record = finished_record(job, settings, root) if whole_call_failed else None
        if record is not None:
            results.append(job_return_from_data(job, {
                "status": "COMPLETED", "metrics": record.get("metrics"),
                "output_dir": record.get("output_dir"),
                "duration_s": record.get("duration_s")}))
        else:
            results.append(to_job_return(job, value))
    return results


def finished_record(job: PlannedJob, settings: ModalSettings, root: str | None
                    ) -> dict[str, Any] | None:
    """The job's own record where its container wrote it, if it says FINISHED; else None.

    On Modal it is read from the volume (``Volume.read_file``), with transport=local
    from the stand-in volume directory or, without one, from this ledger. Read as data
    (JSON, checked), never trusted further than its status, job id and metrics."""
    if not job.is_tmgg_job:
        return None
    relative = f"experiments/{job.stage}/jobs/{job.job_id}.json"
    try:
        if settings.transport == "modal":
            import modal

            volume = modal.Volume.from_name(settings.volume)
            text = b"".join(volume.read_file(relative)).decode()
        elif root:
            text = (Path(root) / relative).read_text()
        else:
            text = (ledger_for(job.task_config).jobs_dir / f"{job.job_id}.json").read_text()
        record = json.loads(text)
    except Exception:  # noqa: BLE001 - no readable record: the member failed with its call
        return None
    if not isinstance(record, dict) or record.get("job_id") != job.job_id \
            or record.get("status") != "FINISHED" \
            or not isinstance(record.get("metrics"), dict | None):
        return None
    return record


# -- results as data ---------------------------------------------------------------

RESULT_FORMAT = "tmgg-call-result/1"


def result_data(output: Any) -> dict[str, Any]:
    """A transport's output (pickled JobReturn from our own container, or an exception)
    as JSON data: status, metrics, error text, duration and output directory. A fused
    group's output (a list of JobReturns) is ``{"format": ..., "members": [data, ...]}``."""
    if isinstance(output, bytes | bytearray):
        try:
            output = deserialize(bytes(output))
        except Exception as error:  # noqa: BLE001 - becomes a FAILED result
            output = error
    if isinstance(output, list):
        return {"format": RESULT_FORMAT, "members": [result_data(item) for item in output]}
    data: dict[str, Any] = {"format": RESULT_FORMAT, "status": "FAILED", "metrics": None,
                            "error": None, "duration_s": None, "output_dir": None}
    if isinstance(output, BaseException):
        failure = JobFailure.from_exception(output)
    elif getattr(output, "status", None) is not None:
        value = output._return_value
        data["duration_s"] = getattr(output, "duration_s", None)
        data["output_dir"] = _output_dir(output)
        # What the job's process reports for the launcher's fenced outcome.
        data["claim_ticket"] = getattr(output, CLAIM_TICKET, None)
        data["outcome_recorded"] = bool(getattr(output, OUTCOME_RECORDED, False))
        if output.status.name == "COMPLETED":
            data["status"] = "COMPLETED"
            data["metrics"] = json.loads(json.dumps(value, default=str)) \
                if isinstance(value, dict) else None
            return data
        failure = JobFailure.from_exception(value if isinstance(value, BaseException)
                                            else RuntimeError(str(value)))
    else:
        failure = JobFailure("UnexpectedResult", f"the remote function returned {output!r}", "")
    data["error"] = {"type": failure.error_type, "message": failure.message,
                     "traceback": failure.remote_traceback}
    return data


def read_result_data(path: Path) -> dict[str, Any] | JobFailure:
    """A result file read strictly as data; anything else is a failure naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return JobFailure("UnreadableResult", f"{path} is not a tmgg call result (JSON): "
                          f"{type(error).__name__}: {error}; the call's outcome is unknown", "")
    problem = _result_problem(data)
    if problem:
        return JobFailure("UnreadableResult", f"{path} is not a tmgg call result: {problem}; "
                          "the call's outcome is unknown", "")
    return data


def _result_problem(data: Any) -> str | None:
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        return f"expected an object with format {RESULT_FORMAT!r}"
    if "members" in data:  # a fused group's results: each member's is checked alike
        if not isinstance(data["members"], list):
            return "members is not a list"
        problems = [_result_problem(member) for member in data["members"]]
        return next((f"member {i}: {p}" for i, p in enumerate(problems) if p), None)
    if data.get("status") not in ("COMPLETED", "FAILED"):
        return f"unknown status {data.get('status')!r}"
    if data.get("metrics") is not None and not isinstance(data["metrics"], dict):
        return "metrics is not an object"
    error = data.get("error")
    if data["status"] == "FAILED" and not (
            isinstance(error, dict)
            and all(isinstance(error.get(k), str) for k in ("type", "message", "traceback"))):
        return "a failed result needs error.type, error.message and error.traceback (text)"
    duration = data.get("duration_s")
    if duration is not None and (isinstance(duration, bool)
                                 or not isinstance(duration, int | float)):
        return "duration_s is not a number"
    if data.get("output_dir") is not None and not isinstance(data["output_dir"], str):
        return "output_dir is not text"
    if data.get("claim_ticket") is not None and not isinstance(data["claim_ticket"], str):
        return "claim_ticket is not text"
    if not isinstance(data.get("outcome_recorded", False), bool):
        return "outcome_recorded is not true or false"
    return None


def job_return_from_data(job: PlannedJob, data: dict[str, Any]) -> Any:
    """The JobReturn that ``record_result`` folds, rebuilt from result data."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    completed = data["status"] == "COMPLETED"
    result = JobReturn(overrides=list(job.overrides),
                       status=JobStatus.COMPLETED if completed else JobStatus.FAILED)
    if data.get("output_dir"):
        result.hydra_cfg = OmegaConf.create(
            {"hydra": {"runtime": {"output_dir": data["output_dir"]}}})
    result.duration_s = data.get("duration_s")  # type: ignore[attr-defined]
    setattr(result, CLAIM_TICKET, data.get("claim_ticket"))
    setattr(result, OUTCOME_RECORDED, bool(data.get("outcome_recorded")))
    if completed:
        result.return_value = data.get("metrics")
    else:
        error = data["error"]
        result.return_value = JobFailure(error["type"], error["message"], error["traceback"])
    return result
