"""Which process a pid is: enough to prove it is the one we started, before signalling it.

A pid read back from a file under ``experiments/`` (shared, committed) proves nothing:
the process may have ended and the pid been reused, or the file may have been written
by someone else to point at any process. ``ProcessIdentity`` pairs the pid with what
cannot be reused or forged without running the process oneself: the host and boot it
runs on, its start time in clock ticks since boot (field 22 of ``/proc/<pid>/stat``)
and its command line. Linux only (``/proc``); elsewhere nothing can be proved, so
nothing is signalled.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

PROC = Path("/proc")


@dataclasses.dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    host: str
    boot_id: str
    start_ticks: int
    argv: tuple[str, ...]

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The live process ``pid`` as seen now; None when it is gone or /proc is absent."""
        try:
            stat = (PROC / str(pid) / "stat").read_text()
            cmdline = (PROC / str(pid) / "cmdline").read_bytes()
            boot_id = (PROC / "sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return None
        # The command name (field 2) is in parentheses and may hold spaces or ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) < 20 or fields[0] == "Z":  # a zombie has ended
            return None
        argv = tuple(part.decode(errors="replace") for part in cmdline.split(b"\0") if part)
        return cls(pid=pid, host=socket.gethostname(), boot_id=boot_id,
                   start_ticks=int(fields[19]), argv=argv)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "argv": list(self.argv)}

    @classmethod
    def from_json(cls, data: Any) -> ProcessIdentity | None:
        """Read back strictly: any other shape is not an identity (None)."""
        if not isinstance(data, dict):
            return None
        pid, ticks, argv = data.get("pid"), data.get("start_ticks"), data.get("argv")
        host, boot_id = data.get("host"), data.get("boot_id")
        if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 1
                and isinstance(ticks, int) and not isinstance(ticks, bool)
                and isinstance(host, str) and isinstance(boot_id, str)
                and isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
            return None
        return cls(pid=pid, host=host, boot_id=boot_id, start_ticks=ticks, argv=tuple(argv))

    @classmethod
    def read(cls, path: Path) -> ProcessIdentity | None:
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def is_live(self) -> bool:
        """The very process this identity was taken of is still running."""
        return ProcessIdentity.of(self.pid) == self


def why_not_ours(identity: ProcessIdentity | None,
                 expected_argv_tail: tuple[str, ...]) -> str | None:
    """None when ``identity`` is a live process running the expected command, else why not.

    The command is compared by its arguments after the interpreter (``argv[1:]``),
    which name the call, so a recorded identity of another program never qualifies.
    """
    if identity is None:
        return "no valid process record"
    if identity.argv[1:] != expected_argv_tail:
        return (f"the recorded process runs {' '.join(identity.argv)!r}, not "
                f"{' '.join(expected_argv_tail)!r}")
    if identity.host != socket.gethostname():
        return f"it was started on host {identity.host}, this is {socket.gethostname()}"
    if not identity.is_live():
        return f"process {identity.pid} is no longer the one that was started (ended or reused)"
    return None
