"""tmgg's Hydra launchers: ``hydra/launcher=local`` and ``hydra/launcher=modal``.

Hydra imports this package at every start-up to discover plugins, so it imports
only hydra, omegaconf and dataclasses; modal and torch load when a sweep launches.
"""
