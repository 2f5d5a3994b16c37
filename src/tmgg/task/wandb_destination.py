"""Where a live W&B run went against where its job is pinned (pure, no Lightning).

Shared by the in-job guard (``tmgg.task.wandb_guard``) and ``tmgg-sweep relog``, which
checks the run it re-created without paying for torch and Lightning's import.
"""

from __future__ import annotations


def destination_problem(live_entity: str | None, live_project: str | None,
                        live_id: str | None, entity: str, project: str,
                        run_id: str | None = None, live_base_url: str | None = None,
                        base_url: str | None = None) -> str | None:
    """What is wrong with a live run's destination, host and id, or None (pure)."""
    live = f"{live_entity or '<no entity>'}/{live_project or '<no project>'}"
    if (live_entity or "") != entity or (live_project or "") != project:
        return f"W&B run resolved to {live}, job is pinned to {entity}/{project}"
    if base_url is not None and (live_base_url or "").rstrip("/") != base_url.rstrip("/"):
        return (f"W&B run {live} logs to host {live_base_url or '<no host>'}, job is pinned "
                f"to {base_url} (logger.base_url)")
    if run_id is not None and live_id != run_id:
        return (f"W&B run {live}/{live_id} is not this job's run {entity}/{project}/{run_id} "
                "(wandb chose another id: a W&B sweep or launch context, or a run of another "
                "job still active in this process)")
    return None
