"""``tmgg-sweep compare`` on real tiny sweeps of stage 1, its legacy variant, stage 1b,
one ablation and the legacy variant in float64 (issue 14), each run by ``tmgg-train -m``
with a few steps."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from tmgg.cli.reporting.compare import LEGACY_VALUES, main
from tmgg.cli.reporting.precision import decimals_for, t_quantile
from tmgg.jobs.ledger import FINISHED, Ledger

TINY = ["trainer.max_steps=20", "trainer.val_check_interval=10", "data.val_samples=20",
        "data.test_samples=20", "logger=csv", "optimizer.weight_decay=1e-2", "model.k=8"]
# One `tmgg-train -m` per entry (each start costs seconds of imports): stage 1 and its
# legacy variant share a grid, so one sweep over both stages runs them.
SWEEPS = {
    "stage1,stage1_legacy,stage1_legacy_seeds10,stage1_seeds10": [
        "model=linear_pe,self_attention", "optimizer.lr=1e-3", "seed=1,2"],
    "stage1b": ["model=linear_pe", "optimizer.lr=2e-1", "seed=1,2"],
    "stage1_legacy_ablate_self_loops": ["model=self_attention", "seed=1"],
    "stage1_legacy_fp64": ["optimizer.lr=1e-3", "seed=1,2"],
}
ABLATION = "stage1_legacy_ablate_self_loops"


class Stages:
    def __init__(self, root: Path) -> None:
        self.experiments = root / "experiments"
        self.outputs = root / "outputs"
        self.out = self.experiments / "COMPARISON.md"

    def records(self, stage: str) -> list[dict[str, Any]]:
        return list(Ledger(self.experiments, stage).job_records().values())

    def mse(self, stage: str, model: str, metric: str = "test/mse") -> list[float]:
        return [r["metrics"][metric] for r in self.records(stage)
                if r["config"]["model"]["name"] == model]


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Stages:
    result = Stages(tmp_path_factory.mktemp("compare"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "WANDB_SERVICE")}
    for stage, grid in SWEEPS.items():
        run = subprocess.run(
            [sys.executable, "-m", "tmgg.cli.app", "-m", f"stage={stage}", *grid, *TINY,
             f"experiments_dir={result.experiments}", f"outputs_dir={result.outputs}"],
            cwd=REPO, env={**env, "WANDB_MODE": "offline"}, capture_output=True, text=True,
            timeout=900)
        for one_stage in stage.split(","):
            records = result.records(one_stage)
            assert records and all(r["status"] == FINISHED for r in records), (
                one_stage, run.stdout[-2000:], run.stderr[-3000:])
    shutil.copytree(REPO / "experiments" / "earlier_system",
                    result.experiments / "earlier_system")
    assert main(["--experiments", str(result.experiments), "--ablation", ABLATION,
                 "--ablation", "stage1_legacy_ablate_symmetrize"]) == 0
    return result


def _rows(text: str, heading: str) -> list[dict[str, str]]:
    section = text[text.index(heading):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")), strict=True))
            for line in lines[2:]]


def _text(values: list[float]) -> str:
    """Mean ± 95 % t half-width (n), rounded to the half-width's 2nd significant digit."""
    mean = statistics.fmean(values)
    half = t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    places = decimals_for(half)
    return f"{mean:.{places}f} ± {half:.{places}f} (n {len(values)})"


@pytest.mark.slow
def test_side_by_side_rows_are_the_records_means_beside_the_earlier_table(
        stages: Stages) -> None:
    text = stages.out.read_text()
    rows = {(r["model"], r["k"], r["lr"], r["wd"]): r
            for r in _rows(text, "## Side by side per configuration")}
    earlier = json.loads((REPO / "experiments/earlier_system/stage1.json").read_text())
    # The tiny stages' cells are among the earlier table's: one row per earlier cell.
    assert len(rows) == len(earlier["results"])
    for model, old in (("`linear_pe`", "0.3209"), ("`self_attention`", "0.3075")):
        row = rows[(model, "8", "1e-3", "1e-2")]
        name = model.strip("`")
        assert row["earlier system"] == old
        assert row["today (`stage1`)"] == _text(stages.mse("stage1", name))
        assert row["legacy (`stage1_legacy`)"] == _text(stages.mse("stage1_legacy", name))
        legacy_no_edges = statistics.fmean(
            stages.mse("stage1_legacy", name, "test_reference_no_edges/mse"))
        assert row["legacy no edges"] == f"{legacy_no_edges:.4f}"
        # Self-loops scored as missed edges: the legacy "no edges" is the harder one.
        assert float(row["legacy no edges"]) > float(row["today no edges"])
        gap = statistics.fmean(stages.mse("stage1_legacy", name)) - float(old)
        shown = row["legacy − earlier"]
        assert "Welch t" in shown  # a stated test, not a one-SD rule
        places = len(shown.split(" ")[0].split(".")[1])
        assert shown.startswith(f"{gap:+.{places}f}")
    assert rows[("`filter_bank`", "8", "1e-3", "1e-2")]["today (`stage1`)"] == "—"


@pytest.mark.slow
def test_ablation_and_stage1b_sections_answer_from_the_records(stages: Stages) -> None:
    text = stages.out.read_text()
    assert "`stage1_legacy_ablate_symmetrize`: not run yet" in text
    ablation = _rows(text, f"### `{ABLATION}`")
    assert {r["data.self_loops"] for r in ablation} == {"True", "False"}
    by_value = {r["data.self_loops"]: r for r in ablation}
    assert LEGACY_VALUES["data.self_loops"] is True
    assert by_value["True"]["Δ"] == "—"  # the legacy value is the reference
    records = {r["config"]["data"]["self_loops"]: r["metrics"]["test/mse"]
               for r in stages.records(ABLATION)}
    delta = by_value["False"]["Δ"]  # one seed a side: a difference, no test
    assert delta.startswith(f"{records[False] - records[True]:+.4f}")
    assert "no test" in delta or "Welch t" in delta

    b_rows = _rows(text, "## Stage 1b")
    mse = stages.mse("stage1b", "linear_pe")
    noisy = statistics.fmean(stages.mse("stage1b", "linear_pe",
                                        "test_reference_noisy_input/mse"))
    assert b_rows[0]["test mse"] == _text(mse)
    beats = statistics.fmean(mse) < noisy
    assert b_rows[0]["beats noisy input"] == ("yes" if beats else "no")
    assert ("**Yes**" if beats else "**No**") in text


@pytest.mark.slow
def test_regenerating_gives_the_same_bytes_and_a_missing_table_is_refused(
        stages: Stages, tmp_path: Path) -> None:
    again = tmp_path / "again.md"
    assert main(["--experiments", str(stages.experiments), "--out", str(again), "--ablation",
                 ABLATION, "--ablation", "stage1_legacy_ablate_symmetrize"]) == 0
    assert again.read_bytes() == stages.out.read_bytes()
    assert main(["--experiments", str(stages.experiments), "--earlier",
                 str(tmp_path / "none.json")]) == 2


@pytest.mark.slow
def test_the_float64_section_sets_each_cell_beside_its_float32_legacy_cell(
        stages: Stages) -> None:
    text = stages.out.read_text()
    rows = _rows(text, "## The legacy variant in float64")
    assert [(r["model"], r["k"], r["lr"], r["wd"]) for r in rows] == [
        ("`self_attention`", "8", "1e-3", "1e-2")]
    row = rows[0]
    fp32, fp64 = (stages.mse(stage, "self_attention")
                  for stage in ("stage1_legacy", "stage1_legacy_fp64"))
    assert {r["config"]["trainer"]["precision"] for r in stages.records(
        "stage1_legacy_fp64")} == {"64-true"}
    assert row["legacy float32"] == _text(fp32) and row["legacy float64"] == _text(fp64)
    assert row["earlier system"] == "0.3075"
    for column, difference in (
            ("float64 − float32", statistics.fmean(fp64) - statistics.fmean(fp32)),
            ("float64 − earlier", statistics.fmean(fp64) - 0.3075)):
        shown = row[column]
        # The same seeds on both sides of a precision change: the paired test.
        assert ("paired t" if column == "float64 − float32" else "Welch t") in shown
        places = len(shown.split(" ")[0].split(".")[1])
        assert shown.startswith(f"{difference:+.{places}f}")


@pytest.mark.slow
def test_the_ten_seed_stages_have_their_own_section(stages: Stages) -> None:
    text = stages.out.read_text()
    rows = _rows(text, "## Ten seeds")
    # Only the ten-seed stages' own cells, not every cell of the earlier table.
    assert sorted((r["model"], r["k"], r["lr"]) for r in rows) == [
        ("`linear_pe`", "8", "1e-3"), ("`self_attention`", "8", "1e-3")]
    for row in rows:
        name = row["model"].strip("`")
        assert row["legacy (`stage1_legacy_seeds10`)"] == _text(
            stages.mse("stage1_legacy_seeds10", name))
        assert row["today (`stage1_seeds10`)"] == _text(stages.mse("stage1_seeds10", name))
        assert "Welch t" in row["legacy − earlier"]
