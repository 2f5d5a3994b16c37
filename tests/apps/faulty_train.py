"""tmgg-train with one injected fault: every filter_bank job raises.

Used by fault-tolerance tests: the launcher must keep going, record the failure
and exit non-zero, whatever the task function raises.
"""

from typing import Any

import hydra
from omegaconf import DictConfig

from tmgg.cli.app import train
from tmgg.config import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    if cfg.model.name == "filter_bank":
        raise RuntimeError(f"injected failure in {cfg.job.run_name}")
    return train(cfg)


if __name__ == "__main__":
    main()
