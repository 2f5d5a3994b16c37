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
- its owner runs on this host and is the very process (pid and start time, this
  boot) that took it, or
- its lease has not expired (another host: renewed every ``lease_s / 4`` seconds), or
- it names a detached Modal call that is still running (polled when the caller can).
A claim that is not alive is stale: its job shows as ``LOST`` and may be taken over.
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

from tmgg.orchestration.ledger import atomic_write_json
from tmgg.orchestration.records import host, utc_now

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


def this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": host(), "boot_id": _boot_id(), "pid": pid, "start": process_start(pid)}


# -- claims ------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One generation of a job's claim, as read from its file."""

    path: Path
    generation: int
    data: dict[str, Any]

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

    def describe(self) -> str:
        """``claimed by host:pid since <time>`` (and the Modal call, if any)."""
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


def current(ledger_root: Path, job_id: str) -> Claim | None:
    """The job's claim: its newest readable generation, or None if it was never claimed."""
    for generation, path in reversed(_generations(ledger_root, job_id)):
        try:
            return Claim(path, generation, json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # deleted by a newer owner's clean-up while we listed
    return None


def assess(claim: Claim, *, call_alive: Callable[[str], bool] | None = None,
           now: float | None = None) -> tuple[bool, str]:
    """Whether a claim is alive, and why (the reason is shown for LOST jobs).

    ``call_alive`` polls a Modal call; without it, a claim on a call whose lease has
    run out counts as alive (unknown until someone polls the call).
    """
    if claim.released:
        return False, f"released {claim.data.get('released_at')}"
    now = time.time() if now is None else now
    owner = claim.owner
    same_machine = owner.get("host") == host() and owner.get("boot_id") == _boot_id()
    if same_machine and process_matches(int(owner.get("pid", -1)), owner.get("start")):
        return True, "owner running"
    if claim.call_id is not None:
        if not same_machine and float(claim.data.get("lease_expires", 0)) > now:
            return True, "lease"
        if call_alive is None or call_alive(claim.call_id):
            return True, f"call {claim.call_id} running"
        return False, f"call {claim.call_id} ended"
    if same_machine:
        return False, (f"its process {owner.get('host')}:{owner.get('pid')} is gone "
                       f"(last heartbeat {claim.data.get('heartbeat_at')})")
    if float(claim.data.get("lease_expires", 0)) > now:
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
            "ticket": previous.ticket},
        **extra,
    }
    # Who dispatched the job stays named after the job's process takes the claim over.
    if previous is not None and ticket is not None and previous.ticket == ticket:
        for key in ("dispatcher", "transport"):
            if previous.data.get(key) and not extra.get(key):
                data[key] = {**previous.data[key], **(transport if key == "transport" else {})}
    return data


def _link_new(path: Path, data: dict[str, Any]) -> bool:
    """Create ``path`` holding ``data`` if it does not exist yet (link(2): atomic on NFS)."""
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
        if previous is not None and not previous.released \
                and not (ticket is not None and previous.ticket == ticket):
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
    assert holder is not None
    return False, holder


def _forget_older(ledger_root: Path, job_id: str, generation: int) -> None:
    for older, path in _generations(ledger_root, job_id):
        if older < generation:
            path.unlink(missing_ok=True)


def holds(claim: Claim) -> bool:
    """Whether ``claim`` is still the job's newest generation (nobody took it over)."""
    newest = current(claim.path.parent.parent, claim.job_id)
    return newest is not None and newest.generation == claim.generation


def renew(claim: Claim, **changes: Any) -> Claim | None:
    """Push the lease forward (and record ``changes``); None when the claim was lost."""
    if not holds(claim):
        return None
    data = {**claim.data, **changes, "heartbeat_at": utc_now(),
            "lease_expires": time.time() + float(claim.data.get("lease_s") or lease_seconds())}
    atomic_write_json(claim.path, data)
    return Claim(claim.path, claim.generation, data)


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
        lease = min((float(c.data.get("lease_s") or lease_seconds()) for c in held),
                    default=lease_seconds())
        self.interval_s = interval_s or max(1.0, lease / 4)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tmgg-claims")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self._stop.is_set():
                    return
                for job_id, claim in list(self.claims.items()):
                    try:
                        renewed = renew(claim)
                    except OSError as error:  # a hiccup of a shared FS: next time
                        log.warning("could not renew the claim of job %s: %s", job_id, error)
                        continue
                    if renewed is None:  # handed over to the job's process, or lost
                        del self.claims[job_id]
                    else:
                        self.claims[job_id] = renewed

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
    from tmgg.orchestration.ledger import IN_FLIGHT, LOST

    dead: dict[str, str] = {}
    for job_id, state in states.items():
        if state.status not in IN_FLIGHT:
            continue
        claim = current(ledger.root, job_id)
        if claim is None:  # recorded by a tmgg without claims: judge by its record
            record = state.record
            if not state.call_id and record.get("host") == host() and record.get("pid") \
                    and not pid_alive(int(record["pid"])):
                dead[job_id] = f"its process {host()}:{record['pid']} is gone"
            continue
        alive, reason = assess(claim)
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
