"""The ledger survives a full disk and a kill mid-write: no complete event is lost."""

from __future__ import annotations

import errno
import json
import os
import textwrap
from pathlib import Path

import pytest
from conftest import SweepDirs, run_cli, tmgg_sweep

from tmgg.jobs.ledger import Ledger


def _event(number: int) -> dict:
    return {"event": "planned", "job_id": f"smoke-{number:04d}", "run_name": f"smoke_job_{number}",
            "overrides": [f"seed={number}"], "time": "2026-01-01T00:00:00.000+00:00"}


def _job_ids(ledger: Ledger) -> list[str]:
    return [event["job_id"] for event in ledger.events()]


def test_truncated_last_line_then_append_loses_no_complete_event(sweep_dirs: SweepDirs) -> None:
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    ledger.append_many([_event(1), _event(2), _event(3)])
    data = ledger.events_path.read_bytes()
    ledger.events_path.write_bytes(data[:-25])  # the third line cut mid-write, no newline
    ledger.append(_event(4))

    assert _job_ids(ledger) == ["smoke-0001", "smoke-0002", "smoke-0004"]
    assert [number for number, _ in ledger.damaged_lines()] == [3]

    status = tmgg_sweep("status", "--json", "stage=smoke", *sweep_dirs.overrides)
    assert status.returncode == 0, status.stderr[-2000:]
    report = json.loads(status.stdout)
    assert sorted(job["job_id"] for job in report["jobs"]) == [
        "smoke-0001", "smoke-0002", "smoke-0004"]
    assert [damaged["line"] for damaged in report["damaged_lines"]] == [3]
    table = tmgg_sweep("status", "stage=smoke", *sweep_dirs.overrides)
    assert "ledger.jsonl line 3 is damaged" in table.stdout


def test_short_writes_are_completed(sweep_dirs: SweepDirs, monkeypatch: pytest.MonkeyPatch
                                    ) -> None:
    """os.write may write less than asked (a signal, a pipe, some file systems)."""
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    real_write = os.write
    calls = []

    def dribble(fd: int, data: bytes) -> int:
        calls.append(len(data))
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", dribble)
    ledger.append_many([_event(1), _event(2)])
    monkeypatch.undo()
    assert len(calls) > 2
    assert _job_ids(ledger) == ["smoke-0001", "smoke-0002"] and not ledger.damaged_lines()


def test_full_disk_mid_append_raises_and_the_next_append_is_whole(
        sweep_dirs: SweepDirs, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    ledger.append(_event(1))
    real_write = os.write

    def disk_fills(fd: int, data: bytes) -> int:
        monkeypatch.setattr(os, "write", _raise_enospc)
        return real_write(fd, bytes(data[:30]))

    monkeypatch.setattr(os, "write", disk_fills)
    with pytest.raises(OSError) as raised:
        ledger.append_many([_event(2), _event(3)])
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    ledger.append(_event(4))  # space again
    assert _job_ids(ledger) == ["smoke-0001", "smoke-0004"]
    assert [number for number, _ in ledger.damaged_lines()] == [2]


def _raise_enospc(fd: int, data: bytes) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_writer_killed_inside_append_many(sweep_dirs: SweepDirs) -> None:
    """A real SIGKILL between two partial writes of one append."""
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    ledger.append(_event(1))
    code = textwrap.dedent(f"""
        import os, signal
        from tmgg.jobs.ledger import Ledger
        real_write = os.write
        def write_then_die(fd, data):
            real_write(fd, bytes(data[:len(data) // 2 + 20]))  # 2nd line torn
            os.kill(os.getpid(), signal.SIGKILL)
        os.write = write_then_die
        Ledger({str(sweep_dirs.experiments)!r}, "smoke").append_many(
            [{_event(2)!r}, {_event(3)!r}])
    """)
    killed = run_cli(["-c", code])
    assert killed.returncode == -9
    ledger.append(_event(4))
    assert _job_ids(ledger) == ["smoke-0001", "smoke-0002", "smoke-0004"]
    assert [number for number, _ in ledger.damaged_lines()] == [3]


def test_event_glued_behind_a_torn_line_is_recovered_and_named(tmp_path: Path) -> None:
    """Ledgers written before appends closed torn lines have the next event on the
    torn line itself: that event is read, and the line is still reported damaged."""
    ledger = Ledger(tmp_path, "smoke")
    lines = [json.dumps(_event(1), sort_keys=True),
             json.dumps(_event(2), sort_keys=True)[:40] + json.dumps(_event(3), sort_keys=True)]
    ledger.root.mkdir(parents=True)
    ledger.events_path.write_text("\n".join(lines) + "\n")
    assert _job_ids(ledger) == ["smoke-0001", "smoke-0003"]
    assert [number for number, _ in ledger.damaged_lines()] == [2]
