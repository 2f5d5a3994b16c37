"""The Modal transport: app, dispatch, settings, calls, results.

Importing the package (the ``hydra/launcher=modal`` plugin does, at Hydra's start-up)
hands the state machine its probe of detached calls (``tmgg.jobs.launcher_hooks``):
a claim held by a Modal call is alive while the call runs. Light: modal loads when a
call is polled.
"""

from __future__ import annotations

from typing import Any

from tmgg.jobs.launcher_hooks import register_call_probe


def modal_call_in_flight(ledger: Any, call_id: str) -> bool:
    """Whether the detached Modal call ``call_id`` still runs (``calls.call_in_flight``)."""
    from tmgg.launch.modal.calls import call_in_flight

    return call_in_flight(ledger, call_id)


register_call_probe(modal_call_in_flight)
