"""One job end to end through tmgg-train: learning, determinism, metrics.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import REPO, SweepDirs, tmgg_train

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


@pytest.mark.parametrize(("override", "message"), [
    ("model=nope", "Could not find 'model/nope'"),  # Hydra's own refusal: no such option
    ("model.k=0", "job adhoc_linear_pe_lr1e-3_wd1e-2_k0_s1: model.k: must be an integer >= 1"),
    ("optimizer.lr=-1", "job adhoc_linear_pe_lr-1_wd1e-2_k8_s1: optimizer.lr: must be > 0"),
    ("optimizer.lr=abc",
     "job adhoc_linear_pe_lrabc_wd1e-2_k8_s1: optimizer.lr: expected a positive number"),
    ("noise.levels=[1.5]", "job adhoc_linear_pe_lr1e-3_wd1e-2_k8_s1: noise.levels: item 0:"),
    ("logger.entity=null",
     "job adhoc_linear_pe_lr1e-3_wd1e-2_k8_s1: logger.entity: is mandatory"),
    ("~logger.entity", "job adhoc_linear_pe_lr1e-3_wd1e-2_k8_s1: logger.entity: is mandatory"),
    ("optimizer.lrr=1", "Key 'lrr' is not in struct"),  # Hydra's: not an option of adamw
    ("+optimizer.lrr=1",
     "job adhoc_linear_pe_lr1e-3_wd1e-2_k8_s1: optimizer.lrr: unknown option"),
])
def test_bad_override_fails_before_training_naming_the_field(
        sweep_dirs: SweepDirs, override: str, message: str) -> None:
    """tmgg's own message (Hydra echoes the overrides on any failure, so the field's
    name alone proves nothing), and no output directory: no training step ran."""
    result = tmgg_train(override, "trainer.max_steps=5", *sweep_dirs.overrides)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    if message.startswith("job "):
        assert f"run refused, nothing ran: {message}" in result.stderr
    assert not sweep_dirs.outputs.exists() and not sweep_dirs.experiments.exists()


def test_interrupted_then_resumed_job_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """A job stopped at step 25 (last checkpoint: step 20) and run again resumes there,
    with the training stream at batch 20, not 0: its results are the uninterrupted run's."""
    args = ("model=filter_bank", "seed=3", "trainer.max_steps=60",
            "trainer.val_check_interval=20", "logger=csv")
    whole = SweepDirs(tmp_path / "whole")
    assert tmgg_train(*args, *whole.overrides).returncode == 0
    resumed = SweepDirs(tmp_path / "resumed")
    stop = {"TMGG_CALLBACK_FACTORY": "interrupt:stop_at_step", "TMGG_TEST_STOP_AT_STEP": "25",
            "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "apps"),
                                           os.environ.get("PYTHONPATH", "")])}
    stopped = tmgg_train(*args, *resumed.overrides, env=stop)
    assert stopped.returncode != 0 and "injected stop at step 25" in stopped.stderr
    assert tmgg_train(*args, *resumed.overrides).returncode == 0

    expected, got = _metrics(whole), _metrics(resumed)
    assert expected["resumed_from_step"] == 0 and got["resumed_from_step"] == 20
    assert got["global_step"] == 60
    ignore = TIMING_KEYS | {"resumed_from_step"}
    assert {k: v for k, v in got.items() if k not in ignore} == \
        {k: v for k, v in expected.items() if k not in ignore}
