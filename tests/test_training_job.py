"""One job end to end through tmgg-train: learning, determinism, metrics.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SweepDirs, tmgg_train

TIMING_KEYS = {"train_seconds"}


def _metrics(sweep_dirs: SweepDirs) -> dict:
    files = sorted(sweep_dirs.outputs.glob("adhoc/*/metrics.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_short_run_beats_the_no_edges_reference(sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("model=linear_pe", "optimizer.lr=0.2", "trainer.max_steps=300",
                        "trainer.val_check_interval=150", "logger=csv", *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(sweep_dirs)
    assert metrics["val/mse"] < metrics["val_reference_no_edges/mse"] - 0.05
    assert metrics["test/mse"] < metrics["test_reference_no_edges/mse"]
    assert metrics["global_step"] == 300
    assert metrics["run_name"] == "adhoc_linear_pe_lr2e-1_wd1e-2_k8_s1"
    for eps in ("0.01", "0.05", "0.1", "0.2", "0.3"):
        assert f"test_eps{eps}/f1" in metrics and f"val_eps{eps}/mse" in metrics
    mean = sum(metrics[f"test_eps{e}/mse"] for e in ("0.01", "0.05", "0.1", "0.2", "0.3")) / 5
    assert metrics["test/mse"] == pytest.approx(mean, rel=1e-5)


def test_same_job_twice_gives_identical_metrics(tmp_path: Path) -> None:
    runs = []
    for name in ("first", "second"):
        dirs = SweepDirs(tmp_path / name)
        result = tmgg_train("model=filter_bank", "model.k=16", "optimizer.lr=1e-3",
                            "optimizer.weight_decay=1e-2", "seed=2", "trainer.max_steps=60",
                            "trainer.val_check_interval=30", "logger=csv", *dirs.overrides)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append({k: v for k, v in _metrics(dirs).items() if k not in TIMING_KEYS})
    assert runs[0] == runs[1]
    assert runs[0]["job_id"].startswith("adhoc-")


@pytest.mark.parametrize(("override", "field"), [
    ("model=nope", "model"),
    ("model.k=0", "model.k"),
    ("optimizer.lr=-1", "optimizer.lr"),
    ("optimizer.lr=abc", "optimizer.lr"),
    ("noise.levels=[1.5]", "noise.levels"),
    ("logger.entity=null", "logger.entity"),
    ("~logger.entity", "logger.entity"),
    ("optimizer.lrr=1", "lrr"),
])
def test_bad_override_fails_before_training_naming_the_field(
        sweep_dirs: SweepDirs, override: str, field: str) -> None:
    result = tmgg_train(override, "trainer.max_steps=5", *sweep_dirs.overrides)
    assert result.returncode != 0
    assert field in result.stderr
    assert not list(sweep_dirs.outputs.glob("**/metrics.json"))
    assert not list(sweep_dirs.outputs.glob("**/checkpoints/*"))
