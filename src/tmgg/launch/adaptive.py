"""An adaptive stage's study (``hydra/sweeper=tmgg_optuna``, docs/adaptive.md).

The ledger is the study's truth: at every ask the Optuna study is brought up to date
from the stage's job records (``optuna.trial.create_trial`` + ``study.add_trial`` for
each trial whose jobs all finished), the trials are counted from the ledger (so a
resumed sweep, or a second shell on the same stage, continues toward ``n_trials`` in
all), a trial whose jobs were lost or failed is run again with its own parameters, and
an asked config whose job id the ledger knows already is not dispatched (the sampler
is asked again). A lock file beside the ledger makes "count, ask, record the plan" one
step between shells.

Every trial is one or more complete tmgg jobs (one per repeat, e.g. per seed) handed
to the configured launcher; asynchronous: each of ``n_jobs`` threads takes a new
trial as soon as its last one ended.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from tmgg.jobs.ledger import (
    DISPATCHED,
    FINISHED,
    PRUNED,
    RUNNING,
    SKIPPED,
    JobState,
    Ledger,
    LedgerFold,
)
from tmgg.jobs.plan import PlanError, PlannedJob, compose_plan
from tmgg.jobs.search_space import SearchSpace, SearchSpaceError, stage_space, sweeper_settings
from tmgg.jobs.sweep import ledger_for_stage, record_trial_plan, remember_planned

log = logging.getLogger(__name__)

# Asks in a row that only found configs the ledger has already, before the study stops.
MAX_REPEATED_ASKS = 200
STUDY_LOCK = "study.lock"

COMPLETE = "complete"  # every job of the trial FINISHED with the metric
PRUNED_TRIAL = "pruned"  # its sweeper pruned it (a job PRUNED, none in flight)
IN_FLIGHT = "in_flight"  # a job of it is running (here or in another shell)
TO_RERUN = "to_rerun"  # lost, failed, or planned and never dispatched


@dataclass
class LedgerTrial:
    """One trial as the ledger knows it: its searched values and its jobs by repeat."""

    key: tuple[str, ...]
    params: dict[str, Any]
    jobs: dict[str, JobState] = field(default_factory=dict)
    status: str = TO_RERUN
    value: float | None = None
    reported: dict[int, float] = field(default_factory=dict)  # step -> mean over its jobs


def ledger_trials(ledger: Ledger, space: SearchSpace, metric: str,
                  reports: dict[str, dict[int, float]] | None = None,
                  states: dict[str, JobState] | None = None
                  ) -> dict[tuple[str, ...], LedgerTrial]:
    """The stage's trials, folded from its job states (superseded jobs left out);
    ``reports`` and ``states``: the jobs' reported values and states when the caller
    keeps them up to date incrementally (ReportTail, LedgerFold)."""
    from tmgg.jobs.trials import reported_values

    if reports is None:
        reports = reported_values(ledger)
    if states is None:
        states = ledger.states()
    trials: dict[tuple[str, ...], LedgerTrial] = {}
    for state in states.values():
        if state.superseded_by:
            continue
        overrides = state.overrides or state.record.get("overrides") or []
        read = space.read_overrides(overrides)
        if read is None:
            continue
        params, repeat = read
        key = space.trial_key(params)
        trial = trials.setdefault(key, LedgerTrial(key, params))
        trial.jobs[repeat] = state
    repeats = space.repeat_texts()
    for trial in trials.values():
        states = [trial.jobs.get(repeat) for repeat in repeats]
        if all(s is not None and s.status == FINISHED for s in states):
            trial.status = COMPLETE
            values = [s.metrics.get(metric) for s in states if s is not None]
            if all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                trial.value = sum(values) / len(values)  # type: ignore[arg-type]
        elif any(s is not None and s.status in (RUNNING, DISPATCHED, SKIPPED) for s in states):
            trial.status = IN_FLIGHT
        elif any(s is not None and s.status == PRUNED for s in states):
            trial.status = PRUNED_TRIAL
        by_step: dict[int, list[float]] = {}
        for state in trial.jobs.values():
            for step, value in reports.get(state.job_id, {}).items():
                by_step.setdefault(step, []).append(value)
        trial.reported = {step: sum(v) / len(v) for step, v in sorted(by_step.items())}
    return trials


@dataclass
class PendingTrial:
    """A trial this process dispatches: its jobs, and Optuna's trial when it was asked."""

    key: tuple[str, ...]
    params: dict[str, Any]
    jobs: list[PlannedJob]
    asked: Any = None  # optuna.trial.Trial, None for a re-run of a lost trial
    pruned: bool = False


class AdaptiveStudy:
    """The study loop of one ``tmgg-train -m`` of an adaptive stage."""

    def __init__(self, config: DictConfig, config_loader: Any, launcher: Any,
                 arguments: Sequence[str]) -> None:
        import optuna

        self.config = config
        self.config_loader = config_loader
        self.launcher = launcher
        self.arguments = list(arguments)
        self.settings = sweeper_settings(config)
        try:
            self.space = stage_space(config, arguments)
        except SearchSpaceError as error:
            raise PlanError(f"stage {config.stage.name}: {error}") from None
        self.metric = str(self.settings.get("metric") or "val/loss")
        self.n_trials = int(self.settings["n_trials"])
        self.n_jobs = int(self.settings.get("n_jobs") or 1)
        self.ledger = ledger_for_stage(config)
        self.distributions = self.space.distributions()
        seed = self.settings.get("seed")
        with warnings.catch_warnings():  # constant_liar is "experimental" since 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = (optuna.samplers.RandomSampler(seed=seed)
                       if self.settings.get("sampler") == "random"
                       else optuna.samplers.TPESampler(seed=seed, constant_liar=True))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.settings.update(pruner_resources(self.settings, config))
        self.study = optuna.create_study(direction=str(self.settings["direction"]),
                                         sampler=sampler, pruner=make_pruner(self.settings))
        self.prunes = str(self.settings.get("pruner") or "none") != "none"
        self.fuse_trials = bool(self.settings.get("fuse_trials"))
        from tmgg.jobs.trials import ReportTail

        self._reports = ReportTail(self.ledger)  # the ledger's reports, read as they come
        self._fold = LedgerFold(self.ledger)  # its job states, likewise
        self._relay = relay_store(config, self.ledger) if self.prunes else None
        self._active: dict[str, PendingTrial] = {}  # job id -> its trial, while dispatched
        self._in_study: set[tuple[str, ...]] = set()  # trials the study knows as done
        self._rerun_here: set[tuple[str, ...]] = set()  # one re-run per lost trial here
        # Trials this process's threads are dispatching: their jobs may still be only
        # planned in the ledger, which alone would read as lost and be run again.
        self._pending_here: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()
        self._next_index = 0
        self.results: list[Any] = []

    # -- the ledger and the study ---------------------------------------------------
    @contextlib.contextmanager
    def _stage_locked(self) -> Iterator[None]:
        """This process's threads and other shells on the stage, one at a time."""
        with self._lock:
            self.ledger.root.mkdir(parents=True, exist_ok=True)
            with open(self.ledger.root / STUDY_LOCK, "a") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _sync(self) -> dict[tuple[str, ...], LedgerTrial]:
        """Add every completed trial of the ledger the study does not know yet."""
        import optuna
        from optuna.trial import TrialState

        trials = self._trials()
        for key, trial in trials.items():
            if trial.status not in (COMPLETE, PRUNED_TRIAL) or key in self._in_study:
                continue
            if trial.status == PRUNED_TRIAL:
                state, value = TrialState.PRUNED, None
            elif trial.value is None:
                state, value = TrialState.FAIL, None
            else:
                state, value = TrialState.COMPLETE, trial.value
            frozen = optuna.trial.create_trial(params=trial.params,
                                               distributions=self.distributions,
                                               value=value, state=state,
                                               intermediate_values=trial.reported)
            frozen.set_user_attr("job_ids", sorted(s.job_id for s in trial.jobs.values()))
            self.study.add_trial(frozen)
            self._in_study.add(key)
        return trials

    def _trials(self) -> dict[tuple[str, ...], LedgerTrial]:
        """The stage's trials now, from what was appended and recorded since the last
        call (not the whole ledger again: asks and decisions happen per trial and per
        report, so a full read each time grows with the square of the study)."""
        return ledger_trials(self.ledger, self.space, self.metric, self._reports.refresh(),
                             self._fold.states())

    def next_trial(self) -> PendingTrial | None:
        """The next trial to dispatch (a lost one first), its jobs planned in the
        ledger; None once the stage's trials reach ``n_trials``."""
        from optuna.trial import TrialState

        with self._stage_locked():
            trials = self._sync()
            for key, trial in trials.items():
                if (trial.status == TO_RERUN and key not in self._rerun_here
                        and key not in self._pending_here):
                    self._rerun_here.add(key)
                    self._pending_here.add(key)
                    jobs = self._plan(trial.params)
                    log.info("trial %s: run again (lost or failed) with its parameters",
                             ", ".join(key))
                    return PendingTrial(key, trial.params, jobs)
            if len(trials) >= self.n_trials:
                return None
            known_ids = {s.job_id for t in trials.values() for s in t.jobs.values()}
            for _ in range(MAX_REPEATED_ASKS):
                asked = self.study.ask(self.distributions)
                key = self.space.trial_key(asked.params)
                try:
                    jobs = [] if key in trials else self._compose(asked.params)
                except PlanError as error:
                    # A value between the space's ends that tmgg refuses (the ends were
                    # checked before the first trial): a failed trial, the study goes on.
                    self.study.tell(asked, state=TrialState.FAIL)
                    print(f"stage {self.ledger.stage}: trial {', '.join(key)} refused, told "
                          f"Optuna as failed: {error}", file=sys.stderr, flush=True)
                    continue
                if key in trials or any(job.job_id in known_ids for job in jobs):
                    # A config the ledger has already: never dispatched twice, ask again.
                    self.study.tell(asked, state=TrialState.FAIL)
                    continue
                record_trial_plan(jobs, self.config, self.arguments, self._study_facts())
                self._pending_here.add(key)
                return PendingTrial(key, dict(asked.params), jobs, asked)
            print(f"stage {self.ledger.stage}: {MAX_REPEATED_ASKS} asks in a row gave only "
                  "configs it ran already; the space looks exhausted, the study stops",
                  file=sys.stderr, flush=True)
            return None

    def _compose(self, params: dict[str, Any]) -> list[PlannedJob]:
        overrides = self.space.trial_overrides(params)
        jobs = compose_plan(self.config_loader, self.config, overrides, self._next_index)
        self._next_index += len(jobs)
        from tmgg.jobs.wandb_check import check_wandb_destinations

        check_wandb_destinations(jobs, self.config)  # the guard, before it is recorded
        return jobs

    def _plan(self, params: dict[str, Any]) -> list[PlannedJob]:
        jobs = self._compose(params)
        record_trial_plan(jobs, self.config, self.arguments, self._study_facts())
        return jobs

    def _study_facts(self) -> dict[str, Any]:
        return {"sweeper": "tmgg_optuna", "n_trials": self.n_trials, "metric": self.metric,
                "direction": self.settings["direction"],
                "search_space": {d.key: d.text for d in self.space.dimensions}}

    def _finish(self, pending: PendingTrial, returns: Sequence[Any]) -> None:
        """Tell Optuna the trial's outcome as the ledger now records it."""
        from optuna.trial import TrialState

        if self.n_jobs > 1:
            self._print_trial(pending, returns)
        from tmgg.jobs.trials import remove_decisions

        for job in pending.jobs:
            remove_decisions(self.ledger.root, job.job_id, self._relay)
        with self._stage_locked():
            self._pending_here.discard(pending.key)
            self.results.extend(returns)
            trials = self._trials()
            trial = trials.get(pending.key)
            if pending.asked is None:
                return  # a re-run: the next _sync adds it once complete
            if trial is not None and trial.status == COMPLETE and trial.value is not None:
                self.study.tell(pending.asked, trial.value)
                self._in_study.add(pending.key)
            elif trial is not None and trial.status == PRUNED_TRIAL:
                self.study.tell(pending.asked, state=TrialState.PRUNED)
                self._in_study.add(pending.key)
            else:
                # Failed, or run by another shell: not a value of this process; the next
                # _sync adds it from the ledger once it completes.
                self.study.tell(pending.asked, state=TrialState.FAIL)

    def _print_trial(self, pending: PendingTrial, returns: Sequence[Any]) -> None:
        """A line per job of a trial that ended (concurrent trials: the launcher's own
        display is off, launcher_without_live_display)."""
        from tmgg.launch.common import outcome_rows

        if len(returns) != len(pending.jobs):
            return
        for row in outcome_rows(pending.jobs, returns):
            print(f"{row['status']:<8} {row['job']}  {row['detail'] or ''}", file=sys.stderr,
                  flush=True)

    # -- dispatch -------------------------------------------------------------------
    def _dispatch(self, pending: PendingTrial) -> list[Any]:
        return self._dispatch_together([pending])[0]

    def _dispatch_together(self, round_: Sequence[PendingTrial]) -> list[list[Any]]:
        """The jobs of ``round_``'s trials in one launch (a launcher that fuses groups
        those sharing a batch stream); each trial's returns, in order."""
        jobs = [job for pending in round_ for job in pending.jobs]
        remember_planned(jobs)  # the launcher finds them composed
        with self._lock:
            for pending in round_:
                self._active.update({job.job_id: pending for job in pending.jobs})
        try:
            returns = list(self.launcher.launch([job.overrides for job in jobs],
                                                initial_job_idx=jobs[0].index))
        finally:
            with self._lock:
                for job in jobs:
                    self._active.pop(job.job_id, None)
        out, start = [], 0
        for pending in round_:
            out.append(returns[start:start + len(pending.jobs)])
            start += len(pending.jobs)
        return out

    # -- pruning --------------------------------------------------------------------
    def _answer_reports(self) -> None:
        """Answer every report of a job this process dispatched (tmgg.jobs.trials).

        The decision is the pruner's on a study rebuilt from the ledger for it (the
        stage's completed and pruned trials, this trial's reports up to the step), not
        on this process's in-memory study: every shell that sees the report decides the
        same, so a job handed to two shells (one of them skipped it as claimed) gets
        one answer whichever writes it."""
        from tmgg.jobs.trials import (
            CONTINUE,
            PRUNE,
            relay_decision,
            relay_reports,
            write_decision,
        )

        if self._relay is not None:  # reports of jobs that cannot see the ledger
            relay_reports(self._relay, self.ledger)
        new = self._reports.take_new()
        with self._lock:
            active = dict(self._active)
        waiting = [event for event in new if event.get("job_id") in active]
        if not waiting:
            return
        trials = self._trials()
        for event in waiting:
            job_id, step = str(event["job_id"]), int(event["step"])
            pending = active[job_id]
            trial = trials.get(pending.key)
            pruned = pending.pruned or event.get("value") is None or (
                trial is not None and (any(s.status == PRUNED for s in trial.jobs.values())
                                       or self._should_prune(trial, trials, step)))
            decision = PRUNE if pruned else CONTINUE
            pending.pruned = pruned
            write_decision(self.ledger.root, job_id, step, decision)
            if self._relay is not None:
                relay_decision(self._relay, job_id, step, decision)
            if decision == PRUNE:
                self.ledger.append({"event": "prune", "time": _now(), "job_id": job_id,
                                    "run_name": event.get("run_name"), "step": step})

    def _should_prune(self, trial: LedgerTrial,
                      trials: dict[tuple[str, ...], LedgerTrial], step: int) -> bool:
        """The pruner's decision for ``trial`` at ``step``, from the ledger alone."""
        return prune_decision(trial, trials, step, self.settings, self.distributions,
                              self.ledger.stage)

    def _pruning_loop(self, stop: threading.Event) -> None:
        while not stop.wait(0.1):
            try:
                self._answer_reports()
            except Exception:  # noqa: BLE001 - the jobs go on without a decision (timeout)
                log.exception("pruning decisions failed")

    def _worker(self, errors: list[BaseException]) -> None:
        try:
            while not errors:
                pending = self.next_trial()
                if pending is None:
                    return
                self._finish(pending, self._dispatch(pending))
        except BaseException as error:  # noqa: BLE001 - re-raised by run()
            errors.append(error)

    def run(self) -> list[Any]:
        """Run trials until the ledger holds ``n_trials`` of them; every job's return."""
        from tmgg.jobs.hydra_callbacks import refusing
        from tmgg.jobs.search_space import check_space_bounds

        with refusing():  # exit 2, "sweep refused, nothing dispatched: <the problem>"
            check_space_bounds(self.config_loader, self.config, self.space)
        stop = threading.Event()
        pruning = threading.Thread(target=self._pruning_loop, args=(stop,),
                                   name="tmgg-pruner", daemon=True)
        if self.prunes:
            pruning.start()
        try:
            self._run_trials()
        finally:
            stop.set()
            if self.prunes:
                pruning.join()
        self._sync()
        self._print_best()
        return self.results

    def _run_trials(self) -> None:
        if self.fuse_trials:
            self._run_rounds()
        elif self.n_jobs == 1:
            while (pending := self.next_trial()) is not None:
                self._finish(pending, self._dispatch(pending))
        else:
            errors: list[BaseException] = []
            threads = [threading.Thread(target=self._worker, args=(errors,),
                                        name=f"tmgg-trial-{i}", daemon=True)
                       for i in range(self.n_jobs)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]

    def _run_rounds(self) -> None:
        """``fuse_trials``: ``n_jobs`` trials at a time, their jobs in one launch, so
        that those sharing a batch stream train as one fused group (a pruned member
        leaves its group while the others train on); the next round's trials start
        when this round's last group ends (docs/adaptive.md)."""
        while True:
            round_: list[PendingTrial] = []
            while len(round_) < self.n_jobs and (pending := self.next_trial()) is not None:
                round_.append(pending)
            if not round_:
                return
            for pending, returns in zip(round_, self._dispatch_together(round_), strict=True):
                self._finish(pending, returns)

    def _print_best(self) -> None:
        from optuna.trial import TrialState

        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        trials = self._trials()
        complete = sum(1 for t in trials.values() if t.status == COMPLETE)
        pruned = sum(1 for t in trials.values() if t.status == PRUNED_TRIAL)
        line = f"stage {self.ledger.stage}: {complete}/{self.n_trials} trials complete"
        if pruned:
            line += f", {pruned} pruned"
        if done:
            best = self.study.best_trial
            params = ", ".join(f"{k}={v}" for k, v in best.params.items())
            line += f"; best {self.metric} {best.value:.6g} at {params}"
        print(line, file=sys.stderr, flush=True)


def pruner_resources(settings: dict[str, Any], config: DictConfig) -> dict[str, int]:
    """Successive halving's and Hyperband's step budget, defaults from the trainer: the
    smallest a trial gets is its first validation (``trainer.val_check_interval``), the
    largest its ``trainer.max_steps``. Given, not Optuna's "auto" (estimated from the
    trials completed so far): a decision rebuilt later must see the same rungs."""
    trainer = config.get("trainer") or {}
    minimum = settings.get("pruner_min_resource") or trainer.get("val_check_interval") or 1
    maximum = settings.get("pruner_max_resource") or trainer.get("max_steps") or minimum
    return {"pruner_min_resource": int(minimum), "pruner_max_resource": int(maximum)}


def relay_store(config: DictConfig, ledger: Ledger) -> Any:
    """The store a launcher's jobs report through when they cannot see the ledger (the
    Modal launcher's, ``trial_store_spec``), None for launchers whose jobs can."""
    from tmgg.launch.cost import is_modal_launcher

    if not is_modal_launcher(config):
        return None
    from tmgg.jobs.trials import open_store
    from tmgg.launch.modal.settings import ModalSettings, trial_store_spec

    settings = ModalSettings.from_params(config.hydra.launcher)
    return open_store(trial_store_spec(settings, ledger.root))


def make_pruner(settings: dict[str, Any]) -> Any:
    """Optuna's pruner for ``hydra.sweeper.pruner`` (``search_space.PRUNERS``).

    A decision is made on a study rebuilt from the ledger, which keeps the trials'
    intermediate values (``reported`` events); successive halving's rung values are
    derived from them (``completed_rungs``)."""
    import optuna

    kind = str(settings.get("pruner") or "none")
    startup = int(settings.get("pruner_startup_trials") or 0)
    warmup = int(settings.get("pruner_warmup_steps") or 0)
    factor = int(settings.get("pruner_reduction_factor") or 3)
    minimum = int(settings.get("pruner_min_resource") or 1)
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    if kind == "percentile":
        return optuna.pruners.PercentilePruner(float(settings.get("pruner_percentile") or 25.0),
                                               n_startup_trials=startup,
                                               n_warmup_steps=warmup)
    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=minimum,
                                                      reduction_factor=factor)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=minimum, reduction_factor=factor,
            max_resource=int(settings.get("pruner_max_resource") or minimum))
    return optuna.pruners.NopPruner()


def rung_rate(pruner: Any, study: Any, number: int, settings: dict[str, Any]) -> int:
    """The ``min_early_stopping_rate`` of the trial numbered ``number``: 0 for successive
    halving; its bracket for Hyperband (Optuna hashes the study name and the number)."""
    import types

    import optuna

    if not isinstance(pruner, optuna.pruners.HyperbandPruner):
        return 0
    if not pruner._pruners:  # noqa: SLF001 - its brackets, built once max_resource is known
        pruner._try_initialization(study)  # noqa: SLF001
    return int(pruner._get_bracket_id(study, types.SimpleNamespace(number=number)))  # noqa: SLF001


def completed_rungs(reports: dict[int, float], settings: dict[str, Any], rate: int,
                    pruned: bool) -> dict[str, float]:
    """A trial's successive-halving rung values, as Optuna's pruner records them while
    the trial reports: at each report, every rung whose promotion step
    (``min_resource * reduction_factor ** (rate + rung)``) the step has reached gets
    that report's value; a pruned trial's last report completed one rung only (it was
    stopped there). Empty for the other pruners."""
    if str(settings.get("pruner")) not in ("successive_halving", "hyperband"):
        return {}
    minimum = int(settings.get("pruner_min_resource") or 1)
    factor = int(settings.get("pruner_reduction_factor") or 3)
    attrs: dict[str, float] = {}
    rung = 0
    steps = sorted(reports)
    for position, step in enumerate(steps):
        while step >= minimum * factor ** (rate + rung):
            attrs[f"completed_rung_{rung}"] = reports[step]
            rung += 1
            if pruned and position == len(steps) - 1:
                break
    return attrs


def prune_decision(trial: LedgerTrial, trials: dict[tuple[str, ...], LedgerTrial], step: int,
                   settings: dict[str, Any], distributions: dict[str, Any],
                   study_name: str) -> bool:
    """The pruner's decision for ``trial`` at ``step``, from the ledger alone.

    The study is rebuilt with every trial of the ledger in its order (so a trial's
    number, which Hyperband's brackets hash, is the same in every shell and at every
    decision): completed and pruned trials as such, trials in flight as running, the
    others as failed (they count for no pruner). Successive halving's bookkeeping
    (each trial's ``completed_rung_<r>`` value) is derived from the trials'
    reported values (``completed_rungs``); this trial's reports up to ``step`` are
    its intermediate values, and the pruner decides on it as Optuna's
    ``should_prune`` would.
    """
    import optuna
    from optuna.trial import TrialState

    study = optuna.create_study(study_name=study_name,
                                direction=str(settings["direction"]),
                                sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=make_pruner(settings))
    pruner = study.pruner
    number = None
    for key, other in trials.items():
        rate = rung_rate(pruner, study, len(study.get_trials(deepcopy=False)),
                         settings)
        if key == trial.key:
            number = len(study.get_trials(deepcopy=False))
            reports = {s: v for s, v in other.reported.items() if s <= step}
            earlier = {s: v for s, v in reports.items() if s < step}
            state, value = TrialState.RUNNING, None
            attrs = completed_rungs(earlier, settings, rate, pruned=False)
        else:
            reports = dict(other.reported)
            if other.status == COMPLETE and other.value is not None:
                state, value = TrialState.COMPLETE, other.value
            elif other.status == PRUNED_TRIAL:
                state, value = TrialState.PRUNED, None
            elif other.status == IN_FLIGHT:
                state, value = TrialState.RUNNING, None
            else:
                state, value = TrialState.FAIL, None
            attrs = completed_rungs(reports, settings, rate,
                                    pruned=state == TrialState.PRUNED)
        study.add_trial(optuna.trial.create_trial(
            params=other.params, distributions=distributions, value=value,
            state=state, intermediate_values=reports, system_attrs=attrs))
    if number is None or not trial.reported:
        return False
    current = study.get_trials(deepcopy=False)[number]
    if current.last_step is None:
        return False
    return bool(pruner.prune(study, current))


def _now() -> str:
    from tmgg.jobs.records import utc_now

    return utc_now()


def launcher_without_live_display(launcher: Any, n_jobs: int) -> None:
    """Concurrent trials share one terminal: the local launcher's live progress display
    is one per process, so it is turned off when trials run in threads."""
    params = getattr(launcher, "params", None)
    if n_jobs > 1 and isinstance(params, dict) and "progress" in params:
        params["progress"] = False
