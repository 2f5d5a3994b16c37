"""tmgg's Hydra sweeper: ``hydra/sweeper=tmgg_optuna`` (adaptive stages, docs/adaptive.md).

Hydra imports this package at every start-up to discover plugins, so it imports only
hydra, omegaconf and dataclasses; optuna and the study load when a sweep starts.
"""
