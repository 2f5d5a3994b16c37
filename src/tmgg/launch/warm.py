"""Importing this module warms a local worker up: it is the fork server's preload.

A tmgg job's first run in a fresh process would import torch, lightning (≈3 s on one
core), networkx and the task modules, and discover Hydra's plugins (the executor
keeps a worker's discovered plugins between jobs). The local launcher's fork server
imports this module once, while Hydra composes the sweep, so every worker forked from
it starts with all of that done; with ``start_method=spawn`` each worker imports it
once. ``multiprocessing`` can only preload modules by name, hence a module whose
import is the work.
"""

import contextlib
import gc


def _import_what_jobs_need() -> None:
    import lightning  # noqa: F401
    import networkx  # noqa: F401
    import torch  # noqa: F401
    from hydra._internal import callbacks  # noqa: F401
    from hydra.core import utils  # noqa: F401
    from hydra.core.plugins import Plugins

    import tmgg.task.module  # noqa: F401
    import tmgg.task.train  # noqa: F401
    import tmgg.task.wandb_guard  # noqa: F401

    # A discovery error is left for the job to meet and report; the fork server must live.
    with contextlib.suppress(Exception):
        Plugins.instance()


# The imports create ~400 000 objects that live as long as the process; the garbage
# collector's full passes over them on the way cost ~15% of the import time. Frozen
# afterwards, they are skipped by every collection in the workers forked from here.
gc.disable()
try:
    _import_what_jobs_need()
finally:
    gc.freeze()
    gc.enable()
