"""Where a sweep writes: ``experiments_dir`` and ``outputs_dir``, checked before planning.

tmgg finds ``conf/`` through the checkout, whatever directory it is started from, but a
relative ``experiments_dir`` or ``outputs_dir`` is taken from the working directory.
Started from elsewhere, a sweep would see no records and train every job again into a
second ledger under the same job and W&B run ids. So a relative directory is accepted
only when the working directory is the checkout that holds ``conf/``; otherwise the
command is refused with the ``cd`` to type. An unwritable directory is refused too, in
one line, before any job is composed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tmgg.config import CONF_DIR
from tmgg.config.project_files import CONF_DIR_ENV
from tmgg.jobs.plan import PlanError

WORK_DIR_FIELDS = ("experiments_dir", "outputs_dir")


class WorkDirError(PlanError):
    """experiments_dir or outputs_dir cannot be used from here."""


def project_root() -> Path | None:
    """The directory that holds the ``conf/`` tmgg composes from; None when
    ``$TMGG_CONF_DIR`` names a copy of it (then relative paths mean the working dir)."""
    if os.environ.get(CONF_DIR_ENV):
        return None
    return CONF_DIR.resolve().parent


def unwritable(path: Path) -> str | None:
    """Why nothing could be written under ``path`` (its nearest existing ancestor
    decides), or None."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def check_work_dirs(config: Any, writable: bool = True) -> None:
    """Refuse (PlanError, one line) a relative work dir used from outside the checkout,
    and, with ``writable``, a work dir nothing can be written to."""
    root = project_root()
    here = Path.cwd().resolve()
    for field in WORK_DIR_FIELDS:
        value = config.get(field)
        if value is None or str(value) == "":
            continue  # the schema refuses it, naming the job and the field
        value = str(value)
        path = Path(value)
        if not path.is_absolute() and root is not None and here != root:
            raise WorkDirError(
                f"{field}={value} is relative, and this shell is in {here}, not in the "
                f"checkout {root} whose conf/ tmgg uses: its records would go to "
                f"{here / path}, apart from {root / path}. Run it from the checkout "
                f"(cd {root}), or give absolute experiments_dir= and outputs_dir=")
        if writable:
            problem = unwritable(path.absolute())
            if problem is not None:
                raise WorkDirError(f"{field}={value} cannot be written: {problem}")


def ledger_path(config: Any) -> Path:
    """The absolute ledger directory of the config's stage (for the plan line)."""
    experiments = Path(str(config["experiments_dir"]))
    return (experiments if experiments.is_absolute() else Path.cwd() / experiments).resolve() \
        / str(config["stage"]["name"])
