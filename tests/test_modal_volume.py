"""The Modal volume as jobs use it: claims that do not rest on it, commits per round.

Through the whole dispatch path with ``hydra.launcher.transport=local`` and a
directory standing in for the volume (``local_volume_dir``), whose commits and
reloads are logged.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO, SweepDirs, run_cli

from tmgg.orchestration import claims
from tmgg.orchestration.ledger import FINISHED, Ledger

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
