"""``hydra/launcher=local``'s settings, each with a declared rule, checked before planning.

Hydra's structured config already refuses unknown keys and wrong types; these rules
refuse the values a type lets through (0 workers, a start method multiprocessing does
not have, negative retries). A setting without a rule is itself refused, so a new
setting of ``LocalLauncherConf`` cannot go unchecked. Pure Python: the plugin calls
this at Hydra start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tmgg.config.schema import boolean, integer_at_least, one_of, optional, positive_int
from tmgg.launch.cost import LauncherSettingError

RULES = {
    "n_workers": optional(positive_int),
    "threads_per_worker": positive_int,
    "start_method": one_of(("forkserver", "spawn", "fork")),
    "progress": boolean,
    "worker_crash_retries": integer_at_least(0),
    # Fused training (branch fused13; tmgg.jobs.fusion checks them too).
    "fuse": one_of(("auto", "off")),
    "fuse_max_members": positive_int,
}


def check_local_settings(params: Mapping[str, Any]) -> None:
    for key, value in params.items():
        if key == "_target_":
            continue
        rule = RULES.get(str(key))
        if rule is None:
            raise LauncherSettingError(f"hydra.launcher.{key}", "a setting without a declared "
                                       "rule in tmgg/launch/local_settings.py")
        problem = rule(value)
        if problem:
            raise LauncherSettingError(f"hydra.launcher.{key}", problem)
