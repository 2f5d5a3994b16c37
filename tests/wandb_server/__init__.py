"""A W&B server of the test suite's own, on loopback, for the real wandb client.

See ``server.py`` for what it speaks (written against wandb 0.31.0) and how it
resolves entities like the real service.
"""

from .server import (
    PAGE_SIZE,
    WANDB_VERSION,
    FakeWandbServer,
    Fault,
    StoredRun,
    User,
    api_key_for,
)

__all__ = ["PAGE_SIZE", "WANDB_VERSION", "FakeWandbServer", "Fault", "StoredRun", "User",
           "api_key_for"]
