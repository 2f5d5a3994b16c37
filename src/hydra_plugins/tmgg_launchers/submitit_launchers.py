"""SLURM (and its local rehearsal) through hydra-submitit-launcher, one fused group per
array task.

``hydra/launcher=slurm`` and ``=submitit_local_tmgg`` (conf/hydra/launcher/) build on
these nodes: hydra-submitit-launcher's own settings plus ``fuse`` and
``fuse_max_members``. The launchers are hydra-submitit-launcher's, with ``launch``
replaced by ``tmgg.launch.submitit_tasks.launch_submitit``: jobs that share a batch
stream become one array task that trains them together, each member still its own
job (its own record, outputs, W&B run and JobReturn); every other job is an array task
of its own. Requeue on a time-out or preemption resubmits the task, which resumes each
unfinished member from its own checkpoint.

Hydra imports this module at every start-up: hydra, omegaconf, dataclasses and the
submitit plugin's own light modules only; submitit and torch load when a sweep launches.
"""

from collections.abc import Sequence
from dataclasses import dataclass

# No `from __future__ import annotations`: Hydra loads plugin modules outside
# sys.modules, where dataclasses cannot resolve string annotations.
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import config as submitit_config
from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from tmgg.launch.slurm_resources import register_submitit_hooks

_PREFIX = "hydra_plugins.tmgg_launchers.submitit_launchers."


@dataclass
class TmggSlurmQueueConf(submitit_config.SlurmQueueConf):
    _target_: str = _PREFIX + "TmggSlurmLauncher"
    # auto: jobs that share a batch stream (data, noise, seed, trainer settings) run as
    # one array task, trained together, each still its own job (tmgg.jobs.
    # fusion); the task's time limit is timeout_min times the largest group's time
    # factor (tmgg/launch/cost.py). off: one array task per job.
    fuse: str = "auto"
    # The most jobs in one fused group; a larger set is split into near-equal groups.
    fuse_max_members: int = 64


@dataclass
class TmggSubmititLocalQueueConf(submitit_config.LocalQueueConf):
    _target_: str = _PREFIX + "TmggSubmititLocalLauncher"
    fuse: str = "auto"
    fuse_max_members: int = 64


ConfigStore.instance().store(group="hydra/launcher", name="tmgg_submitit_slurm",
                             node=TmggSlurmQueueConf(), provider="tmgg")
ConfigStore.instance().store(group="hydra/launcher", name="tmgg_submitit_local",
                             node=TmggSubmititLocalQueueConf(), provider="tmgg")


class TmggSlurmLauncher(submitit_launcher.SlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from tmgg.launch.submitit_tasks import launch_submitit

        return launch_submitit(self, job_overrides, initial_job_idx)


class TmggSubmititLocalLauncher(submitit_launcher.LocalLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from tmgg.launch.submitit_tasks import launch_submitit

        return launch_submitit(self, job_overrides, initial_job_idx)


# The submitit launchers are not TmggLauncher subclasses: their settings checks are
# handed to the state machine here, for tmgg's and hydra-submitit-launcher's classes.
register_submitit_hooks()
