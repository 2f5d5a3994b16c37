"""The pruning channel between a trial's job and its sweeper (docs/adaptive.md).

A job of an adaptive stage whose sweeper prunes (``hydra.sweeper.pruner`` not
``none``) reports its validation metric at every validation as a ``reported`` event
in the stage's ledger (durable, appended like every event), then waits for the
sweeper's decision for that step: a file ``trials/<job_id>.<step>.decision`` beside
the ledger holding ``continue`` or ``prune``. On ``prune`` the job stops training at
once (this validation is its last), is tested as usual, marks its W&B run pruned
(summary ``pruned_at_step``, tag ``pruned``) and is recorded ``PRUNED`` with the
step. No optuna import here: the job side is a file append and a file read.

The channel needs the job to see the ledger's directory (the local launcher, SLURM on
a shared file system). A job that cannot (a Modal container) is given a key-value
store both sides reach instead (``TRIAL_CHANNEL_ENV``: a ``modal.Dict`` on Modal, a
directory standing in for it with the local transport): it puts its reports there and
reads its decisions there, and the sweeper relays each report into the ledger as a
``reported`` event (``relay_reports``) and puts each decision back, so the ledger
stays the study's truth. A job that gets no decision within ``decision_timeout_s``
(its sweeper gone) trains on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from tmgg.jobs.ledger import Ledger
from tmgg.jobs.records import utc_now
from tmgg.task.loggers import PRUNED_AT_KEY  # noqa: F401 (re-exported: sweep.py, app.py)

log = logging.getLogger(__name__)

REPORTED_EVENT = "reported"
TRIALS_DIR = "trials"
CONTINUE = "continue"
PRUNE = "prune"


def decision_path(ledger_root: Path, job_id: str, step: int) -> Path:
    return ledger_root / TRIALS_DIR / f"{job_id}.{step}.decision"


def write_decision(ledger_root: Path, job_id: str, step: int, decision: str) -> None:
    """The sweeper's answer to one report, written whole (rename)."""
    path = decision_path(ledger_root, job_id, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(decision)
    os.replace(temporary, path)


def remove_decisions(ledger_root: Path, job_id: str, store: Any = None) -> None:
    """A job's decisions left behind (one answered after the job stopped reading, e.g.
    a second shell's): its files, and its keys in ``store``, removed when its trial
    ends."""
    for path in (ledger_root / TRIALS_DIR).glob(f"{job_id}.*.decision"):
        path.unlink(missing_ok=True)
    if store is not None:
        for key in store.keys(f"{DECISION_KEY}.{job_id}."):
            store.pop(key)


class ReportTail:
    """The ``reported`` events of a stage's ledger, read incrementally: each poll reads
    only the lines appended since the last one (a byte offset), so a study's pruning
    loop costs what is new, not the whole ledger again at every poll.

    ``reported`` holds every job's metric by step; ``take_new`` hands each report out
    once (the sweeper answers each report event exactly once, a re-run job's too).
    """

    def __init__(self, ledger: Ledger) -> None:
        self.path = ledger.events_path
        self.offset = 0
        self.reported: dict[str, dict[int, float]] = {}
        self._new: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def refresh(self) -> dict[str, dict[int, float]]:
        """Read what was appended; every job's reported values by step (a copy)."""
        with self._lock:
            try:
                with self.path.open("rb") as handle:
                    handle.seek(self.offset)
                    data = handle.read()
            except FileNotFoundError:
                data = b""
            whole = data[:data.rfind(b"\n") + 1]  # a line being written waits
            self.offset += len(whole)
            for line in whole.splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # a torn line (fsck reports it)
                if not isinstance(event, dict) or event.get("event") != REPORTED_EVENT:
                    continue
                self._new.append(event)
                if isinstance(event.get("value"), int | float):
                    self.reported.setdefault(str(event["job_id"]), {})[
                        int(event["step"])] = float(event["value"])
            return {job: dict(steps) for job, steps in self.reported.items()}

    def take_new(self) -> list[dict[str, Any]]:
        """The report events read since the last call, each handed out once."""
        self.refresh()
        with self._lock:
            new, self._new = self._new, []
        return new


def reported_values(ledger: Ledger) -> dict[str, dict[int, float]]:
    """Every job's reported metric by step, from the ledger."""
    values: dict[str, dict[int, float]] = {}
    for event in ledger.events():
        if event.get("event") == REPORTED_EVENT and isinstance(event.get("value"), int | float):
            values.setdefault(str(event["job_id"]), {})[int(event["step"])] = float(
                event["value"])
    return values


def pruning_settings() -> dict[str, Any] | None:
    """The sweeper's pruning settings when this job is a trial of a pruning study,
    else None (read from the job's Hydra config: no optuna, no file)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    choices = OmegaConf.select(hydra_cfg, "runtime.choices") or {}
    if "hydra/sweeper" not in choices or str(choices["hydra/sweeper"]) != "tmgg_optuna":
        return None
    sweeper = OmegaConf.select(hydra_cfg, "sweeper")
    if sweeper is None or str(sweeper.get("pruner") or "none") == "none":
        return None
    return {"metric": str(sweeper.get("metric") or "val/loss"),
            "timeout_s": float(sweeper.get("decision_timeout_s") or 120.0)}


class TrialChannel:
    """One trial job's end of the pruning channel: its reports into the stage's ledger,
    the sweeper's decisions out of ``trials/``. A solo job's ``TrialReporter`` and a
    fused group's members (``tmgg.task.fused``, through ``FusedMember.extra``) use it."""

    def __init__(self, ledger: Ledger, job_id: str, run_name: str, metric: str,
                 timeout_s: float) -> None:
        self.ledger = ledger
        self.job_id = job_id
        self.run_name = run_name
        self.metric = metric
        self.timeout_s = timeout_s

    def report(self, step: int, value: float) -> None:
        """The job's metric at a validation (a non-finite value is reported as None:
        the sweeper prunes it)."""
        self.ledger.append({"event": REPORTED_EVENT, "time": utc_now(), "job_id": self.job_id,
                            "run_name": self.run_name, "step": step, "metric": self.metric,
                            "value": value if math.isfinite(value) else None})

    def should_prune(self, step: int) -> bool:
        """Wait for the sweeper's decision on the report of ``step``; its file is
        removed once read (decisions do not pile up under ``trials/``)."""
        decision = wait_for_decision(self.ledger.root, self.job_id, step, self.timeout_s)
        decision_path(self.ledger.root, self.job_id, step).unlink(missing_ok=True)
        return decision == PRUNE


#: Set by a launcher whose jobs cannot see the ledger: the store they report through.
TRIAL_CHANNEL_ENV = "TMGG_TRIAL_CHANNEL"
REPORT_KEY = "report"
DECISION_KEY = "decision"


class DirectoryStore:
    """A key-value store in a directory (one JSON file per key, written whole): the
    local transport's stand-in for a ``modal.Dict``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def put(self, key: str, value: Any) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / f"{key}.json"
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(value))
        os.replace(temporary, target)

    def pop(self, key: str) -> Any:
        """The key's value, removed; None when it has none."""
        target = self.path / f"{key}.json"
        try:
            value = json.loads(target.read_text())
        except FileNotFoundError:
            return None
        target.unlink(missing_ok=True)
        return value

    def keys(self, prefix: str) -> list[str]:
        return sorted(p.name[:-len(".json")] for p in self.path.glob(f"{prefix}*.json"))


class ModalDictStore:
    """A named ``modal.Dict`` (created when missing), reached from the launching shell
    and from every container of the app."""

    def __init__(self, name: str) -> None:
        import modal

        self.name = name
        self.dict = modal.Dict.from_name(name, create_if_missing=True)

    def put(self, key: str, value: Any) -> None:
        self.dict.put(key, value)

    def pop(self, key: str) -> Any:
        return self.dict.pop(key, None)

    def keys(self, prefix: str) -> list[str]:
        return sorted(str(k) for k in self.dict.keys()  # noqa: SIM118 - modal.Dict.keys()
                      if str(k).startswith(prefix))


def open_store(spec: str) -> DirectoryStore | ModalDictStore:
    """``dir:<path>`` or ``modal-dict:<name>`` (``TRIAL_CHANNEL_ENV``'s value)."""
    kind, _, where = spec.partition(":")
    if kind == "dir" and where:
        return DirectoryStore(Path(where))
    if kind == "modal-dict" and where:
        return ModalDictStore(where)
    raise ValueError(f"{TRIAL_CHANNEL_ENV}={spec!r}: expected dir:<path> or modal-dict:<name>")


class RelayedTrialChannel:
    """A trial job's end of the channel where it cannot see the ledger: its reports go
    into the store, its decisions come out of it (the sweeper relays both)."""

    def __init__(self, store: DirectoryStore | ModalDictStore, job_id: str, run_name: str,
                 metric: str, timeout_s: float) -> None:
        self.store = store
        self.job_id = job_id
        self.run_name = run_name
        self.metric = metric
        self.timeout_s = timeout_s

    def report(self, step: int, value: float) -> None:
        self.store.put(f"{REPORT_KEY}.{self.job_id}.{step}", {
            "event": REPORTED_EVENT, "time": utc_now(), "job_id": self.job_id,
            "run_name": self.run_name, "step": step, "metric": self.metric,
            "value": value if math.isfinite(value) else None})

    def should_prune(self, step: int) -> bool:
        key = f"{DECISION_KEY}.{self.job_id}.{step}"
        deadline = time.monotonic() + self.timeout_s
        while (decision := self.store.pop(key)) is None:
            if time.monotonic() > deadline:
                log.warning("no pruning decision for %s at step %d within %.0f s; trains on",
                            self.job_id, step, self.timeout_s)
                return False
            time.sleep(0.05)
        return str(decision) == PRUNE


def relay_reports(store: DirectoryStore | ModalDictStore, ledger: Ledger) -> int:
    """The sweeper's side: every report in the store appended to the ledger as its
    ``reported`` event (then removed from the store); how many."""
    events = []
    for key in store.keys(f"{REPORT_KEY}."):
        event = store.pop(key)
        if isinstance(event, dict) and event.get("event") == REPORTED_EVENT:
            events.append(event)
    ledger.append_many(events)
    return len(events)


def relay_decision(store: DirectoryStore | ModalDictStore, job_id: str, step: int,
                   decision: str) -> None:
    """The sweeper's decision for one report, where the job waits for it."""
    store.put(f"{DECISION_KEY}.{job_id}.{step}", decision)


def trial_channel(task: dict[str, Any] | Any) -> TrialChannel | RelayedTrialChannel | None:
    """The pruning channel of a pruning trial's job, or None for any other job (read
    from the job's Hydra config, which must be the current one): the ledger's
    directory, or the store ``TRIAL_CHANNEL_ENV`` names."""
    settings = pruning_settings()
    if settings is None:
        return None
    job_id, run_name = str(task["job"]["id"]), str(task["job"]["run_name"])
    spec = os.environ.get(TRIAL_CHANNEL_ENV)
    if spec:
        return RelayedTrialChannel(open_store(spec), job_id, run_name, settings["metric"],
                                   settings["timeout_s"])
    from tmgg.jobs.sweep import ledger_for

    return TrialChannel(ledger_for(task), job_id, run_name, settings["metric"],
                        settings["timeout_s"])


def trial_reporter(task: dict[str, Any] | Any) -> Any:
    """The Lightning callback of a pruning trial's job, or None for any other job."""
    channel = trial_channel(task)
    if channel is None:
        return None
    from lightning.pytorch.callbacks import Callback

    class TrialReporter(Callback):
        """Report at each validation; stop when the sweeper prunes the trial."""

        pruned_at: int | None = None

        def on_validation_end(self, trainer: Any, module: Any) -> None:
            if trainer.sanity_checking or self.pruned_at is not None:
                return
            value = trainer.callback_metrics.get(channel.metric)
            if value is None:
                return
            step = int(trainer.global_step)
            channel.report(step, float(value))
            if not channel.should_prune(step):
                return
            self.pruned_at = step
            trainer.should_stop = True
            log.info("%s pruned by its sweeper at step %d", channel.run_name, step)
            mark_wandb_pruned(trainer, step)

    return TrialReporter()


def wait_for_decision(ledger_root: Path, job_id: str, step: int, timeout_s: float) -> str:
    """The sweeper's decision for this report; ``continue`` when none comes in time."""
    path = decision_path(ledger_root, job_id, step)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            if time.monotonic() > deadline:
                log.warning("no pruning decision for %s at step %d within %.0f s; trains on",
                            job_id, step, timeout_s)
                return CONTINUE
            time.sleep(0.02)


def mark_wandb_pruned(trainer: Any, step: int) -> None:
    """The job's W&B run says it was pruned (summary key and tag) before it finishes."""
    from tmgg.task.loggers import mark_run_pruned

    mark_run_pruned(trainer.logger, step)
