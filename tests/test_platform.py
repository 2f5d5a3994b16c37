"""Issue 24: every job record says where it ran (CPU, cores, torch build, threads)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import SweepDirs, tmgg_train

from tmgg.jobs import schema
from tmgg.jobs.platform_info import platform_fingerprint, platform_info, platform_summary

REPO = Path(__file__).resolve().parents[1]


def test_platform_info_names_cpu_threads_and_torch_build() -> None:
    info = platform_info()
    assert info["cpu"] is platform_info()["cpu"]  # collected once per process
    assert info["cpu"]["logical_cores"] >= 1
    assert info["torch"]["num_threads"] >= 1
    assert "BLAS_INFO=" in info["torch"]["build_config"]
    assert isinstance(info["torch"]["deterministic_algorithms"], bool)
    assert platform_fingerprint(info) == platform_fingerprint(json.loads(json.dumps(info)))
    assert "torch" in platform_summary(info)


def test_fingerprint_changes_with_the_thread_count_and_cpu() -> None:
    info = json.loads(json.dumps(platform_info()))
    other = json.loads(json.dumps(info))
    other["torch"]["num_threads"] += 1
    assert platform_fingerprint(other) != platform_fingerprint(info)
    other = json.loads(json.dumps(info))
    other["cpu"]["model"] = "Another CPU"
    assert platform_fingerprint(other) != platform_fingerprint(info)
    assert platform_fingerprint(None) is None


def test_a_job_record_carries_its_platform(sweep_dirs: SweepDirs) -> None:
    result = tmgg_train("model=linear_pe", "trainer.max_steps=4", "trainer.num_threads=1",
                        "trainer.val_check_interval=2", "logger=csv", *sweep_dirs.overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = sweep_dirs.job_records("adhoc").values()
    assert record["status"] == "FINISHED"
    platform = record["platform"]
    assert platform["torch"]["version"] == record["versions"]["torch"]
    assert platform["cpu"]["logical_cores"] >= 1
    assert "LAPACK" in platform["torch"]["build_config"]
    assert platform["torch"]["num_threads"] == 1  # as it trained, not as it started


def test_committed_records_without_platform_still_parse() -> None:
    path = next((REPO / "experiments" / "stage1" / "jobs").glob("*.json"))
    record = schema.read(path, schema.JobRecordFile)
    assert record.get("platform") is None
