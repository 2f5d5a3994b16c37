"""``tmgg-sweep reconcile``: is every expected job where it should be?

Expected jobs are those ``tmgg-train -m <overrides>`` would run (composed, or read
from the stage's plan.json when that is safe: ``compose.recorded_or_composed_sweep``);
what ran comes from the stage's ledger; the evidence of where each run logged is

- offline: wandb's own transaction logs, ``<job output dir>/wandb/*/run-<id>.wandb``
  (wandb 0.31 writes no metadata or config files offline, and ships no Python reader
  for these logs, so ``read_run_file`` reads the record log and parses its protobuf
  records with ``wandb.proto``);
- online: the W&B API on the pinned host (``logger.base_url``), the runs of each
  pinned ``entity/project`` in the stage's group or with a job's run id or run name,
  and the same wherever a misrouted run can land (``search_paths_for``): the default
  entity of the reconciling key and of the workers' key (``--workers-entity``), the
  key's username and every team it belongs to, each with the pinned project and
  ``uncategorized``, and every ``--search-entity``.

It fails closed (DESIGN.md contract 10): a search path that could not be read (rate
limit, server error, timeout, no access) is not "nothing there". Only a project the
key's user could see but that does not exist counts as empty; every job the
unreadable path could change is ``unknown``, and the command exits non-zero.

A run is a job's when it has one of the job's W&B run ids (its ``logger.run_generation``
or a later one: ``tmgg-sweep relog`` re-logs into a new generation); a run that only
has the job's name is someone else's run under that name (``foreign`` when it is all
there is at the pinned destination). Each job gets one status: ok, missing, failed,
misrouted (and where), duplicated, foreign, unknown (or running while it still runs),
and each status comes with the command that gets it back to ok (``advice``; see
docs/wandb-checks.md). The command exits non-zero unless every job is ok.
"""

from __future__ import annotations

import argparse
import json
import shlex
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tmgg.config.identity import job_suffix, job_wandb_run_id, run_generation, wandb_run_id
from tmgg.jobs.ledger import DISPATCHED, DONE, FAILED, FINISHED, RUNNING, JobState
from tmgg.jobs.plan import PlannedJob
from tmgg.jobs.supersede import stale_run_ids, superseded_ids

# Checked against wandb 0.31.0 (the run-<id>.wandb record log format and wandb.proto
# read by read_run_file); tests/test_lock.py fails when the lock moves wandb off it.
WANDB_CHECKED_VERSION = "0.31.0"

OK = "ok"
MISSING = "missing"
FAILED_STATUS = "failed"
MISROUTED = "misrouted"
DUPLICATED = "duplicated"
FOREIGN = "foreign"
RUNNING_STATUS = "running"
UNKNOWN = "unknown"

# A job's own run ids: its logger.run_generation and this many later ones (relog and a
# relaunch after a deleted run move a job to a later generation).
OWN_GENERATIONS = 8
# The project wandb uses when a run is created without one.
UNCATEGORIZED = "uncategorized"
# Seconds one W&B API request may take (wandb retries 429/5xx inside it) before the
# path it reads is unknown.
DEFAULT_API_TIMEOUT = 60

# wandb's exit-code convention (as the server maps it): 0 finished, 254 crashed.
CRASHED_EXIT_CODE = 254

# The transaction log: a ":W&B" magic, a 2-byte key and a version byte, then
# LevelDB-log records (crc32, length, type) in 32 KiB blocks.
_MAGIC = b":W&B"
_FILE_HEADER = 7
_BLOCK = 32768
_RECORD_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class RunsApi(Protocol):
    """What reconcile needs of ``wandb.Api``: runs of a project matching filters."""

    def runs(self, path: str, filters: dict[str, Any] | None = None) -> Iterable[Any]: ...


@dataclass
class RunEvidence:
    """One W&B run of a job, wherever it was found."""

    id: str
    entity: str
    project: str
    name: str
    group: str
    state: str  # finished | failed | crashed | running | ...
    source: str  # a run file path, or "api"

    @property
    def destination(self) -> str:
        return f"{self.entity or '<no entity>'}/{self.project or '<no project>'}"


@dataclass
class RunFile:
    """What a ``run-<id>.wandb`` transaction log says about its run."""

    path: Path
    run_id: str
    entity: str
    project: str
    name: str
    group: str
    exit_code: int | None
    history_rows: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> str:
        if self.exit_code is None:
            return "running"
        if self.exit_code == 0:
            return "finished"
        return "crashed" if self.exit_code == CRASHED_EXIT_CODE else "failed"


@dataclass
class Row:
    """One expected job and its verdict."""

    job_id: str
    run_name: str
    status: str
    destination: str
    run_ids: list[str] = field(default_factory=list)
    ledger_status: str = "-"
    detail: str = ""
    advice: str = ""


@dataclass(frozen=True)
class Unreadable:
    """A search path whose runs could not be read: what reconcile could not verify."""

    path: str
    reason: str


@dataclass(frozen=True)
class Viewer:
    """The reconciling key's user: its default entity, username and teams."""

    entity: str | None
    username: str | None
    teams: tuple[str, ...] = ()

    @property
    def entities(self) -> list[str]:
        """Where a run logged with this key can land, default entity first."""
        names = [self.entity, self.username, *self.teams]
        return list(dict.fromkeys(name for name in names if name))


# -- offline evidence --------------------------------------------------------------
def iter_records(data: bytes) -> Iterable[bytes]:
    """The payloads of a LevelDB-style record log (after the file header)."""
    position = _FILE_HEADER
    pending = b""
    while position + _RECORD_HEADER <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < _RECORD_HEADER:  # block trailer padding
            position += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + _RECORD_HEADER])
        start = position + _RECORD_HEADER
        chunk = data[start:start + length]
        position = start + length
        if kind == 0 and length == 0:
            break  # zero padding: the writer stopped here
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != checksum:
            break  # a torn or corrupt tail (killed writer): keep what came before
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            yield pending
            pending = b""


def read_run_file(path: Path) -> RunFile | None:
    """Entity, project, id, name, group and exit code from a wandb transaction log."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(_MAGIC):
        return None
    info = RunFile(path=Path(path), run_id=Path(path).stem.removeprefix("run-"), entity="",
                   project="", name="", group="", exit_code=None, history_rows=0)
    for payload in iter_records(data):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - skip a record this version cannot parse
            continue
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            info.run_id = run.run_id or info.run_id
            info.entity, info.project = run.entity, run.project
            info.name, info.group = run.display_name, run.run_group
            _apply_config(info.config, run.config.update)
        elif kind == "config":
            _apply_config(info.config, record.config.update)
        elif kind == "exit":
            info.exit_code = int(record.exit.exit_code)
        elif kind == "history":
            info.history_rows += 1
    return info


def _apply_config(config: dict[str, Any], items: Iterable[Any]) -> None:
    """Fold a config record's items (JSON values, maybe at a nested key) into a dict."""
    for item in items:
        try:
            value = json.loads(item.value_json)
        except ValueError:
            continue
        path = list(item.nested_key) or [item.key]
        node = config
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value


def run_files(directory: Path) -> list[Path]:
    """Every run log under ``<dir>/wandb`` (offline-run-* and online run-* dirs)."""
    root = Path(directory) / "wandb"
    if not root.is_dir():
        return []
    return sorted(root.glob("*run-*/run-*.wandb"), key=lambda p: (p.stat().st_mtime, str(p)))


def local_evidence(directories: Iterable[Path]) -> list[RunEvidence]:
    """One entry per run id found in the directories; the newest log decides the state."""
    latest: dict[str, RunEvidence] = {}
    seen: set[Path] = set()
    for directory in directories:
        for path in run_files(directory):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            info = read_run_file(path)
            if info is None:
                continue
            latest[info.run_id] = RunEvidence(id=info.run_id, entity=info.entity,
                                              project=info.project, name=info.name,
                                              group=info.group, state=info.state,
                                              source=str(path))
    return list(latest.values())


def job_output_dirs(job: PlannedJob, state: JobState | None) -> list[Path]:
    """Where the job's files are: its ledger record's output dir and the planned one."""
    directories = []
    recorded = (state.record if state else {}).get("output_dir")
    if recorded:
        directories.append(Path(recorded))
    task = job.task_config
    outputs = Path(str(task.get("outputs_dir", "outputs")))
    if not outputs.is_absolute():
        outputs = Path.cwd() / outputs
    directories.append(outputs / job.stage / f"{job.run_name}-{job_suffix(job.job_id)}")
    return directories


# -- online evidence ---------------------------------------------------------------
def is_missing_project(error: BaseException) -> bool:
    """wandb's answer when the service returns no project: absent, or not visible."""
    return isinstance(error, ValueError) and "Could not find project" in str(error)


def api_evidence(api: RunsApi, paths: Iterable[str], stage: str, jobs: Sequence[PlannedJob],
                 notes: list[str] | None = None,
                 unreadable: list[Unreadable] | None = None,
                 visible: Iterable[str] = ()) -> list[RunEvidence]:
    """Runs in each ``entity/project`` of the stage's group, or with a job's id or name.

    A path that cannot be read adds an ``Unreadable``; only a missing project in an
    entity the key's user belongs to (``visible``) is a confirmed "no project there".
    """
    ids = sorted({run_id for job in jobs for run_id in own_run_ids(job)})
    names = [job.run_name for job in jobs]
    filters = {"$or": [{"group": stage}, {"name": {"$in": ids}},
                       {"displayName": {"$in": names}}]}
    members = set(visible)
    found: dict[tuple[str, str, str], RunEvidence] = {}
    for path in paths:
        entity, _, project = path.partition("/")
        try:
            runs = list(api.runs(path, filters=filters))
        except Exception as error:  # noqa: BLE001 - one unreadable path must not hide the rest
            if is_missing_project(error) and entity in members:
                if notes is not None:
                    notes.append(f"no project {path} (searched; the key's user belongs to "
                                 f"{entity})")
                continue
            reason = (f"the key's user cannot read entity {entity}, or {path} does not "
                      "exist (W&B answers the same for both)" if is_missing_project(error)
                      else f"{type(error).__name__}: {' '.join(str(error).split())}")
            if unreadable is not None:
                unreadable.append(Unreadable(path, reason))
            elif notes is not None:
                notes.append(f"could not read runs of {path}: {reason}")
            continue
        for run in runs:
            evidence = RunEvidence(
                id=str(run.id), entity=str(getattr(run, "entity", None) or entity),
                project=str(getattr(run, "project", None) or project),
                name=str(getattr(run, "name", "") or ""),
                group=str(getattr(run, "group", "") or ""),
                state=str(getattr(run, "state", "") or "unknown"), source="api")
            found[(evidence.entity, evidence.project, evidence.id)] = evidence
    return list(found.values())


# -- verdicts ----------------------------------------------------------------------
def job_run_id(job: PlannedJob) -> str:
    """The W&B run id the job logs under (job id and ``logger.run_generation``)."""
    return job_wandb_run_id(job.task_config)


def earlier_run_ids(job: PlannedJob) -> set[str]:
    """Run ids of the job's earlier ``logger.run_generation``s (replaced, not duplicates)."""
    return {wandb_run_id(job.job_id, generation)
            for generation in range(run_generation(job.task_config))}


def own_run_ids(job: PlannedJob) -> list[str]:
    """The job's run ids: its ``logger.run_generation``'s and the next few (a relog or a
    relaunch after a deleted run moves the job to a later generation)."""
    first = run_generation(job.task_config)
    return [wandb_run_id(job.job_id, generation)
            for generation in range(first, first + OWN_GENERATIONS)]


def _belongs(run: RunEvidence, job: PlannedJob) -> bool:
    """Evidence about the job: one of its run ids, or its run name under another id."""
    return run.id in own_run_ids(job) or (bool(run.name) and run.name == job.run_name)


def _listing(runs: Sequence[RunEvidence]) -> str:
    return ", ".join(f"{r.destination}/{r.id} ({r.state})" for r in runs)


def error_detail(error: str) -> str:
    """The line of a recorded error that says what happened (and what to do)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    explained = [line for line in lines if "refuses run id" in line]
    return (explained or lines or [""])[-1]


def judge(job: PlannedJob, state: JobState | None, runs: Sequence[RunEvidence],
          looked: str | None = None) -> Row:
    """One job's status from its ledger state and the runs attributed to it
    (``looked``: where the evidence came from, for the "not found" detail)."""
    ledger_status = state.status if state else "-"
    error_line = error_detail((state.error or "") if state else "")
    wandb = job.wandb
    if wandb is None:  # a csv job: the ledger is the only evidence
        destination = "(no W&B)"
        row = Row(job.job_id, job.run_name, OK, destination, ledger_status=ledger_status)
        if ledger_status in DONE:  # FINISHED, or an adaptive trial's PRUNED job
            return row
        row.status = _ledger_only_status(ledger_status)
        if row.status == FAILED_STATUS:
            row.detail = error_line
        elif row.status == MISSING:
            row.detail = _missing_detail(ledger_status)
        return row
    pinned = f"{wandb['entity']}/{wandb['project']}"
    run_id = job_run_id(job)
    own_ids = own_run_ids(job)
    mine = list(runs)
    at_pin = [run for run in mine if run.destination == pinned]
    own = sorted((run for run in at_pin if run.id in own_ids),
                 key=lambda run: own_ids.index(run.id), reverse=True)
    foreign = [run for run in at_pin if run.id not in own_ids]
    elsewhere = [run for run in mine if run.destination != pinned]
    row = Row(job.job_id, job.run_name, OK, pinned, run_ids=sorted({r.id for r in mine}),
              ledger_status=ledger_status)
    if elsewhere and not at_pin:
        row.status, row.detail = MISROUTED, f"found at {_listing(elsewhere)}"
        return row
    if own and (elsewhere or foreign):
        row.status = DUPLICATED
        row.detail = "runs: " + _listing(own + foreign + elsewhere)
        return row
    if foreign:
        row.status = FOREIGN
        row.detail = (f"{_listing(foreign)} has this job's name but not its run id {run_id}: "
                      "not this job's run" + (f"; also at {_listing(elsewhere)}"
                                              if elsewhere else ""))
        return row
    if not own:
        row.status = _ledger_only_status(ledger_status)
        if ledger_status in DONE:
            row.status = MISSING
            row.detail = (f"the ledger says {ledger_status.lower()}, but no run of this job "
                          "was found " + (looked or f"at {pinned}"))
        elif row.status == FAILED_STATUS:
            row.detail = error_line
        elif row.status == MISSING:
            row.detail = _missing_detail(ledger_status)
        return row
    run = own[0]  # the latest generation: earlier ones were replaced, not duplicates
    if ledger_status == FAILED or run.state in ("failed", "crashed", "killed"):
        row.status = FAILED_STATUS
        row.detail = error_line or f"run {run.id} {run.state}"
    elif run.state == "finished":
        row.status = OK
    else:
        row.status = RUNNING_STATUS
        row.detail = f"run {run.id} {run.state}"
    return row


def _missing_detail(ledger_status: str) -> str:
    if ledger_status == "-":
        return "not in the ledger: never launched"
    return f"ledger: {ledger_status}, no run found"


def _ledger_only_status(ledger_status: str) -> str:
    if ledger_status in DONE:
        return OK
    if ledger_status == FAILED:
        return FAILED_STATUS
    if ledger_status in (RUNNING, DISPATCHED):
        return RUNNING_STATUS
    return MISSING


def resolve_mode(mode: str, base_url: str | None = None) -> str:
    """``auto``: online when a W&B key for the host is available, else offline."""
    if mode != "auto":
        return mode
    from tmgg.task.loggers import DEFAULT_BASE_URL, has_wandb_credentials

    return "online" if has_wandb_credentials(base_url or DEFAULT_BASE_URL) else "offline"


def key_viewer(api: Any) -> Viewer:
    """Who the reconciling key belongs to (raises when the service cannot say)."""
    viewer = api.viewer
    if viewer is None:
        raise ValueError("the W&B API key has no user on this host")
    return Viewer(entity=getattr(viewer, "entity", None) or None,
                  username=getattr(viewer, "username", None) or None,
                  teams=tuple(getattr(viewer, "teams", None) or ()))


def search_paths(entities: Sequence[str], projects: Sequence[str]) -> list[str]:
    """``E`` searches E/<each pinned project>; ``E/P`` searches exactly that project."""
    paths = []
    for entity in entities:
        if "/" in entity:
            paths.append(entity)
        else:
            paths += [f"{entity}/{project}" for project in projects]
    return paths


def search_paths_for(pinned: Sequence[str], viewer: Viewer | None,
                     workers_entities: Sequence[str] = (),
                     search_entities: Sequence[str] = ()) -> list[str]:
    """Every place a misrouted run of these pinned paths can land, pinned paths first:
    the default entity of the reconciling key and of the workers' key, the key's
    username and teams (each with the pinned projects and ``uncategorized``), then the
    user's ``--search-entity`` values."""
    projects = list(dict.fromkeys([*(path.split("/", 1)[1] for path in pinned),
                                   UNCATEGORIZED]))
    entities = [*(viewer.entities[:1] if viewer else []), *workers_entities,
                *(viewer.entities[1:] if viewer else [])]
    paths = [*pinned, *search_paths(list(dict.fromkeys(entities)), projects)]
    paths += search_paths(search_entities, [path.split("/", 1)[1] for path in pinned])
    return list(dict.fromkeys(paths))


def online_api(host: str, timeout: int = DEFAULT_API_TIMEOUT) -> Any:
    """``wandb.Api`` on the pinned host; each request gives up after ``timeout`` s."""
    import wandb

    return wandb.Api(overrides={"base_url": host}, timeout=timeout)


def reconcile_jobs(jobs: Sequence[PlannedJob], states: dict[str, JobState], stage: str,
                   mode: str = "offline", search_entities: Sequence[str] = (),
                   api: RunsApi | None = None, notes: list[str] | None = None,
                   workers_entities: Sequence[str] = (), overrides: Sequence[str] = (),
                   api_timeout: int = DEFAULT_API_TIMEOUT) -> list[Row]:
    """The verdict and advice for every expected job (``mode`` is online or offline).

    ``overrides``: the command's own (the advice repeats them); ``workers_entities``:
    the default entity of the key the workers log with, where it is not this one's.
    """
    expected = [job for job in jobs if job.is_tmgg_job]
    wandb_jobs = [job for job in expected if job.wandb is not None]
    online_runs: list[RunEvidence] = []
    unreadable: dict[str, list[Unreadable]] = {}  # host -> paths not read
    if mode == "online" and wandb_jobs:
        hosts = sorted({str(j.wandb["base_url"]) for j in wandb_jobs})
        for host in hosts:
            jobs_here = [j for j in wandb_jobs if j.wandb["base_url"] == host]
            pinned = sorted({f"{j.wandb['entity']}/{j.wandb['project']}" for j in jobs_here})
            failures = unreadable.setdefault(host, [])
            try:
                host_api = api if api is not None else online_api(host, api_timeout)
                viewer: Viewer | None = key_viewer(host_api)
            except Exception as error:  # noqa: BLE001 - then no search path is trusted
                failures.append(Unreadable(f"the key's user on {host}",
                                           f"{type(error).__name__}: {error}"))
                continue
            paths = search_paths_for(pinned, viewer, workers_entities, search_entities)
            online_runs += api_evidence(host_api, paths, stage, jobs_here, notes,
                                        unreadable=failures,
                                        visible=viewer.entities if viewer else ())
    # Runs of superseded records share their successors' run names: not theirs.
    stale = superseded_ids(expected, states, stage)
    stale_runs = stale_run_ids(states[job_id] for job_id in stale)
    rows = []
    for job in expected:
        state = states.get(job.job_id)
        looked = None
        if job.wandb is None:
            runs: list[RunEvidence] = []
        elif mode == "online":
            runs = [run for run in online_runs
                    if _belongs(run, job) and run.id not in stale_runs]
            looked = f"at {job.wandb['entity']}/{job.wandb['project']} on {job.wandb['base_url']}"
        else:  # every run logged from the job's own output dir is the job's ...
            superseded = earlier_run_ids(job)  # ... but runs of earlier generations
            directories = job_output_dirs(job, state)
            runs = [run for run in local_evidence(directories) if run.id not in superseded]
            looked = ("in wandb's run files under " + ", ".join(
                str(Path(d) / "wandb") for d in dict.fromkeys(map(str, directories)))
                + " (offline evidence: W&B itself was not asked; `tmgg-sweep reconcile "
                "--online` asks it)")
        row = judge(job, state, runs, looked)
        if job.wandb is not None and mode == "online":
            not_read = unreadable.get(str(job.wandb["base_url"])) or []
            if not_read and row.status in (OK, MISSING, RUNNING_STATUS, FOREIGN):
                paths = "; ".join(f"{u.path} ({u.reason})" for u in not_read)
                row.detail = (f"could not read {paths}; from what was read: {row.status}"
                              + (f" ({row.detail})" if row.detail else ""))
                row.status = UNKNOWN
        row.advice = advice(row, job, state, overrides)
        rows.append(row)
    if notes is not None:
        notes += [f"could not read {u.path} on {host}: {u.reason}"
                  for host, failures in unreadable.items() for u in failures]
    return rows


# -- advice: the command that gets each status back to ok ----------------------------
def shell_command(*parts: str) -> str:
    return " ".join(shlex.quote(part) for part in parts if part)


def delete_run_command(base_url: str, path: str) -> str:
    """The wandb client call that deletes a stray run (its id is never reused)."""
    code = (f"import wandb; wandb.Api(overrides={{'base_url': {base_url!r}}})"
            f".run({path!r}).delete()")
    return shell_command("python", "-c", code)


def advice(row: Row, job: PlannedJob, state: JobState | None,
           overrides: Sequence[str]) -> str:
    """What to run so that the job's row becomes ok (empty for ok)."""
    ov = list(overrides)
    record = (state.record if state else {}) or {}
    finished = row.ledger_status == FINISHED
    wandb = job.wandb or {}
    if row.status == OK:
        return ""
    if row.status == UNKNOWN:
        # Again once the service answers (after the rate limit or outage); for a path
        # the key cannot read, with WANDB_API_KEY of a member of it.
        return shell_command("tmgg-sweep", "reconcile", "--online", *ov)
    if row.status == RUNNING_STATUS:
        # Wait: a run whose process died turns crashed, then failed here (resume).
        return shell_command("tmgg-sweep", "status", *ov)
    if row.status == FAILED_STATUS:
        if "refuses run id" in row.detail:
            generation = run_generation(job.task_config) + 1
            return shell_command("tmgg-sweep", "resume", *ov,
                                 f"logger.run_generation={generation}")
        if finished:  # trained, but its W&B run ended badly
            return shell_command("tmgg-sweep", "relog", *ov)
        return shell_command("tmgg-sweep", "resume", *ov)
    if row.status in (MISSING, FOREIGN, MISROUTED) and finished:
        recorded_mode = str((record.get("wandb") or {}).get("mode") or "")
        if row.status == MISSING and recorded_mode == "offline" and _has_offline_runs(
                job, state):
            return shell_command("tmgg-sweep", "sync", *ov)
        fix = shell_command("tmgg-sweep", "relog", *ov)
    elif row.status in (MISSING, FOREIGN, MISROUTED):
        fix = shell_command("tmgg-sweep", "resume", *ov)
    else:  # duplicated: the job's own run is there; the others must go
        fix = ""
    if row.status in (MISROUTED, DUPLICATED, FOREIGN):
        own_ids = own_run_ids(job)
        pinned = f"{wandb.get('entity')}/{wandb.get('project')}"
        stray = [path for path in _stray_paths(row.detail)
                 if not (path.startswith(pinned + "/") and path.rsplit("/", 1)[1] in own_ids)]
        deletes = [delete_run_command(str(wandb.get("base_url")), path) for path in stray]
        fix = " && ".join(part for part in [fix, *deletes] if part)
    return fix


def _stray_paths(detail: str) -> list[str]:
    """The ``entity/project/id`` paths a misrouted/duplicated detail lists."""
    import re

    return re.findall(r"([\w.-]+/[\w.-]+/[\w.-]+) \(", detail)


def _has_offline_runs(job: PlannedJob, state: JobState | None) -> bool:
    return any(path.parent.name.startswith("offline-run-")
               for directory in job_output_dirs(job, state) for path in run_files(directory))


def print_table(rows: Sequence[Row], title: str, mode: str,
                notes: Sequence[str] = ()) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Readable at 80 columns: run names whole, one destination shown once when all share it.
    destinations = {row.destination for row in rows}
    shared = len(destinations) == 1
    if shared:
        title = f"{title} → {next(iter(destinations))}"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("job", no_wrap=True,
                     min_width=max((len(row.run_name) for row in rows), default=3))
    table.add_column("status", no_wrap=True)
    table.add_column("ledger", no_wrap=True)
    for column in (*(() if shared else ("destination",)), "run id", "detail"):
        table.add_column(column, overflow="fold")
    styles = {OK: "green", MISSING: "yellow", RUNNING_STATUS: "cyan"}
    for row in rows:
        style = styles.get(row.status, "red")
        table.add_row(row.run_name, f"[{style}]{row.status}[/{style}]", row.ledger_status,
                      *(() if shared else (row.destination,)), ", ".join(row.run_ids),
                      escape(row.detail))
    console = Console()
    console.print(table)
    print_advice(console, rows, styles)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"{len(rows)} expected jobs ({mode} evidence): {summary or 'none'}",
                  soft_wrap=True)


def advice_groups(rows: Sequence[Row]) -> list[tuple[str, dict[str, list[str]]]]:
    """(command, {status: run names}): each distinct advice once, in the table's order,
    with the jobs it applies to grouped by their status."""
    groups: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        if row.advice:
            groups.setdefault(row.advice, {}).setdefault(row.status, []).append(row.run_name)
    return list(groups.items())


def print_advice(console: Any, rows: Sequence[Row], styles: dict[str, str]) -> None:
    """Under the table (a column would not fit 80 columns): each distinct command once,
    after the jobs it brings back to ok by status, whole on one line to run as printed."""
    from rich.markup import escape

    groups = advice_groups(rows)
    if not groups:
        return
    console.print("advice: run each command as printed to bring its jobs back to ok")
    for command, by_status in groups:
        console.print("; ".join(
            f"[{styles.get(status, 'red')}]{status}[/]: " + escape(", ".join(names))
            for status, names in by_status.items()))
        console.print(f"  {command}", soft_wrap=True, markup=False, highlight=False)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tmgg-sweep reconcile",
        description="Expected jobs versus what W&B and the outputs show; exits non-zero "
                    "unless every job is ok.")
    parser.add_argument("--search-entity", action="append", default=[], metavar="E",
                        help="also look for the stage's runs in entity E (or E/PROJECT); "
                             "repeatable; online only (the key's default entity, username "
                             "and teams are always searched)")
    parser.add_argument("--workers-entity", action="append", default=[], metavar="E",
                        help="the default entity of the W&B key the workers log with, when "
                             "it is not the reconciling key's (a Modal Secret, a cluster's "
                             "environment): searched like the key's own; repeatable")
    parser.add_argument("--api-timeout", type=int, default=DEFAULT_API_TIMEOUT, metavar="S",
                        help="seconds one W&B API request may take, retries included, "
                             "before what it reads is unknown (default %(default)s)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--online", dest="mode", action="store_const", const="online",
                       help="evidence from the W&B API")
    group.add_argument("--offline", dest="mode", action="store_const", const="offline",
                       help="evidence from wandb's run files in the jobs' output dirs")
    group.add_argument("--mode", dest="mode", choices=("auto", "online", "offline"),
                       help="auto (default): online when a W&B API key is available")
    parser.add_argument("overrides", nargs="*",
                        help="the overrides of `tmgg-train -m`, e.g. stage=stage1")
    parser.set_defaults(mode="auto")
    return parser.parse_intermixed_args(list(argv))


def main(argv: Sequence[str], api: RunsApi | None = None) -> int:
    """``tmgg-sweep reconcile stage=... [--search-entity E]... [--online|--offline]``."""
    from tmgg.jobs.compose import recorded_or_composed_sweep

    args = parse_args(argv)
    sweep = recorded_or_composed_sweep(args.overrides)
    hosts = {str(job.wandb["base_url"]) for job in sweep.jobs
             if job.is_tmgg_job and job.wandb is not None}
    mode = resolve_mode(args.mode, next(iter(sorted(hosts)), None))
    notes: list[str] = []
    if sweep.from_plan:
        notes.append("expected jobs read from the stage's plan.json (recorded for the same "
                     "overrides, conf/ and code), not composed again")
    if args.search_entity and mode != "online":
        notes.append("--search-entity is used online only; offline, every run file in a "
                     "job's output dir is read whatever its entity")
    if mode == "offline":
        notes.append("offline evidence: only wandb's run files in the jobs' output dirs were "
                     "read; W&B itself was not asked (`--online` asks it)")
    rows = reconcile_jobs(sweep.jobs, sweep.ledger.states(), sweep.stage, mode=mode,
                          search_entities=args.search_entity, api=api, notes=notes,
                          workers_entities=args.workers_entity, overrides=args.overrides,
                          api_timeout=args.api_timeout)
    print_table(rows, title=f"reconcile: stage {sweep.stage}", mode=mode, notes=notes)
    return 0 if rows and all(row.status == OK for row in rows) else 1
