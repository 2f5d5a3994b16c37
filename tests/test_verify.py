"""Issue 24: ``tmgg-sweep verify`` re-runs a recorded job from its record's config into
a scratch dir and says whether every test metric came back: a same-platform re-run of
a smoke job is identical, a record altered by one metric is caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import SweepDirs, tmgg_train

from tmgg.cli.verify import (
    DIFFERENT,
    IDENTICAL,
    WITHIN,
    Verdict,
    compare_metrics,
    same_code,
)
from tmgg.cli.verify import main as verify_main


@pytest.fixture(scope="module")
def recorded_stage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """experiments/ of one finished smoke-sized job (4 steps, CSV logger)."""
    dirs = SweepDirs(tmp_path_factory.mktemp("recorded"))
    result = tmgg_train("model=linear_pe", "seed=2", "trainer.max_steps=4",
                        "trainer.val_check_interval=2", "logger=csv", *dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return dirs.experiments


def _copy(experiments: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "experiments"
    shutil.copytree(experiments, copy)
    (record_path,) = (copy / "adhoc" / "jobs").glob("*.json")
    return copy, record_path


def test_same_platform_rerun_is_identical_and_writes_nothing_to_the_stage(
        recorded_stage: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    experiments, record_path = _copy(recorded_stage, tmp_path)
    files_before = {p: p.read_bytes() for p in experiments.rglob("*") if p.is_file()}
    out_json = tmp_path / "verdicts.json"
    assert verify_main(["stage=adhoc", f"experiments_dir={experiments}", "--scratch",
                        str(tmp_path / "scratch"), "--json", str(out_json)]) == 0
    (verdict,) = json.loads(out_json.read_text())
    assert verdict["result"] == IDENTICAL
    assert verdict["same_platform"] is True and verdict["same_code"] is True
    assert verdict["metrics_compared"] > 20  # test/, test_eps*/ and the references
    assert {p: p.read_bytes() for p in experiments.rglob("*") if p.is_file()} == files_before
    assert list((tmp_path / "scratch" / "outputs" / "adhoc").iterdir())
    assert "identical [same platform, same code]" in capsys.readouterr().out


def test_a_record_altered_by_one_metric_is_caught(
        recorded_stage: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    experiments, record_path = _copy(recorded_stage, tmp_path)
    record = json.loads(record_path.read_text())
    record["metrics"]["test_eps0.1/f1"] += 0.001
    record_path.write_text(json.dumps(record))
    out_json = tmp_path / "verdicts.json"
    assert verify_main(["stage=adhoc", f"experiments_dir={experiments}", "--scratch",
                        str(tmp_path / "scratch"), "--json", str(out_json)]) == 1
    (verdict,) = json.loads(out_json.read_text())
    assert verdict["result"] == DIFFERENT
    assert verdict["worst_metric"] == "test_eps0.1/f1"
    assert verdict["max_abs_diff"] == pytest.approx(0.001, rel=1e-3)
    assert "NOT REPRODUCED" in capsys.readouterr().out


def test_compare_metrics_verdicts() -> None:
    recorded = {"test/mse": 0.25, "test_eps0.1/f1": 0.5, "val/mse": 0.1, "global_step": 4}
    assert compare_metrics(recorded, dict(recorded), 1e-6)[0] == IDENTICAL
    assert compare_metrics(recorded, {**recorded, "val/mse": 9.0}, 1e-6)[0] == IDENTICAL
    within = compare_metrics(recorded, {**recorded, "test/mse": 0.25 + 1e-7}, 1e-6)
    assert within[0] == WITHIN and within[2] == "test/mse"
    assert compare_metrics(recorded, {**recorded, "test/mse": 0.26}, 1e-6)[0] == DIFFERENT
    missing = {k: v for k, v in recorded.items() if k != "test/mse"}
    assert compare_metrics(recorded, missing, 1e-6)[0] == DIFFERENT
    newer = {**recorded, "test_eps0.1_reference_noisy_input/mse": 0.1}  # logged since
    assert compare_metrics(recorded, newer, 1e-6)[0] == IDENTICAL
    assert compare_metrics(recorded, {**recorded, "test/mse": float("nan")}, 1.0)[0] \
        == DIFFERENT


def test_only_a_same_platform_same_code_difference_fails() -> None:
    def verdict(same_platform: bool | None, same: bool) -> Verdict:
        return Verdict("j", "r", DIFFERENT, same_platform=same_platform, same_code=same)

    assert verdict(True, True).fails
    assert not verdict(False, True).fails  # another platform: reported, not failed
    assert not verdict(None, True).fails  # a record from before platforms were recorded
    assert not verdict(True, False).fails  # another commit


def test_same_code_needs_the_same_commit_and_the_same_uncommitted_diff() -> None:
    clean = {"git_commit": "a", "git_dirty": False}
    assert same_code(clean, clean)
    assert not same_code(clean, {"git_commit": "b", "git_dirty": False})
    dirty = {"git_commit": "a", "git_dirty": True, "git_diff_sha256": "x"}
    assert same_code(dirty, dict(dirty))
    assert not same_code(dirty, {**dirty, "git_diff_sha256": "y"})
    assert not same_code({"git_commit": "a", "git_dirty": True}, dirty)  # diff unknown
    assert not same_code(dirty, clean)
    assert not same_code(None, clean)


def test_usage_errors(recorded_stage: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert verify_main([]) == 2
    assert verify_main(["stage=adhoc", f"experiments_dir={recorded_stage}", "nope"]) == 2
    assert verify_main(["stage=adhoc", f"experiments_dir={recorded_stage}", "--scratch",
                        str(recorded_stage / "adhoc" / "x")]) == 2
    capsys.readouterr()


def test_an_older_record_is_completed_only_where_it_lacks_keys(tmp_path: Path) -> None:
    """Committed stage-1 records predate model.symmetrize and the objective group: the
    re-run takes those keys (only those) from today's composition and names them."""
    from tmgg.cli.verify import complete_config

    repo = Path(__file__).resolve().parents[1]
    record_path = sorted((repo / "experiments" / "stage1" / "jobs").glob("*.json"))[0]
    record = json.loads(record_path.read_text())
    config, filled = complete_config(record, tmp_path)
    assert "model.symmetrize" in filled
    assert config["model"]["symmetrize"] is True
    for key, value in record["config"]["model"].items():
        assert config["model"][key] == value  # recorded values kept
    assert config["optimizer"] == record["config"]["optimizer"]
    assert config["seed"] == record["config"]["seed"]
    assert not (repo / "experiments" / "stage1" / "claims").exists()
