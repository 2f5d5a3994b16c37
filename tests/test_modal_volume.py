"""The Modal volume as jobs use it: claims that do not rest on it, commits per round.

Through the whole dispatch path with ``hydra.launcher.transport=local`` and a
directory standing in for the volume (``local_volume_dir``), whose commits and
reloads are logged.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SweepDirs, run_cli

from tmgg.jobs import claims
from tmgg.jobs.ledger import FINISHED, Ledger
from tmgg.launch import snapshot_volume

LOCAL = ["hydra/launcher=modal", "hydra.launcher.transport=local"]


def test_jobs_on_a_volume_without_hard_links_finish_and_commit_once_per_round(
        sweep_dirs: SweepDirs, tmp_path: Path) -> None:
    """In the container ``os.link`` fails: the job still starts, records and finishes,
    because its claim is the launcher's (on the launching machine), not one on the
    volume. Its volume is committed once per validation round, not once per file."""
    volume = tmp_path / "volume"
    rounds = 3
    result = run_cli([str(REPO / "tests/apps/no_hardlinks_train.py"), "-m", "stage=smoke",
                      "model=linear_pe", "seed=1", "logger=csv",
                      f"trainer.max_steps={20 * rounds}", "trainer.val_check_interval=20",
                      *LOCAL, f"hydra.launcher.local_volume_dir={volume}",
                      *sweep_dirs.overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    ledger = Ledger(sweep_dirs.experiments, "smoke")
    (state,) = ledger.states().values()
    assert state.status == FINISHED
    own = json.loads((volume / "experiments/smoke/jobs" / f"{state.job_id}.json").read_text())
    # Its RUNNING record was written at the start (attempts counted), then FINISHED.
    assert own["status"] == FINISHED and own["attempts"] == 1 and own["started_at"]
    assert "claim" not in own
    assert not (volume / "experiments/smoke/claims").exists()  # no claim on the volume
    claim = claims.current(ledger.root, state.job_id)  # the launcher's, released
    assert claim is not None and claim.released and claim.data["outcome"] == FINISHED
    operations = [json.loads(line) for line in
                  (volume / ".volume-commits.jsonl").read_text().splitlines()]
    commits = [op for op in operations if op["op"] == "commit"]
    assert [op for op in operations if op["error"]] == []
    checkpoint_commits = [op for op in commits if op["reason"].startswith("checkpoints")]
    # Each round writes best and last checkpoints: one commit covers both.
    assert len(checkpoint_commits) == rounds
    assert all(op["reason"].endswith("last.ckpt") for op in checkpoint_commits)
    assert len(commits) <= rounds + 1 and commits[-1]["reason"] == "job end"
    assert len(list((volume / "outputs/smoke").glob("*/checkpoints/*.ckpt"))) >= 2


# -- the stand-in volume's semantics, container by container ----------------------


def _container(conn: Any, volume: str, views: str) -> None:
    """A process with its own view of the volume, doing what the test sends it."""
    from tmgg.launch.snapshot_volume import mount_for_container

    view = mount_for_container(volume, views)
    while True:
        operation, *args = conn.recv()
        path = Path(volume) / args[0] if args else None
        if operation == "write":
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(args[1])
            conn.send(None)
        elif operation == "read":
            assert path is not None
            conn.send(path.read_text() if path.exists() else None)
        elif operation in ("commit", "reload"):
            conn.send(getattr(view, operation)())
        elif operation == "die":
            os._exit(9)  # lost: no clean-up, no commit


class _Container:
    def __init__(self, volume: Path, views: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_container, args=(child, str(volume),
                                                                 str(views)))
        self.process.start()

    def __call__(self, *message: Any) -> Any:
        self.conn.send(message)
        return self.conn.recv()

    def die(self) -> None:
        self.conn.send(("die",))
        self.process.join(10)


@pytest.mark.skipif(not snapshot_volume.supported(),
                    reason="no private mount namespaces on this machine")
def test_each_container_works_on_its_own_view_of_the_volume(tmp_path: Path) -> None:
    volume, views = tmp_path / "volume", tmp_path / ".volume-container-views"
    (volume / "outputs").mkdir(parents=True)
    (volume / "outputs/old.txt").write_text("committed before")
    first, second = _Container(volume, views), _Container(volume, views)
    try:
        assert first("read", "outputs/old.txt") == "committed before"  # taken at mount
        first("write", "outputs/a.ckpt", "step 20")
        assert not (volume / "outputs/a.ckpt").exists()  # not committed yet
        assert second("read", "outputs/a.ckpt") is None
        assert first("commit") == 1
        assert (volume / "outputs/a.ckpt").read_text() == "step 20"
        assert second("read", "outputs/a.ckpt") is None  # invisible until it reloads
        second("write", "outputs/b.log", "second's own")
        assert second("reload") == 1
        assert second("read", "outputs/a.ckpt") == "step 20"
        assert second("read", "outputs/b.log") == "second's own"  # its own writes stay
        first("write", "outputs/a.ckpt", "step 40")  # then the container is lost
        first.die()
        assert (volume / "outputs/a.ckpt").read_text() == "step 20"
        retry = _Container(volume, views)  # a retry sees the last commit, not step 40
        assert retry("read", "outputs/a.ckpt") == "step 20"
        retry.die()
        assert second("commit") == 1
        assert (volume / "outputs/b.log").read_text() == "second's own"
    finally:
        for container in (first, second):
            if container.process.is_alive():
                container.process.kill()
            container.process.join(10)
    snapshot_volume.remove_stale_views(views)
    assert not list(views.glob("container-*"))
