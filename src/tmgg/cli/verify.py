"""``tmgg-sweep verify stage=X [jobs...] [--sample N] [--fused|--solo]``: re-run recorded
jobs and compare their test metrics with the record.

A job is re-run from its record's own ``config`` (not from today's conf/, which may
have changed) into a scratch directory: its output dir, metrics and checkpoints go
there, the logger is CSV (no W&B run is made or resumed) and nothing is written to
the stage's ledger or records. Each job is then *identical* (every test metric equal
to the bit), *within tolerance* (largest absolute difference <= ``--tolerance``) or
*different*, and the verdict says whether the re-run had the record's platform
(``tmgg.jobs.platform_info``) and code (commit, and the diff of a dirty tree).

Exit 1 when a re-run on the same platform from the same code differs beyond the
tolerance (the record is not reproducible where it says it was made); a difference
across platforms or commits is reported, not failed: it is what the record's
provenance is for. Exit 2 on a usage error.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tmgg.jobs.ledger import FINISHED, Ledger
from tmgg.jobs.platform_info import platform_fingerprint, platform_info, platform_summary
from tmgg.jobs.records import code_version

DEFAULT_TOLERANCE = 1e-6
IDENTICAL = "identical"
WITHIN = "within tolerance"
DIFFERENT = "different"
NOT_RUN = "not re-run"
# Keys each re-run took from today's composition (its record was older than them).
FILLED: dict[str, list[str]] = {}


@dataclass
class Verdict:
    job_id: str
    run_name: str
    result: str
    max_abs_diff: float | None = None
    worst_metric: str | None = None
    metrics_compared: int = 0
    same_platform: bool | None = None  # None: the record names no platform
    same_code: bool = False
    record_platform: str = ""
    filled_from_today: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def fails(self) -> bool:
        """Different beyond tolerance where it should have been reproducible."""
        return self.result == DIFFERENT and bool(self.same_platform) and self.same_code


def test_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Every test metric of a record (``test/``, ``test_eps*/``, ``test_reference_*``)."""
    return {name: float(value) for name, value in metrics.items()
            if name.startswith("test") and isinstance(value, int | float)}


def compare_metrics(recorded: dict[str, Any], rerun: dict[str, Any],
                    tolerance: float) -> tuple[str, float, str | None, int]:
    """(verdict, largest absolute difference, its metric, metrics compared): every test
    metric of the record; one the re-run lacks is a difference (infinite). Metrics the
    re-run has and the record lacks (logged by later code) are not compared."""
    before, after = test_metrics(recorded), test_metrics(rerun)
    worst, worst_name = 0.0, None
    for name in sorted(before):
        if name not in after:
            return DIFFERENT, float("inf"), name, len(before)
        diff = abs(before[name] - after[name])
        if diff != diff or diff > worst:  # NaN counts as a difference
            worst, worst_name = (float("inf") if diff != diff else diff), name
    if worst == 0.0:
        return IDENTICAL, 0.0, None, len(before)
    return (WITHIN if worst <= tolerance else DIFFERENT), worst, worst_name, len(before)


def same_code(recorded: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Same commit, and either both trees clean or both dirty with the same diff."""
    if not recorded or not recorded.get("git_commit"):
        return False
    if recorded.get("git_commit") != current.get("git_commit"):
        return False
    if bool(recorded.get("git_dirty")) != bool(current.get("git_dirty")):
        return False
    return not recorded.get("git_dirty") or (
        recorded.get("git_diff_sha256") is not None
        and recorded.get("git_diff_sha256") == current.get("git_diff_sha256"))


def _fill_missing(target: dict[str, Any], source: dict[str, Any], prefix: str,
                  filled: list[str]) -> None:
    for key, value in source.items():
        if key not in target:
            target[key] = copy.deepcopy(value)
            filled.append(f"{prefix}{key}")
        elif isinstance(value, dict) and isinstance(target[key], dict):
            _fill_missing(target[key], value, f"{prefix}{key}.", filled)


def complete_config(record: dict[str, Any], scratch: Path) -> tuple[dict[str, Any], list[str]]:
    """The record's config; where it lacks keys today's schema requires (a record older
    than the key), those keys only are taken from today's composition of the record's
    overrides, and named (the recorded values are never replaced)."""
    from omegaconf import OmegaConf

    from tmgg.config import validate_job_config

    config = copy.deepcopy(record["config"])
    try:
        validate_job_config(OmegaConf.create(config))
        return config, []
    except Exception:  # noqa: BLE001 - completed below, or the re-run reports it
        pass
    from tmgg.jobs.compose import compose_sweep

    overrides = [o for o in record.get("overrides") or []
                 if not o.startswith(("experiments_dir=", "outputs_dir="))]
    composed = compose_sweep([*overrides, f"experiments_dir={scratch / 'compose'}",
                              f"outputs_dir={scratch / 'compose'}"]).jobs[0].task_config
    filled: list[str] = []
    _fill_missing(config, composed, "", filled)
    return config, filled


def rerun_config(record: dict[str, Any], scratch: Path) -> Any:
    """The record's (completed) config, pointed at ``scratch``: CSV logger, no resume."""
    from omegaconf import OmegaConf

    completed, filled = complete_config(record, scratch)
    FILLED[record["job_id"]] = filled
    config = OmegaConf.create(completed)
    config.outputs_dir = str(scratch / "outputs")
    config.experiments_dir = str(scratch / "experiments")
    config.logger = {"name": "csv"}
    config.trainer.resume = False
    return config


def _set_recorded_threads(record: dict[str, Any]) -> None:
    """Train with the thread count the record's job trained with, when it names one and
    its config does not (fused workers ran one thread each)."""
    threads = (((record.get("platform") or {}).get("torch") or {}).get("num_threads"))
    if threads and not (record.get("config") or {}).get("trainer", {}).get("num_threads"):
        import torch

        torch.set_num_threads(int(threads))


def _rerun_solo(records: list[dict[str, Any]], scratch: Path) -> dict[str, Any]:
    from tmgg.task.train import run_training

    results: dict[str, Any] = {}
    for record in records:
        _set_recorded_threads(record)
        try:
            results[record["job_id"]] = run_training(rerun_config(record, scratch))
        except Exception as error:  # noqa: BLE001 - reported per job
            results[record["job_id"]] = error
    return results


def _rerun_fused(records: list[dict[str, Any]], scratch: Path) -> dict[str, Any]:
    """Re-run the jobs as fused groups (those that share data, seed and step budget)."""
    from tmgg.task.fused import FusedMember, _stream_settings, run_fused_training

    groups: dict[str, list[Any]] = {}
    results: dict[str, Any] = {}
    for record in records:
        try:
            config = rerun_config(record, scratch)
        except Exception as error:  # noqa: BLE001 - reported per job
            results[record["job_id"]] = error
            continue
        member = FusedMember(cfg=config, output_dir=scratch / "outputs" / str(
            config.stage.name) / str(config.job.run_name))
        groups.setdefault(json.dumps(_stream_settings(config), default=str), []).append(
            (record, member))
    for members in groups.values():
        _set_recorded_threads(members[0][0])
        try:
            run_fused_training([member for _, member in members])
        except Exception as error:  # noqa: BLE001 - the whole group failed
            for record, _ in members:
                results[record["job_id"]] = error
            continue
        for record, member in members:
            results[record["job_id"]] = member.result if member.error is None else member.error
    return results


def choose(records: dict[str, dict[str, Any]], names: list[str], sample: int | None,
           sample_seed: int) -> list[dict[str, Any]]:
    """The named jobs (id or run name), else a reproducible random sample of finished
    ones, else all finished ones."""
    finished = {job_id: r for job_id, r in records.items() if r.get("status") == FINISHED}
    if names:
        by_name = {r.get("run_name"): r for r in finished.values()}
        chosen = []
        for name in names:
            record = finished.get(name) or by_name.get(name)
            if record is None:
                raise ValueError(f"{name!r} is no finished job of this stage (give a job "
                                 "id or run name from `tmgg-sweep status`)")
            chosen.append(record)
        return chosen
    ids = sorted(finished)
    if sample is not None and sample < len(ids):
        ids = sorted(random.Random(sample_seed).sample(ids, sample))
    return [finished[job_id] for job_id in ids]


def verify(records: list[dict[str, Any]], scratch: Path, tolerance: float,
           fused: bool) -> list[Verdict]:
    results = (_rerun_fused if fused else _rerun_solo)(records, scratch)
    here_code = code_version()
    here = platform_fingerprint(platform_info())
    verdicts = []
    for record in records:
        value = results.get(record["job_id"])
        recorded_platform = record.get("platform")
        verdict = Verdict(
            job_id=record["job_id"], run_name=str(record.get("run_name")), result=NOT_RUN,
            same_platform=None if not recorded_platform
            else platform_fingerprint(recorded_platform) == here,
            same_code=same_code(record.get("code"), here_code),
            record_platform=platform_summary(recorded_platform),
            filled_from_today=FILLED.get(record["job_id"], []))
        if isinstance(value, dict):
            (verdict.result, verdict.max_abs_diff, verdict.worst_metric,
             verdict.metrics_compared) = compare_metrics(record.get("metrics") or {}, value,
                                                         tolerance)
        else:
            verdict.error = f"{type(value).__name__}: {value}"
        verdicts.append(verdict)
    return verdicts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmgg-sweep verify",
        description="Re-run recorded jobs from their records' configs into a scratch dir "
                    "and compare every test metric with the record.")
    parser.add_argument("args", nargs="*",
                        help="stage=NAME, experiments_dir=DIR (default experiments), and "
                             "job ids or run names (default: all finished jobs)")
    parser.add_argument("--sample", type=int, default=None,
                        help="re-run N jobs drawn at random (reproducibly, --sample-seed)")
    parser.add_argument("--sample-seed", type=int, default=0)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--fused", action="store_true",
                      help="re-run jobs that share data, seed and steps as fused groups")
    mode.add_argument("--solo", action="store_true", help="one job at a time (default)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest absolute test-metric difference still 'within "
                             f"tolerance' (default {DEFAULT_TOLERANCE})")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="where re-runs write (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write verdicts here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    settings = dict(a.split("=", 1) for a in args.args if "=" in a)
    names = [a for a in args.args if "=" not in a]
    unknown = set(settings) - {"stage", "experiments_dir"}
    if unknown or "stage" not in settings:
        print("tmgg-sweep verify: give stage=NAME (and optionally experiments_dir=DIR); "
              f"unknown: {sorted(unknown)}", file=sys.stderr)
        return 2
    ledger = Ledger(Path(settings.get("experiments_dir", "experiments")), settings["stage"])
    try:
        records = choose(ledger.job_records(), names, args.sample, args.sample_seed)
    except ValueError as error:
        print(f"tmgg-sweep verify: {error}", file=sys.stderr)
        return 2
    if not records:
        print(f"tmgg-sweep verify: no finished job in {ledger.root}", file=sys.stderr)
        return 2
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="tmgg-verify-"))
    if ledger.root.resolve() in [scratch.resolve(), *scratch.resolve().parents]:
        print("tmgg-sweep verify: --scratch must not lie in the stage's folder",
              file=sys.stderr)
        return 2
    print(f"re-running {len(records)} job(s) of {ledger.root} "
          f"({'fused' if args.fused else 'solo'}) in {scratch}", flush=True)
    verdicts = verify(records, scratch, args.tolerance, args.fused)
    print(f"this platform: {platform_summary(platform_info())}; "
          f"code {code_version().get('git_commit')}"
          f"{' (dirty)' if code_version().get('git_dirty') else ''}")
    for v in verdicts:
        platform = {None: "platform not recorded", True: "same platform",
                    False: "other platform"}[v.same_platform]
        code = "same code" if v.same_code else "other code"
        detail = (f"max |diff| {v.max_abs_diff:.3g} ({v.worst_metric})"
                  if v.max_abs_diff else "") if v.error is None else v.error
        print(f"  {v.run_name}: {v.result}{'; ' + detail if detail else ''} [{platform}, "
              f"{code}]{'  <- NOT REPRODUCED' if v.fails else ''}")
        if v.filled_from_today:
            print(f"    keys absent from the record, taken from today's config: "
                  f"{', '.join(v.filled_from_today)}")
    if args.json:
        args.json.write_text(json.dumps([asdict(v) for v in verdicts], indent=2))
    failing = [v for v in verdicts if v.fails or (v.error is not None)]
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
