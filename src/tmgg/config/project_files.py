"""Where Hydra's config tree, ``conf/``, is, however tmgg was installed.

It lives beside ``src/`` in a checkout (an editable install) and at ``/conf`` beside
``/root/tmgg`` in a Modal container. A non-editable install (``pip install .``) has
no checkout around it: there ``TMGG_CONF_DIR`` names the tree, or ``./conf`` is used
when run from a checkout. (The locked environment is package data: ``tmgg.config.lockfile``.)

Standard library only: Hydra imports this at start-up (through ``tmgg.config``).
"""

from __future__ import annotations

import os
from pathlib import Path

CONF_DIR_ENV = "TMGG_CONF_DIR"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # src/tmgg
# The checkout layout: src/tmgg/ here, conf/ two levels up.
CHECKOUT_CONF_DIR = PACKAGE_DIR.parents[1] / "conf"


def _is_conf_dir(path: Path) -> bool:
    return (path / "train.yaml").is_file()


def locate_conf_dir() -> Path:
    """``$TMGG_CONF_DIR``, else the checkout's ``conf/``, else ``./conf``.

    Falls back to the checkout path when none holds ``train.yaml``, so Hydra's own
    error names the directory it looked in.
    """
    override = os.environ.get(CONF_DIR_ENV)
    if override:
        return Path(override).resolve()
    for candidate in (CHECKOUT_CONF_DIR, Path.cwd() / "conf"):
        if _is_conf_dir(candidate):
            return candidate.resolve()
    return CHECKOUT_CONF_DIR

