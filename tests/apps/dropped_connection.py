"""tmgg-train whose Modal client loses its connection to every call it waits on.

A blocking sweep with ``hydra.launcher.transport=local`` and ``local_calls=true`` awaits
each detached local call through the same runner as Modal's calls; here every
``get()`` on a call raises ``modal.exception.ConnectionError``, as modal 1.6.4's client
does when the network goes away, while the calls themselves (their own processes) run
on. Set ``TMGG_MODAL_RECONNECT_S`` to keep the reconnect window short.
"""

from __future__ import annotations

from typing import Any

import modal

from tmgg.cli.app import main
from tmgg.launch.modal import calls as modal_calls


def _connection_lost(self: Any, timeout: float | None = None) -> Any:
    raise modal.exception.ConnectionError("Deadline exceeded: connection to Modal lost")


modal_calls.LocalCall.get = _connection_lost  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
