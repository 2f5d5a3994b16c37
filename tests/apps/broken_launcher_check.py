"""tmgg-train whose launcher check before the plan crashes (not a refusal): the local
launcher's settings check raises OSError, as a full /dev/shm or an unreadable file
would. Used to show that a crash in a callback stops the sweep (Hydra would only warn
about it and launch)."""

from typing import Any

import tmgg.launch.local_settings as local_settings
from tmgg.cli.app import main


def _crash(params: Any) -> None:
    raise OSError("injected: the launcher's check crashed")


local_settings.check_local_settings = _crash

if __name__ == "__main__":
    main()
