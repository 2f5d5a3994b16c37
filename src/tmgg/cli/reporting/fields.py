"""What a report is made of: metric names, grouping keys, and values in fixed formats.

Shared by the report's tables (``report``) and its plots (``plots``). Formats are
fixed so that REPORT.md changes only when the records do.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tmgg.config.identity import short_float

MSE = "test/mse"
F1 = "test/f1"
SUBSPACE = "test/subspace_distance"
NO_EDGES = "test_reference_no_edges"
NOISY_INPUT = "test_reference_noisy_input"

# Grouping keys every stage reports (config paths); a grid's other swept keys follow.
BASE_KEYS = ("model.name", "optimizer.lr", "optimizer.weight_decay", "model.k")
MODEL, LR, WD, K = BASE_KEYS
SEED_KEY = "seed"
LABELS = {
    "model.name": "model",
    "optimizer.lr": "lr",
    "optimizer.weight_decay": "wd",
    "model.k": "k",
    "data.name": "data",
    "optimizer.name": "optimizer",
    "noise.name": "noise",
}
NONE_TEXT = "—"


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def hashable(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return value


def sort_key(value: Any) -> tuple[int, float, str]:
    """Numbers by value, then strings alphabetically, unknowns last."""
    number = as_number(value)
    if number is not None:
        return (0, number, "")
    if value is None:
        return (2, 0.0, "")
    return (1, 0.0, str(value))


def format_value(value: Any) -> str:
    if value is None:
        return NONE_TEXT
    if isinstance(value, float):
        return short_float(value)
    return str(value)
