"""Files a job keeps open, and a Modal Volume that cannot commit while files are open.

modal 1.6.4's ``Volume.commit()`` commits and then reloads the volume, and both raise
``RuntimeError`` ("there are open files preventing the operation") while a file on
the volume is open in the container. A tmgg job keeps three kinds open under its
output directory on the volume:

- the W&B run's files (wandb writes them for as long as the run lives): the run
  writes to a scratch mirror of its output directory off the volume instead
  (``tmgg.task.scratch.off_volume``), copied back onto the volume after the job (``copy_back``);
- Hydra's job log (a ``logging.FileHandler``): closed before each commit or reload
  (``close_log_files_under``); the handler reopens the file at its next record;
- Lightning's CSV logger opens and closes its files per write: nothing to do.

Light on purpose (os, pathlib, logging).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

# Set by the Modal function (tmgg.launch.modal.app.run_job) while a job runs; the job
# reads them (tmgg.task.scratch.off_volume): the task knows no launcher.
from tmgg.task.scratch import SCRATCH_ROOT_ENV, VOLUME_ROOT_ENV

__all__ = ["SCRATCH_ROOT_ENV", "VOLUME_ROOT_ENV", "close_log_files_under", "copy_back",
           "open_files_under"]


def copy_back(scratch: Path, volume: Path) -> int:
    """Copy the scratch mirror's regular files onto the volume, then empty it; files copied.

    Symbolic links (wandb's ``latest-run``, ``debug.log``) are skipped: they point into
    the scratch tree.
    """
    copied = 0
    if not scratch.is_dir():
        return 0
    for directory, _, names in os.walk(scratch):
        for name in names:
            source = Path(directory) / name
            if source.is_symlink() or not source.is_file():
                continue
            target = volume / source.relative_to(scratch)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied += 1
    shutil.rmtree(scratch, ignore_errors=True)
    return copied


def close_log_files_under(root: Path) -> int:
    """Close every logging.FileHandler writing under ``root``; how many were closed.

    A closed FileHandler (mode 'a') reopens its file at its next record.
    """
    root = Path(root).resolve()
    loggers = [logging.getLogger()] + [
        item for item in logging.Logger.manager.loggerDict.values()
        if isinstance(item, logging.Logger)]
    closed = 0
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) and handler.stream is not None \
                    and _is_under(Path(handler.baseFilename), root):
                handler.close()
                closed += 1
    return closed


def open_files_under(root: Path, pids: list[int] | None = None) -> list[str]:
    """Files under ``root`` open in this process and its descendants (Linux /proc).

    What Modal's volume refuses a commit for; the local stand-in volume checks the same.
    """
    root = Path(root).resolve()
    found = []
    for pid in pids if pids is not None else _self_and_descendants():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/") and _is_under(Path(target), root):
                found.append(target)
    return sorted(set(found))


def _self_and_descendants() -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[-1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, stack = [], [os.getpid()]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _is_under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True
