"""tmgg: declarative Hydra sweeps of spectral graph denoising.

Importing the package registers the OmegaConf resolvers the configs use
(``tmgg.short``, ``tmgg.job_id``, ``tmgg.suffix``, ``tmgg.slurm_minutes``). It imports
the config layer only, nothing heavy and no launcher: Hydra imports this at start-up
through the launcher plugins.
"""

from tmgg.config.identity import register_resolvers as register_identity_resolvers
from tmgg.config.slurm_time import register_slurm_resolver


def register_resolvers() -> None:
    """Register every ``tmgg.*`` resolver (idempotent)."""
    register_identity_resolvers()
    register_slurm_resolver()


register_resolvers()

__all__ = ["register_resolvers"]
