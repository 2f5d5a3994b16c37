"""``hydra/launcher=modal``: every job of a sweep in its own Modal container.

Jobs run through the same executor as the local launcher (DESIGN.md contract 4);
outputs and checkpoints land on a Modal Volume under a path derived from the job id,
so a retried or preempted job resumes from its last checkpoint with the same W&B
run. ``transport=local`` runs the whole dispatch path on this machine instead of
Modal's servers: how the tests exercise the plugin and how a sweep is checked before
paying for it. See README.md, "Running on Modal".

Hydra imports this module at every start-up: it imports hydra, omegaconf and
dataclasses only; modal, torch and the dispatch code load when a sweep launches.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

# No `from __future__ import annotations`: Hydra loads plugin modules outside
# sys.modules, where dataclasses cannot resolve string annotations.
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from omegaconf import DictConfig

import tmgg.launch.modal  # noqa: F401  (hands the state machine its probe of Modal calls)
from tmgg.launch.plugin_base import TmggLauncher


@dataclass
class ModalRetriesConf:
    """Retries of a failed container (crash, timeout, preemption), as modal.Retries.

    A job that raises inside training is not retried: it comes back as a FAILED job.
    """

    # Retries after the first attempt (Modal allows 0 to 10).
    max_retries: int = 2
    # Seconds before the first retry (0 to 60).
    initial_delay: float = 5.0
    # Each further delay is the previous one times this (1.0 = fixed delay; up to 10).
    backoff_coefficient: float = 2.0
    # Longest delay between retries in seconds (1 to 60).
    max_delay: float = 60.0


@dataclass
class ModalLauncherConf:
    _target_: str = "hydra_plugins.tmgg_launchers.modal_launcher.TmggModalLauncher"
    # Where jobs run: `modal` (Modal's servers; needs `modal token new`) or `local`
    # (the same dispatch path with worker processes on this machine standing in for
    # containers: payloads serialised as sent, executed by the remote function's body).
    transport: str = "modal"
    # Modal GPU per container: T4, L4, A10 (A10G accepted), L40S, A100-40GB,
    # A100-80GB, H100, H200 or B200, with `:N` for N GPUs (H100:2). null runs on a
    # CPU-only container with `cpu` cores: for stage-1-sized jobs (20-node graphs, a
    # few thousand parameters) likely far cheaper; `tmgg-sweep plan` shows both costs.
    gpu: Optional[str] = "T4"  # noqa: UP045 (OmegaConf 2.3 needs Optional)
    # CPU cores per container (physical cores; Modal bills them per second).
    cpu: float = 2.0
    # Memory per container in MiB.
    memory_mb: int = 4096
    # Longest run of one attempt of one job, in seconds (Modal allows up to 86400).
    timeout_s: int = 3600
    # Retries and their backoff, passed to Modal as modal.Retries.
    retries: ModalRetriesConf = field(default_factory=ModalRetriesConf)
    # Most containers running at once for this sweep; null leaves it to Modal.
    max_containers: Optional[int] = 20  # noqa: UP045
    # Name of the Modal App the sweep runs under.
    app_name: str = "tmgg"
    # Modal Secret holding WANDB_API_KEY (`modal secret create wandb WANDB_API_KEY=...`);
    # null mounts no secret (csv logger, or W&B offline).
    wandb_secret: Optional[str] = "wandb"  # noqa: UP045
    # Modal Volume for outputs, checkpoints and the jobs' own records (created if
    # missing); a job's files are under outputs/<stage>/<run_name>-<digest>/.
    volume: str = "tmgg-outputs"
    # Spawn every job, record its FunctionCall id in the ledger and return at once;
    # `tmgg-sweep status stage=...` collects results, `tmgg-sweep cancel` stops them.
    detach: bool = False
    # Refuse a sweep whose estimated cost (USD, from the price table in
    # tmgg/launch/cost.py) exceeds this, before anything is dispatched; null: no limit.
    max_cost_usd: Optional[float] = 25.0  # noqa: UP045
    # Show Modal's output, a progress bar and the outcome table.
    progress: bool = True
    # transport=local only: containers (worker processes) on this machine; null uses
    # min(max_containers, CPU cores).
    local_containers: Optional[int] = None  # noqa: UP045
    # transport=local only: a directory standing in for the Volume (outputs, the jobs'
    # own records and a log of volume commits land there as on Modal); null keeps this
    # machine's outputs_dir and experiments_dir.
    local_volume_dir: Optional[str] = None  # noqa: UP045
    # transport=local only: run each container call as a detached local process awaited
    # by its call id, as Modal's spawn and FunctionCall.get are (slower to start; a
    # blocking sweep's calls can then outlive the launcher: a lost connection, or
    # Ctrl-C answered "leave them running"). false: warm containers that end with it.
    local_calls: bool = False
    # transport=local with local_volume_dir: each container works on its own view of
    # the volume, taken when it reloads and written back when it commits, as on Modal
    # (a lost container's uncommitted writes vanish); needs Linux mount namespaces,
    # else the directory is written in place. false: always in place.
    local_volume_snapshots: bool = True
    # auto: jobs that share a batch stream (data, noise, seed, trainer settings) train
    # together in one container, each still its own job with its own record, outputs
    # and W&B run (tmgg.jobs.fusion); off: one container per job. A group's
    # container gets timeout_s times the group's time factor (tmgg/launch/cost.py).
    fuse: str = "auto"
    # The most jobs in one fused group; a larger set is split into near-equal groups.
    fuse_max_members: int = 64


ConfigStore.instance().store(group="hydra/launcher", name="modal", node=ModalLauncherConf,
                             provider="tmgg")


class TmggModalLauncher(TmggLauncher):
    @classmethod
    def before_plan(cls, config: DictConfig) -> None:
        # Fail fast (bad GPU name, missing Modal credentials) before any job is
        # composed; the check reads no network and imports no modal.
        from tmgg.launch.modal.settings import check_settings

        check_settings(config.hydra.launcher)

    @classmethod
    def preflight(cls, config: DictConfig, jobs: Sequence[Any]) -> None:
        from tmgg.jobs.sweep import split_finished
        from tmgg.launch.modal.dispatch import preflight

        _, pending = split_finished(jobs)  # the cost limit counts what is left to run
        preflight(config, [jobs[position] for position in pending])

    @classmethod
    def check(cls, config: DictConfig, jobs: Sequence[Any]) -> None:
        # preflight's refusals but credentials and the secret's lookup (the network)
        from tmgg.jobs.sweep import split_finished
        from tmgg.launch.modal.dispatch import offline_preflight

        _, pending = split_finished(jobs)
        offline_preflight(config, [jobs[position] for position in pending])

    def launch(self, job_overrides: Sequence[Sequence[str]],
               initial_job_idx: int) -> Sequence[JobReturn]:
        from tmgg.launch.modal.dispatch import launch_modal

        return launch_modal(self, job_overrides, initial_job_idx)
