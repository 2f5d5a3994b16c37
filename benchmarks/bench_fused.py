"""Fused against unfused training of one stage-1 seed (36 jobs), measured in one run.

Both ways run the real jobs composed by Hydra (``stage=stage1 seed=1``) at a reduced
step budget, on one core, CSV logging, no checkpoints: unfused, ``run_training`` of
each job one after the other; fused, ``run_fused_training`` of all 36 as one group.
Each way is run at two budgets (``--steps`` and twice that): the difference gives the
cost of a training step without the fixed per-job cost (set-up, evaluation, test).

Reported: steps/s per job both ways, their ratio (issue 13's target: >= 5x), and the
projected wall time of the whole 108-job stage 1 (10 000 steps, 10 validations) on
2 cores both ways (target fused: <= 12 min on a quiet machine).

Usage: ``python benchmarks/bench_fused.py [--steps 200] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STAGE1_JOBS, STAGE1_STEPS, CORES = 108, 10_000, 2


def _configs(root: Path, steps: int) -> list[Any]:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from tmgg.jobs.compose import compose_sweep

    sweep = compose_sweep(["stage=stage1", "seed=1", "logger=csv", f"trainer.max_steps={steps}",
                           f"trainer.val_check_interval={steps}", "trainer.checkpoint=false",
                           "trainer.num_threads=1", f"outputs_dir={root}/out",
                           f"experiments_dir={root}/exp"])
    HydraConfig.instance().cfg = None
    return [OmegaConf.create(job.task_config) for job in sweep.jobs]


def _unfused(configs: list[Any]) -> float:
    from tmgg.task.train import run_training

    started = time.perf_counter()
    for cfg in configs:
        run_training(cfg)
    return time.perf_counter() - started


def _fused(configs: list[Any], root: Path) -> float:
    from tmgg.task.fused import FusedMember, run_fused_training

    members = [FusedMember(cfg=cfg, output_dir=root / "fused" / str(cfg.job.run_name))
               for cfg in configs]
    started = time.perf_counter()
    run_fused_training(members)
    assert all(m.error is None for m in members)
    return time.perf_counter() - started


def measure(steps: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    out: dict[str, Any] = {"steps": [steps, 2 * steps]}
    for way in ("unfused", "fused"):
        times = []
        for budget in (steps, 2 * steps):
            with tempfile.TemporaryDirectory() as tmp:
                configs = _configs(Path(tmp), budget)
                times.append(_unfused(configs) if way == "unfused"
                             else _fused(configs, Path(tmp)))
        jobs = len(configs)
        step_cost = (times[1] - times[0]) / steps  # seconds per step of all 36 jobs
        fixed = times[0] - steps * step_cost  # set-up, one validation, test
        out[way] = {"seconds": times, "jobs": jobs,
                    "steps_per_s_per_job": round(1.0 / step_cost * jobs, 1) if step_cost > 0
                    else None,
                    "seconds_per_step_all_jobs": round(step_cost, 5),
                    "fixed_seconds": round(fixed, 2)}
        # 108 jobs = 3 seeds like this one; 10 validations instead of 1 (the fixed part
        # is counted 10x, an upper bound), on 2 cores.
        seed_cost = STAGE1_STEPS * step_cost + 10 * max(fixed, 0.0)
        out[way]["projected_stage1_min_2_cores"] = round(
            seed_cost * (STAGE1_JOBS / jobs) / CORES / 60, 1)
    out["ratio_fused_over_unfused"] = round(
        out["fused"]["steps_per_s_per_job"] / out["unfused"]["steps_per_s_per_job"], 2)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.steps)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
