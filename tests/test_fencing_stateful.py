"""Exactly once under hostile interleavings: a Hypothesis state machine drives the
real claim / ledger / record API with several writers that take, renew, train, finish,
crash, pause past their lease, run with a clock hours off, and meet torn ledger lines
and claim files of the wrong shape.

Each writer is a machine of its own (another host name, so only its lease speaks for
it); the shared file system is a real temporary folder. Time passes by ageing every
claim file's mtime (the file system's clock moves on) and, for code that reads the
writer's clock, by moving ``time.time`` the same amount. A writer's own clock may be
skewed by more than a lease: it must not matter.

Invariants, checked after every step:
- never two live holders training one job: a writer may train a step only while it
  holds the newest generation, and no claim is granted while another writer's lease
  (by the file system's clock) or an unreadable claim's lease still runs;
- every job has at most one FINISHED outcome, and it came from a writer that trained
  every step of the job while holding it;
- reading the stage (``Ledger.states``, ``damaged_files``) never raises, whatever the
  files hold.

The same machine is meant to be pointed at older code (put that code's ``src`` first
on PYTHONPATH): it then finds the defects this suite fences off (see ``docs/fencing.md``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time as real_time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tmgg.jobs import claims
from tmgg.jobs.ledger import FINISHED, Ledger

LEASE_S = 60.0
STEPS_TO_FINISH = 3
JOBS = ("smoke-00000000000a", "smoke-00000000000b")
WRITERS = 3
ClaimLost = getattr(claims, "ClaimLost", None) or type("NeverRaised", (Exception,), {})
GARBAGE = (b"\x00\xffnot json", b"null", b"[1]", b'{"job_id": "x", "lease_expires": "x"}',
           b'{"job_id": ["x"], "owner": {"host": "h", "pid": 1}}', b"")


class _Clock:
    """``time`` as the code under test sees it: real time, moved on by the test, plus
    the acting writer's skew."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.skew = 0.0

    def time(self) -> float:
        return real_time.time() + self.offset + self.skew

    def monotonic(self) -> float:
        return real_time.monotonic() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(real_time, name)


class Writer:
    def __init__(self, index: int) -> None:
        self.name = f"node{index}"
        self.skew = 0.0
        self.crashed = False
        self.claims: dict[str, Any] = {}  # job -> the claim it believes it holds
        self.steps: dict[str, int] = {}  # job -> steps trained under that claim
        self.renewed_at: dict[str, float] = {}  # job -> test time of its last write


class FencedJobs(RuleBasedStateMachine):
    """Writers racing for two jobs of one stage."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = _Clock()
        self.writers = [Writer(i) for i in range(WRITERS)]
        self.acting: Writer | None = None
        self._saved = (claims.this_process, claims.time, os.environ.get("TMGG_CLAIM_LEASE_S"))
        claims.time = self.clock  # type: ignore[assignment]
        claims.this_process = self._this_process  # type: ignore[assignment]
        os.environ["TMGG_CLAIM_LEASE_S"] = str(LEASE_S)
        self.dir = Path(tempfile.mkdtemp(prefix="fence-"))
        self.ledger = Ledger(self.dir, "smoke")
        # job -> (test time the newest unreadable claim file was written), while it is
        self.damaged_at: dict[str, float] = {}
        self.finished_by: dict[str, str] = {}

    def teardown(self) -> None:
        claims.this_process, claims.time, lease = self._saved  # type: ignore[assignment]
        if lease is None:
            os.environ.pop("TMGG_CLAIM_LEASE_S", None)
        else:
            os.environ["TMGG_CLAIM_LEASE_S"] = lease
        shutil.rmtree(self.dir, ignore_errors=True)

    def _this_process(self) -> dict[str, Any]:
        writer = self.acting
        assert writer is not None
        return {"host": writer.name, "boot_id": "boot-" + writer.name, "pid": 4242,
                "start": "1", "pid_ns": "pid:[1]"}

    def _as(self, writer: Writer) -> None:
        self.acting = writer
        self.clock.skew = writer.skew

    def _live_lease(self, job: str, other_than: Writer) -> str | None:
        """Why a claim of ``job`` must not be granted now, by the model."""
        for writer in self.writers:
            if writer is other_than or writer.crashed or job not in writer.claims:
                continue
            since = self.clock.offset - writer.renewed_at[job]
            if since < LEASE_S - 1:
                return f"{writer.name} holds it and renewed {since:.0f} s ago"
        if job in self.damaged_at and self.clock.offset - self.damaged_at[job] < LEASE_S - 1:
            return "its newest claim file is unreadable and its lease still runs"
        return None

    # -- rules -----------------------------------------------------------------------
    @rule(w=st.integers(0, WRITERS - 1), job=st.sampled_from(JOBS))
    def take(self, w: int, job: str) -> None:
        writer = self.writers[w]
        if writer.crashed or job in writer.claims:
            return
        self._as(writer)
        must_refuse = self._live_lease(job, writer)
        if self.ledger.job_record(job) and self.ledger.job_record(job).get("status") == FINISHED:
            return  # a finished job is not taken again (the launchers' rule)
        taken, claim = claims.take(self.ledger.root, job, ticket=f"t-{writer.name}-{job}",
                                   transport={"kind": "test"})
        if taken:
            assert must_refuse is None, f"{writer.name} was granted {job} while {must_refuse}"
            writer.claims[job] = claim
            writer.steps[job] = 0
            writer.renewed_at[job] = self.clock.offset
            self.damaged_at.pop(job, None)

    @rule(w=st.integers(0, WRITERS - 1), job=st.sampled_from(JOBS))
    def renew(self, w: int, job: str) -> None:
        writer = self.writers[w]
        if writer.crashed or job not in writer.claims:
            return
        self._as(writer)
        renewed = claims.renew(writer.claims[job])
        if renewed is None:
            self._lose(writer, job)
        else:
            writer.claims[job] = renewed
            writer.renewed_at[job] = self.clock.offset
            self.damaged_at.pop(job, None)

    @rule(w=st.integers(0, WRITERS - 1), job=st.sampled_from(JOBS))
    def train_step(self, w: int, job: str) -> None:
        """A training step: the holder checks its fencing token first (``verify``)."""
        writer = self.writers[w]
        if writer.crashed or job not in writer.claims:
            return
        self._as(writer)
        verify = getattr(claims, "verify", None)
        try:
            if verify is not None:
                verify(writer.claims[job])
        except ClaimLost:
            self._lose(writer, job)
            return
        for other in self.writers:
            if other is not writer and not other.crashed and job in other.claims:
                newest = claims.current(self.ledger.root, job)
                mine = writer.claims[job].generation
                assert newest is not None and newest.generation == mine, (
                    f"{writer.name} trains {job} on generation {mine} while {other.name} "
                    f"holds generation {other.claims[job].generation}: two live holders")
        writer.steps[job] += 1

    @rule(w=st.integers(0, WRITERS - 1), job=st.sampled_from(JOBS))
    def finish(self, w: int, job: str) -> None:
        """The holder records FINISHED (fenced record, then outcome, then release)."""
        writer = self.writers[w]
        if writer.crashed or job not in writer.claims or writer.steps[job] < STEPS_TO_FINISH:
            return
        self._as(writer)
        claim = writer.claims[job]
        record = {"job_id": job, "run_name": job, "status": FINISHED, "by": writer.name,
                  "metrics": {"test/mse": 0.1, "steps": writer.steps[job]}}
        try:
            try:
                self.ledger.write_job_record(job, record, fence=claim)
            except TypeError:  # a ledger without fencing
                self.ledger.write_job_record(job, record)
        except ClaimLost:
            self._lose(writer, job)
            return
        self.ledger.append({"event": "outcome", "job_id": job, "status": FINISHED,
                            "by": writer.name})
        claims.release(claim, FINISHED)
        del writer.claims[job]
        self.finished_by.setdefault(job, writer.name)

    @rule(w=st.integers(0, WRITERS - 1))
    def crash(self, w: int) -> None:
        writer = self.writers[w]
        writer.crashed = True

    @rule(w=st.integers(0, WRITERS - 1),
          skew=st.sampled_from([0.0, -3 * LEASE_S, 3 * LEASE_S, -3600.0]))
    def skew_clock(self, w: int, skew: float) -> None:
        self.writers[w].skew = skew

    @rule(seconds=st.sampled_from([LEASE_S / 4, LEASE_S * 1.5]))
    def time_passes(self, seconds: float) -> None:
        """The file system's clock moves on (every claim file ages); nobody renews."""
        self.clock.offset += seconds
        for path in claims.claims_dir(self.ledger.root).glob("*.json"):
            stat = path.stat()
            os.utime(path, (stat.st_atime - seconds, stat.st_mtime - seconds))

    @rule(job=st.sampled_from(JOBS), garbage=st.sampled_from(GARBAGE),
          newer=st.booleans())
    def corrupt_claim(self, job: str, garbage: bytes, newer: bool) -> None:
        """A torn or foreign claim file: over the newest generation, or as a newer one."""
        generations = sorted(claims._generations(self.ledger.root, job))
        if not generations:
            return
        number, path = generations[-1]
        if newer:
            path = path.with_name(f"{job}.g{number + 1}.json")
        path.write_bytes(garbage)
        self.damaged_at[job] = self.clock.offset

    @rule(garbage=st.sampled_from([b'{"event": "outcome", "job_id": "smoke-0000', b"\x00\x01",
                                   b'{"event": "planned", "job_id": ["x"]}\n', b"null\n"]))
    def torn_ledger_line(self, garbage: bytes) -> None:
        self.ledger.root.mkdir(parents=True, exist_ok=True)
        with self.ledger.events_path.open("ab") as handle:
            handle.write(garbage)

    # -- invariants ------------------------------------------------------------------
    @invariant()
    def reading_the_stage_never_raises(self) -> None:
        self.acting = self.writers[0]
        self.ledger.states()
        damaged = getattr(self.ledger, "damaged_files", None)
        if damaged is not None:
            damaged()

    @invariant()
    def at_most_one_finished_outcome_from_a_real_run(self) -> None:
        for job in JOBS:
            finished = [e for e in self.ledger.events()
                        if e.get("event") == "outcome" and e.get("job_id") == job
                        and e.get("status") == FINISHED]
            assert len(finished) <= 1, f"{job} has {len(finished)} FINISHED outcomes: {finished}"
            record = self.ledger.job_record(job)
            if record and record.get("status") == FINISHED:
                assert record["metrics"]["steps"] >= STEPS_TO_FINISH

    def _lose(self, writer: Writer, job: str) -> None:
        writer.claims.pop(job, None)
        writer.steps.pop(job, None)

    @initialize()
    def start(self) -> None:
        self.ledger.root.mkdir(parents=True, exist_ok=True)
        for job in JOBS:
            self.ledger.append({"event": "planned", "job_id": job, "run_name": job})


FencedJobs.TestCase.settings = settings(
    max_examples=int(os.environ.get("TMGG_FENCE_EXAMPLES", "60")), stateful_step_count=30,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_fenced_jobs = FencedJobs.TestCase


def test_the_machine_checks_what_it_claims_to() -> None:
    """A broken fence (a take that ignores live leases) is caught by the machine."""
    original = claims.assess
    claims.assess = lambda *a, **k: (False, "pretend dead")  # type: ignore[assignment]
    try:
        with pytest.raises(AssertionError, match="was granted|two live holders"):
            machine = FencedJobs()
            try:
                machine.start()
                machine.take(0, JOBS[0])
                machine.take(1, JOBS[0])
            finally:
                machine.teardown()
    finally:
        claims.assess = original
