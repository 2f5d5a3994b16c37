"""``tmgg-sweep report`` on a real smoke sweep with one failed and one missing job.

The sweep is the real ``stage=smoke`` (6 jobs, a few seconds each) run by
``tmgg-train -m``. One job fails for real: its output folder holds a corrupt
``last.ckpt``, which the job tries to resume from. One job goes missing the way a
launcher killed after planning leaves it: its ``planned`` event stays, its later
events and its record are gone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tmgg.cli.reporting.plots import MSE_PLOT, SPREAD_PLOT
from tmgg.cli.reporting.report import NOTES_FILE, REPORT_FILE, error_line, main, write_report
from tmgg.jobs.ledger import FAILED, FINISHED, RUNNING, Ledger

IDENTITY = ["stage=smoke", "logger=csv"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Sweep:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.experiments = root / "exp"
        self.outputs = root / "out"
        self.stage_dir = self.experiments / "smoke"
        self.overrides = [*IDENTITY, f"experiments_dir={self.experiments}"]
        self.failed: dict[str, Any] = {}
        self.missing: dict[str, Any] = {}

    def records(self) -> dict[str, dict[str, Any]]:
        return Ledger(self.experiments, "smoke").job_records()


def _section(text: str, heading: str) -> str:
    """The body of a markdown section, up to the next heading of any level."""
    start = text.index(heading + "\n") + len(heading) + 1
    rest = text[start:]
    ends = [i for i in (rest.find("\n## "), rest.find("\n### ")) if i >= 0]
    return rest[: min(ends)] if ends else rest


def _table(section: str) -> list[dict[str, str]]:
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")), strict=True))
            for line in lines[2:]]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    from tmgg.jobs.compose import compose_sweep

    result = Sweep(tmp_path_factory.mktemp("report"))
    jobs = {(j.task_config["model"]["name"], j.task_config["seed"]): j
            for j in compose_sweep(result.overrides).jobs}
    assert len(jobs) == 6
    failing, missing = jobs[("filter_bank", 1)], jobs[("linear_pe", 2)]
    suffix = failing.job_id.rsplit("-", 1)[-1]
    checkpoint = result.outputs / "smoke" / f"{failing.run_name}-{suffix}" / "checkpoints"
    checkpoint.mkdir(parents=True)
    (checkpoint / "last.ckpt").write_bytes(b"not a checkpoint")  # resumed from, fails

    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("MODAL_TOKEN_ID", None)
    env.pop("MODAL_TOKEN_SECRET", None)
    run = subprocess.run(
        [sys.executable, "-m", "tmgg.cli.app", "-m", *result.overrides,
         f"outputs_dir={result.outputs}"],
        cwd=result.root, env=env, capture_output=True, text=True, timeout=600)
    records = result.records()
    assert len(records) == 6, run.stdout[-3000:] + run.stderr[-3000:]
    assert records[failing.job_id]["status"] == FAILED, (
        "precondition: resuming from a corrupt last.ckpt should fail the job")
    assert sum(r["status"] == FINISHED for r in records.values()) == 5

    # The launcher was killed before dispatching `missing`: only its plan survives.
    ledger = Ledger(result.experiments, "smoke")
    kept = [e for e in ledger.events()
            if e.get("job_id") != missing.job_id or e.get("event") == "planned"]
    ledger.events_path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))
    (ledger.jobs_dir / f"{missing.job_id}.json").unlink()

    result.failed = {"job_id": failing.job_id, "run_name": failing.run_name,
                     "error": records[failing.job_id]["error"]}
    result.missing = {"job_id": missing.job_id, "run_name": missing.run_name}
    assert main(result.overrides) == 0
    return result


def test_report_lists_failed_and_missing_jobs(sweep: Sweep) -> None:
    text = (sweep.stage_dir / REPORT_FILE).read_text()
    outcome = {row["outcome"]: row["jobs"] for row in _table(_section(text, "## Outcome"))}
    assert outcome == {"finished": "4", "failed": "1", "running": "0", "cancelled": "0",
                       "missing": "1", "**expected**": "**6**"}

    failed = _table(_section(text, "## Failed jobs (1)"))
    assert [row["run name"] for row in failed] == [f"`{sweep.failed['run_name']}`"]
    assert failed[0]["job id"] == f"`{sweep.failed['job_id']}`"
    first_error = error_line(sweep.failed["error"])
    assert "Error" in first_error and not first_error.startswith("Traceback")
    assert failed[0]["error"].strip("`").startswith(first_error[:60].replace("`", "'"))

    missing = _table(_section(text, "## Missing jobs (1)"))
    assert missing == [{"run name": f"`{sweep.missing['run_name']}`",
                        "job id": f"`{sweep.missing['job_id']}`",
                        "ledger": "planned, never dispatched"}]


def test_table_rows_have_seed_counts_and_means_of_the_records(sweep: Sweep) -> None:
    text = (sweep.stage_dir / REPORT_FILE).read_text()
    rows = {model: _table(_section(text, f"### `{model}`"))
            for model in ("filter_bank", "linear_pe", "self_attention")}
    for model_rows in rows.values():
        assert len(model_rows) == 1
        assert {k: model_rows[0][k] for k in ("lr", "wd", "k")} == {
            "lr": "1e-3", "wd": "1e-2", "k": "8"}
    assert rows["filter_bank"][0]["seeds"] == "1/2"
    assert "1 failed" in rows["filter_bank"][0]["notes"]
    assert rows["linear_pe"][0]["seeds"] == "1/2"
    assert "1 missing" in rows["linear_pe"][0]["notes"]
    assert rows["self_attention"][0]["seeds"] == "2/2"

    # Recompute self_attention's mean ± std and references from the job records.
    finished = [r["metrics"] for r in sweep.records().values()
                if r["config"]["model"]["name"] == "self_attention"]
    mse = [m["test/mse"] for m in finished]
    mean = sum(mse) / 2
    std = math.sqrt(sum((x - mean) ** 2 for x in mse))  # n - 1 = 1
    row = rows["self_attention"][0]
    half = 12.706204736 * std / math.sqrt(2)  # 95 % t quantile at 1 degree of freedom
    places = max(0, 1 - math.floor(math.log10(half)))
    assert row["test mse"] == f"{mean:.{places}f} ± {half:.{places}f} (n 2)"
    no_edges = sum(m["test_reference_no_edges/mse"] for m in finished) / 2
    noisy = sum(m["test_reference_noisy_input/mse"] for m in finished) / 2
    assert row["no edges mse"] == f"{no_edges:.4f}"
    assert row["noisy input mse"] == f"{noisy:.4f}"
    assert ("⚠" in row["notes"]) == (mean >= no_edges)

    # A single finished seed: its own value, no std.
    linear = [r["metrics"]["test/mse"] for r in sweep.records().values()
              if r["config"]["model"]["name"] == "linear_pe" and r["status"] == FINISHED]
    assert rows["linear_pe"][0]["test mse"] == f"{linear[0]:.4f} (n 1)"

    best = _table(_section(text, "## Best configuration per model"))
    assert [row["model"] for row in best] == ["`filter_bank`", "`linear_pe`",
                                              "`self_attention`"]


def test_plots_are_png_images(sweep: Sweep) -> None:
    import matplotlib.image

    text = (sweep.stage_dir / REPORT_FILE).read_text()
    for name in (MSE_PLOT, SPREAD_PLOT):
        path = sweep.stage_dir / name
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 200
        assert f"]({name})" in text


def test_regenerating_from_the_ledger_alone_gives_the_same_bytes(
        sweep: Sweep, tmp_path: Path) -> None:
    committed = (sweep.stage_dir / REPORT_FILE).read_bytes()
    assert main(sweep.overrides) == 0  # again, from the composed grid
    assert (sweep.stage_dir / REPORT_FILE).read_bytes() == committed

    # Only the committed files, in another place: no config is composed.
    copy = tmp_path / "smoke"
    copy.mkdir()
    shutil.copy2(sweep.stage_dir / "ledger.jsonl", copy)
    shutil.copy2(sweep.stage_dir / "plan.json", copy)
    shutil.copytree(sweep.stage_dir / "jobs", copy / "jobs")
    assert main(["--ledger", str(copy)]) == 0
    assert (copy / REPORT_FILE).read_bytes() == committed


def test_notes_are_included_verbatim_under_discussion(sweep: Sweep, tmp_path: Path) -> None:
    copy = tmp_path / "smoke"
    shutil.copytree(sweep.stage_dir, copy)
    notes = "The ordering matches SPEC.md §7:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"
    (copy / NOTES_FILE).write_text(notes)
    path = write_report(Ledger(tmp_path, "smoke"))
    text = path.read_text()
    assert text.endswith("## Discussion\n\n" + notes)


def test_a_sweep_that_never_ran_is_all_missing(tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([*IDENTITY, f"experiments_dir={tmp_path / 'exp'}", "--out", str(out)]) == 0
    text = (out / REPORT_FILE).read_text()
    assert "## Missing jobs (6)" in text and "| missing | 6 |" in text
    assert "not in the ledger" in text
    assert not (out / MSE_PLOT).exists()


def test_other_identity_overrides_warn_and_list_the_ledger_jobs_apart(
        sweep: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Without logger=csv the grid's job ids are not the ones the sweep ran.
    assert main(["stage=smoke", f"experiments_dir={sweep.experiments}",
                 "--out", str(tmp_path)]) == 0
    assert "none of the grid's jobs is in the ledger" in capsys.readouterr().err
    text = (tmp_path / REPORT_FILE).read_text()
    assert "## Missing jobs (6)" in text
    assert "## Ledger jobs outside this grid (not in the table) (6)" in text


def test_groups_by_every_swept_key_but_the_seed(tmp_path: Path) -> None:
    """A stage-2-like grid (data is swept): one row per data x k, seeds pooled."""
    ledger = Ledger(tmp_path, "grid")
    value = 0.30
    for data in ("er", "tree"):
        for k in (8, 16):
            for seed in (1, 2):
                config = {"model": {"name": "linear_pe", "k": k},
                          "optimizer": {"lr": 1e-3, "weight_decay": 0.01},
                          "data": {"name": data}, "seed": seed}
                job_id = f"grid-{data}{k}s{seed}"
                status = RUNNING if (data, k, seed) == ("tree", 16, 2) else FINISHED
                value += 0.01
                ledger.write_job_record(job_id, {
                    "job_id": job_id, "run_name": job_id, "status": status,
                    "overrides": [f"data={data}", f"model.k={k}", f"seed={seed}"],
                    "config": config, "duration_s": 10.0,
                    "metrics": {"test/mse": value, "test/f1": 0.5,
                                "test/subspace_distance": 1.0,
                                "test_reference_no_edges/mse": 0.35,
                                "test_reference_noisy_input/mse": 0.13}
                    if status == FINISHED else None})
    text = write_report(ledger).read_text()
    rows = _table(_section(text, "### `linear_pe`"))
    assert [(r["data"], r["k"], r["seeds"]) for r in rows] == [
        ("er", "8", "2/2"), ("er", "16", "2/2"), ("tree", "8", "2/2"), ("tree", "16", "1/2")]
    assert rows[0]["test mse"] == "0.315 ± 0.064 (n 2)"  # 0.31, 0.32: t(1) = 12.71
    assert rows[0]["notes"] == ""  # 0.315 beats no edges (0.35)
    assert rows[3]["notes"] == "⚠ not below no edges; 1 running"  # 0.38 does not
    assert "- Total compute time (sum of job durations): 1 min 20 s (80.0 s) over 8 jobs" \
        in text
    best = _table(_section(text, "## Best configuration per model"))
    assert [(r["data"], r["k"]) for r in best] == [("er", "8"), ("tree", "8")]
