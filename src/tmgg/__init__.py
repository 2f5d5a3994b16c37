"""tmgg: declarative Hydra sweeps of spectral graph denoising.

Importing the package registers the OmegaConf resolvers the configs use
(``tmgg.short``, ``tmgg.job_id``, ``tmgg.suffix``). It imports nothing heavy:
Hydra imports this at start-up through the launcher plugins.
"""

import tmgg.launch.slurm_resources  # noqa: F401  (registers tmgg.slurm_minutes)
from tmgg.config.identity import register_resolvers

register_resolvers()

__all__ = ["register_resolvers"]
