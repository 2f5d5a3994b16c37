"""Planning benchmark: composing a sweep's jobs, Hydra's own path against tmgg's.

Measured in one invocation, each measurement in a fresh Python process (imports and
Hydra's start-up are not timed; only composing and validating every job is):

* **stage 1, baseline**: ``compose_sweep(["stage=stage1"], shared_cache=False)``,
  every job composed by Hydra's ``load_sweep_config`` with Hydra's own per-load
  repository: each job re-reads and re-parses every config file, builds its defaults
  tree and merges the files. Freezing and validating each job is the same code in
  both measurements (and got faster too), so the ratio understates the gain over the
  code before issue 13's planning work.
* **stage 1, now**: the same 108 jobs as ``tmgg-sweep plan`` and ``tmgg-train -m``
  compose them (``tmgg.jobs.composer``): one parse of each file for the
  sweep, Hydra's full composition once per distinct set of group choices (three for
  stage 1) and each job that composition with its own value overrides.
* **stage 1, from plan.json**: ``recorded_or_composed_sweep``, what ``reconcile`` and
  ``report`` do when the ledger's plan was recorded for the same overrides and inputs.
* **a 1000-job grid**: stage 1 with 30 seeds (``seed=range(1,31)``: 1080 jobs), now.

Printed per measurement: wall seconds and CPU seconds of the process (on a shared
machine the CPU time is the steadier figure), jobs, milliseconds per job; then the
ratios baseline/now and the targets of issue 13 (stage-1 plan >= 5x faster than
today's, a 1000-job grid in < 30 s).

Usage: ``python benchmarks/bench_planning.py [--grid-seeds 30] [--skip-grid]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGE1 = ["stage=stage1"]
TARGET_RATIO = 5.0
TARGET_GRID_S = 30.0


def measure(mode: str, overrides: list[str]) -> dict[str, Any]:
    """In this process: compose ``overrides`` one way and time it (imports excluded)."""
    from tmgg.jobs.compose import (
        compose_sweep,
        hydra_session,
        load_master_config,
        recorded_or_composed_sweep,
    )

    if mode == "recorded":
        # Record the plan as tmgg-train -m does, then time reading it back.
        from tmgg.jobs.compose import compose_jobs
        from tmgg.jobs.sweep import record_plan

        with hydra_session() as loader:
            master = load_master_config(loader, overrides)
            record_plan(compose_jobs(loader, master, overrides).jobs, master, overrides)
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "recorded":
        sweep = recorded_or_composed_sweep(overrides)
        assert sweep.from_plan, "the recorded plan was not used"
    else:
        sweep = compose_sweep(overrides, shared_cache=(mode == "now"))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"mode": mode, "overrides": overrides, "jobs": len(sweep.jobs),
            "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "ms_per_job": round(1000 * wall / max(1, len(sweep.jobs)), 1)}


def run_child(mode: str, overrides: list[str], workdir: Path) -> dict[str, Any]:
    """One measurement in a fresh interpreter; ledgers and outputs under ``workdir``."""
    dirs = [f"experiments_dir={workdir / 'experiments'}", f"outputs_dir={workdir / 'outputs'}"]
    command = [sys.executable, __file__, "--child", mode, *overrides, *dirs]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run(command, cwd=REPO, text=True, capture_output=True, env=env,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {' '.join(overrides)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {mode:9s} {result['jobs']:5d} jobs  wall {result['wall_s']:8.2f} s  "
          f"cpu {result['cpu_s']:8.2f} s  {result['ms_per_job']:7.1f} ms/job", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid-seeds", type=int, default=30,
                        help="seeds of the large grid (30: 1080 jobs)")
    parser.add_argument("--skip-grid", action="store_true", help="stage 1 only")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *overrides = args.child
        print(json.dumps(measure(mode, overrides)))
        return 0

    print(f"planning benchmark on {platform.node()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tmgg-bench-planning-") as tmp:
        work = Path(tmp)
        print("stage 1 (108 jobs):", flush=True)
        baseline = run_child("baseline", STAGE1, work / "baseline")
        now = run_child("now", STAGE1, work / "now")
        recorded = run_child("recorded", STAGE1, work / "recorded")
        grid = None
        if not args.skip_grid:
            grid_overrides = [*STAGE1, f"seed=range(1,{args.grid_seeds + 1})"]
            print(f"large grid ({' '.join(grid_overrides)}):", flush=True)
            grid = run_child("now", grid_overrides, work / "grid")
    ratio_wall = baseline["wall_s"] / now["wall_s"]
    ratio_cpu = baseline["cpu_s"] / now["cpu_s"]
    summary: dict[str, Any] = {
        "time": datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(),
        "load_after": round(os.getloadavg()[0], 1),
        "stage1": {"baseline": baseline, "now": now, "from_plan": recorded,
                   "speedup_wall": round(ratio_wall, 2), "speedup_cpu": round(ratio_cpu, 2),
                   "from_plan_speedup_wall": round(baseline["wall_s"] / recorded["wall_s"], 1),
                   "target_speedup": TARGET_RATIO},
        "grid": None if grid is None else {**grid, "target_s": TARGET_GRID_S,
                                           "meets_target": grid["wall_s"] < TARGET_GRID_S,
                                           "cpu_meets_target": grid["cpu_s"] < TARGET_GRID_S},
    }
    print(f"stage 1 composed now vs Hydra's own path: {ratio_wall:.2f}x wall, {ratio_cpu:.2f}x "
          f"CPU (target >= {TARGET_RATIO:.0f}x); read from plan.json: "
          f"{summary['stage1']['from_plan_speedup_wall']}x")
    if grid is not None:
        print(f"{grid['jobs']}-job grid: {grid['wall_s']:.1f} s wall, {grid['cpu_s']:.1f} s "
              f"CPU (target < {TARGET_GRID_S:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
