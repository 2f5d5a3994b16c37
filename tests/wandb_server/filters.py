"""The MongoDB-style run filters of W&B's ``runs(filters=...)`` query, applied server-side.

``wandb.Api().runs(path, filters=...)`` sends the filter as JSON; the service matches
it against each run's fields. Field names are the service's, not the SDK's: ``name``
is the run *id*, ``displayName`` the name users see, ``group``, ``state``,
``config.<key>.value`` and ``summary_metrics.<key>``. An operator this fake does not
know raises ``UnsupportedFilter``, which the server turns into an HTTP 400 naming it,
so a query that needs more is noticed instead of silently matching everything.
"""

from __future__ import annotations

import re
from typing import Any


class UnsupportedFilter(ValueError):
    """A filter operator or field this fake server does not implement."""


_RUN_FIELDS = {
    "name": lambda run: run.name,
    "displayName": lambda run: run.display_name,
    "display_name": lambda run: run.display_name,
    "group": lambda run: run.group,
    "state": lambda run: run.state,
    "jobType": lambda run: run.job_type,
    "tags": lambda run: list(run.tags),
    "username": lambda run: run.username,
}


def field_value(run: Any, key: str) -> Any:
    """The run's value for a filter key (``config.k.value`` and ``summary_metrics.k``)."""
    if key in _RUN_FIELDS:
        return _RUN_FIELDS[key](run)
    head, _, rest = key.partition(".")
    if head == "config" and rest:
        return _dotted(run.config, rest)
    if head in ("summary_metrics", "summaryMetrics") and rest:
        return _dotted(run.summary, rest)
    raise UnsupportedFilter(f"filter on unknown run field {key!r}")


def _dotted(node: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _equal(value: Any, wanted: Any) -> bool:
    if isinstance(value, list) and not isinstance(wanted, list):
        return wanted in value  # Mongo: a scalar matches an array containing it
    return value == wanted


def _condition(value: Any, condition: Any) -> bool:
    if not isinstance(condition, dict) or not any(k.startswith("$") for k in condition):
        return _equal(value, condition)
    for operator, argument in condition.items():
        if operator == "$eq":
            ok = _equal(value, argument)
        elif operator == "$ne":
            ok = not _equal(value, argument)
        elif operator == "$in":
            ok = any(_equal(value, item) for item in argument)
        elif operator == "$nin":
            ok = not any(_equal(value, item) for item in argument)
        elif operator == "$regex":
            ok = isinstance(value, str) and re.search(str(argument), value) is not None
        elif operator == "$exists":
            ok = (value is not None) == bool(argument)
        elif operator in ("$gt", "$gte", "$lt", "$lte"):
            try:
                ok = {"$gt": value > argument, "$gte": value >= argument,
                      "$lt": value < argument, "$lte": value <= argument}[operator]
            except TypeError:
                ok = False
        else:
            raise UnsupportedFilter(f"unsupported filter operator {operator!r}")
        if not ok:
            return False
    return True


def matches(run: Any, filters: dict[str, Any] | None) -> bool:
    """Whether a run matches a filter document ($and, $or, $nor and field conditions)."""
    for key, condition in (filters or {}).items():
        if key == "$and":
            ok = all(matches(run, sub) for sub in condition)
        elif key == "$or":
            ok = any(matches(run, sub) for sub in condition)
        elif key == "$nor":
            ok = not any(matches(run, sub) for sub in condition)
        elif key.startswith("$"):
            raise UnsupportedFilter(f"unsupported top-level filter operator {key!r}")
        else:
            ok = _condition(field_value(run, key), condition)
        if not ok:
            return False
    return True
