"""A fused adaptive study against an unfused one on the same trials, measured in one run.

Both ways run the same small study of ``stage=tiny_search`` through ``tmgg-train -m``
(Optuna's random sampler with one seed asks the same trials whatever their results;
two seeds per trial, CSV logging, no pruner unless ``--pruner``), each in its own
temporary experiments/outputs directories, on the same local launcher
(``n_workers=2``, one thread each):

- unfused: ``hydra.sweeper.fuse_trials=false``, ``n_jobs=K`` asynchronous trials, each
  job trained alone (a free thread takes a new trial as soon as its last ended);
- fused: ``fuse_trials=true``, rounds of K trials whose seed-s jobs train as one fused
  group (K members share each batch and its eigendecomposition), the next round when
  the last group of this one ends.

Reported: the training steps every job recorded (pruned ones count the steps they ran),
wall seconds and steps/s both ways, and their ratio (fused / unfused). The trial sets
are checked to be equal (the same job ids both ways).

Usage: ``python benchmarks/bench_search_fused.py [--trials 8] [--round 4] [--steps 100]
[--pruner none|median] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGE = "tiny_search"


def _study(root: Path, fused: bool, args: argparse.Namespace) -> dict[str, Any]:
    overrides = [
        f"stage={STAGE}", "logger=csv", f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={max(1, args.steps // 4)}", "trainer.checkpoint=false",
        "trainer.num_threads=1", "data.val_samples=50", "data.test_samples=50",
        "seed=1,2", "hydra/launcher=local", "hydra.launcher.n_workers=2",
        f"hydra.sweeper.n_trials={args.trials}", f"hydra.sweeper.n_jobs={args.round}",
        f"hydra.sweeper.fuse_trials={str(fused).lower()}", "hydra.sweeper.sampler=random",
        "hydra.sweeper.seed=0", f"hydra.sweeper.pruner={args.pruner}",
        "hydra.sweeper.pruner_startup_trials=1",
        f"experiments_dir={root}/experiments", f"outputs_dir={root}/outputs"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tmgg.cli.app", "-m", *overrides], cwd=REPO,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the {'fused' if fused else 'unfused'} study failed:\n"
                         f"{done.stderr[-3000:]}")
    records = [json.loads(p.read_text())
               for p in sorted((root / "experiments" / STAGE / "jobs").glob("*.json"))]
    steps = sum(int((r.get("metrics") or {}).get("global_step") or 0) for r in records)
    return {"seconds": round(seconds, 2), "steps": steps,
            "steps_per_s": round(steps / seconds, 2), "jobs": len(records),
            "pruned": sum(r.get("status") == "PRUNED" for r in records),
            "fused_groups_of": sorted({int((r.get("metrics") or {}).get("fused_members") or 1)
                                       for r in records}),
            "job_ids": sorted(r["job_id"] for r in records)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--round", type=int, default=4, help="n_jobs: trials at once")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--pruner", default="none", choices=("none", "median"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tmgg-bench-search-fused-") as tmp:
        unfused = _study(Path(tmp) / "unfused", False, args)
        fused = _study(Path(tmp) / "fused", True, args)
    same_trials = unfused.pop("job_ids") == fused.pop("job_ids")
    ratio = fused["steps_per_s"] / unfused["steps_per_s"]
    result = {"trials": args.trials, "round": args.round, "steps": args.steps,
              "pruner": args.pruner, "same_trials": same_trials, "unfused": unfused,
              "fused": fused, "fused_over_unfused_steps_per_s": round(ratio, 2)}
    for name in ("unfused", "fused"):
        row = result[name]
        print(f"{name:>8}: {row['jobs']} jobs, {row['steps']} steps in {row['seconds']} s "
              f"= {row['steps_per_s']} steps/s, {row['pruned']} pruned, "
              f"groups of {row['fused_groups_of']}")
    print(f"fused / unfused steps/s: {ratio:.2f} (same trials: {same_trials})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same_trials or args.pruner != "none" else 1


if __name__ == "__main__":
    sys.exit(main())
