"""Per-job claims: one execution of a job at a time, across shells, machines and Modal.

A job is claimed before it is dispatched and while it runs, so that a second
``tmgg-train -m`` of the same stage, ``tmgg-sweep resume`` or a retry never starts a
second copy of it. The claim is per job (a sweep of another stage never waits) and
lives beside the ledger, under ``experiments/<stage>/claims/``.

**Generations.** A claim is a sequence of files ``<job_id>.g<N>.json``; the one with
the highest ``N`` is the claim. Taking or taking over a claim links a complete file
to the next generation's name with ``link(2)``, which fails when the name exists, on
local disks and on NFS alike: of two processes that both saw generation ``N`` stale,
exactly one creates ``N + 1``. A generation number is never reused (a release is one
more generation, marked released), so nobody can act on an outdated reading of a
name that was meanwhile deleted and created again. The owner renews its own
generation in place (an atomic rename) while it holds the claim.

**Hand-over.** A launcher claims a job with a fresh ``ticket`` and sends the ticket
with the job; the job's own process (a local worker, a Modal container, a detached
call) takes the next generation under the same ticket, whether or not the previous
holder still looks alive (it is the same dispatch: a worker that replaces a crashed
one, a retried Modal input) and renews it from a thread while it trains. A job
started by a launcher that knows nothing of claims (Hydra's ``basic``, submitit)
claims itself in ``on_job_start``; under SLURM the job id is its ticket (under
submitit's local executor, its controller), so a requeued job takes over its own
earlier claim.

**Liveness.** A claim is alive while it is not released and
- its owner runs on this host, in this pid namespace, and is the very process (pid
  and start time, this boot) that took it, or
- its lease has not expired (another host or pid namespace: renewed every
  ``lease_s / 4`` seconds), or
- it names a detached Modal call that is still running (polled when the caller can).
A claim that is not alive is stale: its job shows as ``LOST`` and may be taken over.

**Whose clock.** A lease is judged by the shared file system's own time: the claim
file's mtime (set by the file system when its holder renews it) against the mtime of
a probe file the reader creates beside it now. No writer's ``time.time()`` enters the
decision, so a machine whose clock is off by hours neither keeps a dead claim alive
nor takes a live one. A claim file of the wrong shape (``schema.Damaged``) is judged
the same way: held until its lease has run out by the file system's time, then stale.

**Fencing.** A claim's generation is its fencing token. The holder checks it before
every write that changes its job's state (``verify``) and from its heartbeat: once a
newer generation exists (or its lease could not be renewed in time) it has lost the
job, raises ``ClaimLost`` naming the job and the new holder, and writes nothing more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmgg.jobs import schema
from tmgg.jobs.ledger import atomic_write_json
from tmgg.jobs.records import host, utc_now

log = logging.getLogger(__name__)

CLAIMS_DIR = "claims"
# Seconds a claim stays alive without a renewal, seen from another host. Long enough
# for a paused laptop or a slow shared file system; a dead process on the claim's own
# host is detected at once (pid and start time), so this only delays detecting a lost
# node. TMGG_CLAIM_LEASE_S overrides it (tests of a lost node use a short lease).
DEFAULT_LEASE_S = 120.0
_GENERATION = re.compile(r"\.g(\d+)\.json$")

# The ticket of the dispatch this process is running a job for (set by the executor
# from the payload), or None when the job was started by a launcher without claims.
_dispatch_ticket: str | None = None


def lease_seconds() -> float:
    return float(os.environ.get("TMGG_CLAIM_LEASE_S") or DEFAULT_LEASE_S)


def new_ticket() -> str:
    return uuid.uuid4().hex


def set_dispatch_ticket(ticket: str | None) -> None:
    global _dispatch_ticket
    _dispatch_ticket = ticket


def dispatch_ticket() -> str | None:
    """This job's dispatch ticket: from its launcher, else its SLURM job (requeues keep it)."""
    if _dispatch_ticket:
        return _dispatch_ticket
    slurm_job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if slurm_job:
        task = os.environ.get("SLURM_ARRAY_TASK_ID", "")
        return f"slurm-{slurm_job}-{task}" if task else f"slurm-{slurm_job}"
    local_job = os.environ.get("SUBMITIT_LOCAL_JOB_ID")  # submitit's local rehearsal
    if local_job:
        return f"submitit-local-{host()}-{local_job}"
    return None


# -- processes ---------------------------------------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot, Linux); None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if fields and fields[0] == "Z":  # exited, not yet reaped: not the process any more
        return None
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (a zombie, even our own child, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie child of this process is not alive
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return not is_zombie(pid)


def is_zombie(pid: int) -> bool:
    """An exited process not yet reaped by its parent (Linux /proc; False elsewhere)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def process_matches(pid: int, start: str | None) -> bool:
    """Whether ``pid`` is still the process that started at ``start`` on this host."""
    if start is not None and Path("/proc").is_dir():
        return process_start(pid) == start
    return pid_alive(pid)


def pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[4026531836]``); None where /proc has none.

    Containers with host networking share hostname and boot id but not pids: a pid
    is only meaningful inside the namespace it was read in.
    """
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": host(), "boot_id": _boot_id(), "pid": pid, "start": process_start(pid),
            "pid_ns": pid_namespace()}


def fs_now(directory: Path) -> float:
    """The shared file system's current time, as it stamps files in ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".clock.", dir=directory)
    except OSError:  # a read-only copy of the stage: nobody can take or renew there
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        Path(probe).unlink(missing_ok=True)


# -- claims ------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One generation of a job's claim, as read from its file."""

    path: Path
    generation: int
    data: dict[str, Any]
    mtime: float | None = None  # the file system's time of its last write (the lease)
    damaged: str | None = None  # why the file is not a claim (then ``data`` is empty)

    @property
    def job_id(self) -> str:
        return str(self.data.get("job_id"))

    @property
    def ticket(self) -> str | None:
        return self.data.get("ticket")

    @property
    def released(self) -> bool:
        return bool(self.data.get("released"))

    @property
    def owner(self) -> dict[str, Any]:
        return self.data.get("owner") or {}

    @property
    def call_id(self) -> str | None:
        return (self.data.get("transport") or {}).get("call_id")

    @property
    def lease_s(self) -> float:
        value = self.data.get("lease_s")
        return float(value) if value else lease_seconds()

    def describe(self) -> str:
        """``claimed by host:pid since <time>`` (and the Modal call, if any)."""
        if self.damaged is not None:
            return (f"claimed by an unreadable claim file {self.path.name} (held until its "
                    f"lease has run out): {self.damaged}")
        owner = self.owner
        text = (f"claimed by {owner.get('host')}:{owner.get('pid')} since "
                f"{self.data.get('taken_at')}")
        transport = self.data.get("transport") or {}
        if transport.get("kind"):
            text += f" ({transport['kind']}"
            text += f" call {self.call_id})" if self.call_id else ")"
        return text


def claims_dir(ledger_root: Path) -> Path:
    return Path(ledger_root) / CLAIMS_DIR


def _generations(ledger_root: Path, job_id: str) -> list[tuple[int, Path]]:
    directory = claims_dir(ledger_root)
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.startswith(f"{job_id}.g"):
                match = _GENERATION.search(entry.name)
                if match and entry.name[: match.start()] == job_id:
                    found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def read_claim(path: Path, generation: int) -> Claim:
    """One generation as it is on disk; a file of the wrong shape is a damaged claim.
    ``FileNotFoundError`` when it is gone."""
    mtime = os.lstat(path).st_mtime
    try:
        data = schema.read(path, schema.ClaimFile)
    except schema.Damaged as error:
        return Claim(path, generation, {}, mtime=mtime, damaged=error.reason)
    return Claim(path, generation, data, mtime=mtime)


def current(ledger_root: Path, job_id: str) -> Claim | None:
    """The job's claim: its newest generation (possibly damaged), or None if it was
    never claimed."""
    for generation, path in reversed(_generations(ledger_root, job_id)):
        try:
            return read_claim(path, generation)
        except FileNotFoundError:
            continue  # deleted by a newer owner's clean-up while we listed
    return None


def _lease_left(claim: Claim, now: float) -> float:
    """Seconds of lease left, by the file system's clock (``now`` from ``fs_now``)."""
    return (claim.mtime if claim.mtime is not None else 0.0) + claim.lease_s - now


def assess(claim: Claim, *, call_alive: Callable[[str], bool] | None = None,
           now: float | None = None) -> tuple[bool, str]:
    """Whether a claim is alive, and why (the reason is shown for LOST jobs).

    ``call_alive`` polls a Modal call; without it, a claim on a call whose lease has
    run out counts as alive (unknown until someone polls the call).
    """
    now = fs_now(claim.path.parent) if now is None else now
    if claim.damaged is not None:
        if _lease_left(claim, now) > 0:
            return True, "lease (unreadable claim file)"
        return False, (f"its claim file {claim.path.name} is unreadable ({claim.damaged}) "
                       f"and its lease has run out")
    if claim.released:
        return False, f"released {claim.data.get('released_at')}"
    owner = claim.owner
    # Same machine *and* pid namespace: only then is its pid ours to look up.
    same_machine = (owner.get("host") == host() and owner.get("boot_id") == _boot_id()
                    and owner.get("pid_ns") is not None
                    and owner.get("pid_ns") == pid_namespace())
    if same_machine and process_matches(int(owner.get("pid", -1)), owner.get("start")):
        return True, "owner running"
    if claim.call_id is not None:
        if not same_machine and _lease_left(claim, now) > 0:
            return True, "lease"
        if call_alive is None or call_alive(claim.call_id):
            return True, f"call {claim.call_id} running"
        return False, f"call {claim.call_id} ended"
    if same_machine:
        return False, (f"its process {owner.get('host')}:{owner.get('pid')} is gone "
                       f"(last heartbeat {claim.data.get('heartbeat_at')})")
    if _lease_left(claim, now) > 0:
        return True, "lease"
    return False, f"no heartbeat from {owner.get('host')} since {claim.data.get('heartbeat_at')}"


def _payload(job_id: str, ticket: str | None, transport: dict[str, Any],
             previous: Claim | None, extra: dict[str, Any]) -> dict[str, Any]:
    now = utc_now()
    lease = lease_seconds()
    data = {
        "job_id": job_id, "ticket": ticket, "owner": this_process(), "transport": transport,
        "taken_at": now, "heartbeat_at": now, "lease_s": lease,
        "lease_expires": time.time() + lease, "released": False,
        "took_over": None if previous is None or previous.released else {
            "generation": previous.generation, "owner": previous.owner,
            "ticket": previous.ticket, "damaged": previous.damaged},
        **extra,
    }
    # Who dispatched the job stays named after the job's process takes the claim over.
    if previous is not None and ticket is not None and previous.ticket == ticket \
            and previous.damaged is None:
        for key in ("dispatcher", "transport"):
            if previous.data.get(key) and not extra.get(key):
                data[key] = {**previous.data[key], **(transport if key == "transport" else {})}
    return data


def _link_new(path: Path, data: dict[str, Any]) -> bool:
    """Create ``path`` holding ``data`` if it does not exist yet (link(2): atomic on NFS)."""
    from tmgg.jobs.ledger import refuse_links

    refuse_links(path, path.parents[2])  # <experiments_dir>/<stage>/claims/<file>
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            # NFS may report an error for a link that was made: the link count tells.
            if os.stat(tmp).st_nlink != 2:
                raise
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def take(ledger_root: Path, job_id: str, *, ticket: str | None, transport: dict[str, Any],
         call_alive: Callable[[str], bool] | None = None,
         extra: dict[str, Any] | None = None) -> tuple[bool, Claim]:
    """Claim a job: ``(True, claim)`` when this process now holds it, or
    ``(False, holder)`` when a live claim of another dispatch holds it.

    A claim under the same ticket (this dispatch's earlier attempt, or its launcher's
    claim handed over to the job) is taken over even if it looks alive.
    """
    for _ in range(20):
        previous = current(ledger_root, job_id)
        if previous is not None and (previous.damaged is not None or not previous.released) \
                and not (ticket is not None and previous.ticket == ticket
                         and previous.damaged is None):
            alive, _reason = assess(previous, call_alive=call_alive)
            if alive:
                return False, previous
        generation = previous.generation + 1 if previous else 1
        path = claims_dir(ledger_root) / f"{job_id}.g{generation}.json"
        data = _payload(job_id, ticket, transport, previous, extra or {})
        if not _link_new(path, data):
            continue  # another process took this generation first: look again
        newest = current(ledger_root, job_id)
        if newest is None or newest.generation != generation:
            continue  # a stale reading made us link an old number; a newer claim exists
        claim = Claim(path, generation, data)
        _forget_older(ledger_root, job_id, generation)
        return True, claim
    holder = current(ledger_root, job_id)
    if holder is None:  # every generation vanished while we raced: nobody holds it
        holder = Claim(claims_dir(ledger_root) / f"{job_id}.g0.json", 0, {},
                       damaged="its claim files changed faster than they could be read")
    return False, holder


def _forget_older(ledger_root: Path, job_id: str, generation: int) -> None:
    for older, path in _generations(ledger_root, job_id):
        if older < generation:
            path.unlink(missing_ok=True)


def holds(claim: Claim) -> bool:
    """Whether ``claim`` is still the job's newest generation (nobody took it over)."""
    newest = current(claim.path.parent.parent, claim.job_id)
    return newest is not None and newest.generation == claim.generation


class ClaimLost(RuntimeError):
    """This process no longer holds its job's claim: it must stop and write nothing."""

    def __init__(self, claim: Claim, newest: Claim | None, why: str | None = None) -> None:
        self.job_id = claim.job_id
        self.generation = claim.generation
        self.holder = newest.describe() if newest is not None else "nobody"
        reason = why or (f"generation {newest.generation} is newer than ours"
                         if newest is not None else "its claim files are gone")
        super().__init__(
            f"job {claim.job_id}: this process lost its claim (generation "
            f"{claim.generation}; {reason}); the job is now {self.holder}. Training "
            f"stopped and nothing more is recorded for it by this process.")


def verify(claim: Claim) -> None:
    """The fencing check before a state-changing write: ``ClaimLost`` unless ``claim``
    is still the newest generation of its job."""
    newest = current(claim.path.parent.parent, claim.job_id)
    if newest is None or newest.generation != claim.generation:
        raise ClaimLost(claim, newest)


def fence_ticket(ledger_root: Path, job_id: str, ticket: str | None) -> Claim | None:
    """For a launcher's write about a job it dispatched under ``ticket``: the newer
    claim of another dispatch that fences it off, or None when the write may go on."""
    if ticket is None:
        return None
    newest = current(ledger_root, job_id)
    if newest is None or newest.ticket == ticket:
        return None
    return newest


def renew(claim: Claim, **changes: Any) -> Claim | None:
    """Push the lease forward (and record ``changes``); None when the claim was lost."""
    if not holds(claim):
        return None
    data = {**claim.data, **changes, "heartbeat_at": utc_now(),
            "lease_expires": time.time() + claim.lease_s}  # for people; not judged
    from tmgg.jobs.ledger import refuse_links

    refuse_links(claim.path, claim.path.parents[2])
    atomic_write_json(claim.path, data)
    return Claim(claim.path, claim.generation, data, mtime=os.stat(claim.path).st_mtime)


def release(claim: Claim, outcome: str | None = None) -> bool:
    """Give a claim up (one more generation, marked released); False if it was lost."""
    if not holds(claim):
        return False
    data = {**claim.data, "released": True, "released_at": utc_now(), "outcome": outcome,
            "released_by": this_process()}
    path = claim.path.parent / f"{claim.job_id}.g{claim.generation + 1}.json"
    if not _link_new(path, data):
        return False
    _forget_older(claim.path.parent.parent, claim.job_id, claim.generation + 1)
    return True


def release_ticket(ledger_root: Path, job_id: str, ticket: str, outcome: str | None) -> bool:
    """Release the job's claim if it is still held under ``ticket`` (a launcher after its
    job's outcome: the job's own process released it already, unless it crashed)."""
    claim = current(ledger_root, job_id)
    if claim is None or claim.released or claim.ticket != ticket:
        return False
    return release(claim, outcome)


class Heartbeat:
    """Renews claims from a daemon thread until stopped: the job's own claim inside its
    process, or a blocking launcher's claims on jobs queued at Modal."""

    def __init__(self, *held: Claim, interval_s: float | None = None) -> None:
        self.claims = {claim.job_id: claim for claim in held}
        lease = min((c.lease_s for c in held), default=lease_seconds())
        self.lease_s = lease
        self.interval_s = interval_s or max(1.0, lease / 4)
        # job id -> the ClaimLost that ended its claim (the job must stop)
        self.lost: dict[str, ClaimLost] = {}
        self._renewed_at = {claim.job_id: time.monotonic() for claim in held}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tmgg-claims")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self._stop.is_set():
                    return
                for job_id in list(self.claims):
                    self._renew(job_id)

    def _renew(self, job_id: str) -> None:
        """Renew one claim (lock held); a lost one moves to ``lost``."""
        claim = self.claims[job_id]
        try:
            renewed = renew(claim)
        except OSError as error:  # a hiccup of a shared FS: next time
            log.warning("could not renew the claim of job %s: %s", job_id, error)
            return
        if renewed is None:  # handed over to the job's process, or lost
            del self.claims[job_id]
            self.lost[job_id] = ClaimLost(claim, current(claim.path.parent.parent, job_id))
        else:
            self.claims[job_id] = renewed
            self._renewed_at[job_id] = time.monotonic()

    def check(self, job_id: str) -> None:
        """For the job's training loop: ``ClaimLost`` once its claim is lost, or when it
        could not be renewed for a whole lease. After a pause (SIGSTOP, a suspended
        laptop) longer than a renewal interval, renews at once to find out."""
        with self._lock:
            if job_id in self.lost:
                raise self.lost[job_id]
            claim = self.claims.get(job_id)
            if claim is None:
                return
            since = time.monotonic() - self._renewed_at.get(job_id, 0.0)
            if since > self.interval_s * 1.5:
                self._renew(job_id)
                if job_id in self.lost:
                    raise self.lost[job_id]
                if time.monotonic() - self._renewed_at.get(job_id, 0.0) > self.lease_s:
                    self.lost[job_id] = ClaimLost(
                        claim, current(claim.path.parent.parent, job_id),
                        f"its lease could not be renewed for {since:.0f} s")
                    self.claims.pop(job_id, None)
                    raise self.lost[job_id]

    def discard(self, job_id: str) -> Claim | None:
        """Stop renewing one claim; the claim as last written."""
        with self._lock:
            return self.claims.pop(job_id, None)

    def stop(self) -> list[Claim]:
        """Stop renewing (no renewal runs after this returns); the claims as last written."""
        with self._lock:
            self._stop.set()
            return list(self.claims.values())


def mark_lost(ledger: Any, states: dict[str, Any], refolded: bool = False) -> dict[str, Any]:
    """Show each in-flight job's holder, and mark ``LOST`` those whose claim is dead.

    Reads no network: a claim on a detached Modal call counts as alive until the call
    is polled (``tmgg-sweep status`` polls first).
    """
    from tmgg.jobs.ledger import IN_FLIGHT, LOST, SKIPPED

    dead: dict[str, str] = {}
    now: float | None = None
    for job_id, state in states.items():
        if state.status not in IN_FLIGHT and state.status != SKIPPED:
            continue
        claim = current(ledger.root, job_id)
        if claim is None and state.status == SKIPPED:
            dead[job_id] = "skipped as claimed elsewhere, but no claim holds it"
            continue
        if claim is None:  # recorded by a tmgg without claims: judge by its record
            record = state.record
            if not state.call_id and record.get("host") == host() and record.get("pid") \
                    and not pid_alive(int(record["pid"])):
                dead[job_id] = f"its process {host()}:{record['pid']} is gone"
            continue
        if now is None:  # one reading of the file system's clock for the whole stage
            now = fs_now(claims_dir(ledger.root))
        alive, reason = assess(claim, now=now)
        if alive:
            state.claim = claim.describe()
        else:
            dead[job_id] = reason
    if dead and not refolded:
        # Outcomes are written before claims are released: fold again, then judge.
        return mark_lost(ledger, ledger._fold(), refolded=True)
    for job_id, reason in dead.items():
        states[job_id].status = LOST
        states[job_id].claim = reason
    return states


def lightning_fence(check: Callable[[], None]) -> Any:
    """A Lightning callback that stops training (``ClaimLost``) once ``check`` raises:
    before every step and before a checkpoint is written (so a holder that lost its
    claim promotes no checkpoint)."""
    from lightning.pytorch.callbacks import Callback

    class ClaimFence(Callback):
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            check()

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            check()

        def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
            check()

        def on_test_start(self, trainer: Any, pl_module: Any) -> None:
            check()

    return ClaimFence()
