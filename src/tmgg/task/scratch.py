"""Where a job writes the files it keeps open: off a volume that cannot commit with them.

A Modal Volume cannot commit while a file on it is open, and the W&B run keeps its
files open for as long as it lives. The launcher that mounts such a volume names it
and a scratch folder in two environment variables; the job then writes those files
to the scratch mirror of its output directory (``off_volume``), and the launcher
copies them back (``tmgg.launch.modal.volume_files``). The task reads the variables
and knows no launcher. Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

# Set by the launcher (tmgg.launch.modal.app.run_job) while a job runs on a volume.
VOLUME_ROOT_ENV = "TMGG_VOLUME_ROOT"
SCRATCH_ROOT_ENV = "TMGG_VOLUME_SCRATCH"


def off_volume(path: Path) -> Path:
    """``path``, or its mirror under the scratch root when it lies on the volume."""
    volume, scratch = os.environ.get(VOLUME_ROOT_ENV), os.environ.get(SCRATCH_ROOT_ENV)
    if not volume or not scratch:
        return path
    try:
        relative = Path(path).resolve().relative_to(Path(volume).resolve())
    except ValueError:
        return path
    return Path(scratch) / relative
