"""tmgg-train whose local containers see a volume without hard links.

Modal does not document hard links on volumes. Local containers are processes
started with multiprocessing's spawn method, which imports this file in each of them
(as ``__mp_main__``): there ``os.link`` fails as on a file system without them, while
the launcher (the parent process, where the claims that count live) keeps it.
"""

from __future__ import annotations

import errno
import os
from typing import Any

if __name__ == "__mp_main__":  # imported by multiprocessing in a local container

    def _no_hard_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "hard links are not supported on this volume")

    os.link = _no_hard_links

if __name__ == "__main__":
    from tmgg.cli.app import main

    main()
