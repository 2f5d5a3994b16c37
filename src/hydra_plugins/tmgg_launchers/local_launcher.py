"""``hydra/launcher=local``: warm worker processes on this machine.

Each worker imports torch and lightning once and then runs job after job through
the same executor the Modal launcher uses; a failed job does not stop the others.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

# No `from __future__ import annotations`: Hydra loads plugin modules outside
# sys.modules, where dataclasses cannot resolve string annotations.
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf

from tmgg.launch.plugin_base import TmggLauncher


@dataclass
class LocalLauncherConf:
    _target_: str = "hydra_plugins.tmgg_launchers.local_launcher.TmggLocalLauncher"
    # Worker processes; null uses every CPU core of this machine.
    n_workers: Optional[int] = None  # noqa: UP045 (OmegaConf 2.3 needs Optional)
    # torch intra-op threads per worker (1 is fastest for many small jobs).
    threads_per_worker: int = 1
    # multiprocessing start method for workers: forkserver (torch and lightning are
    # imported once, in the fork server, started while Hydra composes) or spawn.
    start_method: str = "forkserver"
    # Show a live progress bar and the outcome table at the end.
    progress: bool = True
    # Times a job whose worker process died (OOM killer, SIGKILL) is run again in a
    # fresh worker, from its last checkpoint. 0: the job is FAILED with the signal
    # named (`tmgg-sweep resume` re-runs it); the other workers' jobs go on either way.
    worker_crash_retries: int = 0
    # auto (default): jobs that share a batch stream (data, noise, seed, trainer
    # settings) train together as one task, each still its own job
    # (tmgg.jobs.fusion). off: every job is its own task. A crash of a fused
    # group's worker fails every member of the group (worker_crash_retries re-runs the
    # group, each member from its checkpoint).
    fuse: str = "auto"
    # The most jobs in one fused group; a larger set is split into near-equal groups.
    fuse_max_members: int = 64


ConfigStore.instance().store(group="hydra/launcher", name="local", node=LocalLauncherConf,
                             provider="tmgg")


class TmggLocalLauncher(TmggLauncher):
    @classmethod
    def before_plan(cls, config: DictConfig) -> None:
        from tmgg.launch.local_settings import check_local_settings

        check_local_settings(OmegaConf.to_container(config.hydra.launcher, resolve=True))
        # Start the fork server (torch and lightning imports) beside Hydra's composition.
        from tmgg.launch.local import preload_modules, prestart

        start_method = OmegaConf.select(config, "hydra.launcher.start_method")
        prestart(str(start_method or "forkserver"), preload_modules(config))

    @classmethod
    def preflight(cls, config: DictConfig, jobs: Sequence[object]) -> None:
        from tmgg.jobs.fusion import fusion_settings

        fusion_settings(config)  # a bad fuse setting is refused before the plan

    @classmethod
    def check(cls, config: DictConfig, jobs: Sequence[object]) -> None:
        from tmgg.launch.local_settings import check_local_settings

        check_local_settings(OmegaConf.to_container(config.hydra.launcher, resolve=True))
        cls.preflight(config, jobs)

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from tmgg.launch.local import launch_local

        return launch_local(self, job_overrides, initial_job_idx)
