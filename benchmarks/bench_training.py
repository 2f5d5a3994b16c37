"""Training throughput: the real Lightning job versus a bare PyTorch loop, on one core.

For each model at stage-1 settings (sbm_partitions, n = 20, batch 100, k 8 and 16)
this runs, in one process and with ``torch.set_num_threads(1)``:

* the **real job**: the stage-1 job composed by Hydra (``compose_sweep``, as
  ``tmgg-train -m stage=stage1`` composes it) and run by ``run_training`` itself —
  the same DenoisingModule, GraphDenoisingData, Trainer, CSV logger, ModelCheckpoint
  (best val/loss + last) and test pass — with a shorter ``trainer.max_steps`` and a
  validation every ``--val-every`` steps so that one run measures steps, validations
  and the fixed per-job cost. A timing callback records when each step ends.
* a **bare loop** of the same model, data stream, AdamW, cosine warm-up scheduler and
  gradient-norm clipping (1.0), timed before and after the real job (noise on a
  shared machine hits both).

Steps/s exclude warm-up and every step interval that contains a validation. The
projected full stage-1 job (10 000 steps, 10 validations, test) is the measured wall
time of the short real job plus the missing steps and validations at their measured
cost. Issue 2's targets: Lightning/bare >= 0.8 for every model, projection <= 60 s.

Usage: ``python benchmarks/bench_training.py [--steps 1000] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODELS = ("linear_pe", "filter_bank", "self_attention")
KS = (8, 16)
FULL_STEPS = 10_000  # stage-1 trainer.max_steps (SPEC.md section 5)
FULL_VAL_EVERY = 1_000
TARGET_RATIO = 0.8
TARGET_JOB_SECONDS = 60.0


@dataclass
class Result:
    model: str
    k: int
    lightning_steps_per_s: float
    bare_steps_per_s: float
    ratio: float
    lightning_ms_per_step: float
    bare_ms_per_step: float
    lightning_median_ms: float
    bare_median_ms: float
    ratio_cpu: float  # the same ratio from process CPU time (less sensitive to other load)
    validation_s: float  # one validation pass incl. its checkpoint writes
    setup_s: float  # run_training entry -> first training step
    test_s: float  # end of fit -> run_training returned (best-ckpt load, test, metrics.json)
    measured_job_s: float  # wall of the short real job
    measured_steps: int
    measured_validations: int
    projected_job_s: float
    bare_breakdown_ms: dict[str, float] = field(default_factory=dict)


def _quiet() -> None:
    """Lightning's per-job banners ("GPU available", tips) would bury the table."""
    warnings.filterwarnings("ignore")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("lightning", "pytorch_lightning")):
            logging.getLogger(name).setLevel(logging.ERROR)


def compose_job(model: str, k: int, steps: int, val_every: int, root: Path) -> Any:
    """The stage-1 job for (model, k), composed by Hydra exactly as a sweep composes it."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from tmgg.jobs.compose import compose_sweep

    sweep = compose_sweep([
        "stage=stage1", f"model={model}", f"model.k={k}", "optimizer.lr=1e-3",
        "optimizer.weight_decay=1e-2", "seed=1", "logger=csv",
        f"outputs_dir={root / 'outputs'}", f"experiments_dir={root / 'experiments'}",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={val_every}",
        "trainer.num_threads=1",
    ])
    (job,) = sweep.jobs
    # compose_sweep leaves the master config in HydraConfig; a job run outside a Hydra
    # launcher writes to outputs_dir/<stage>/<run_name> instead.
    HydraConfig.instance().cfg = None  # type: ignore[assignment]
    return OmegaConf.create(job.task_config)


def _step_timer() -> Any:
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """Wall-clock marks of the events the benchmark needs (no per-step sync needed on CPU)."""

        def __init__(self) -> None:
            self.step_ends: list[float] = []
            self.cpu_ends: list[float] = []
            self.val_after_step: list[int] = []  # number of steps done when a validation ran
            self.first_step_start: float | None = None
            self.fit_end: float | None = None

        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if self.first_step_start is None:
                self.first_step_start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.step_ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

        def on_validation_start(self, trainer: Any, *args: Any) -> None:
            if not trainer.sanity_checking:
                self.val_after_step.append(len(self.step_ends))

        def on_fit_end(self, trainer: Any, *args: Any) -> None:
            self.fit_end = time.perf_counter()

    return StepTimer()


def run_real_job(cfg: Any, warmup: int) -> dict[str, Any]:
    """Run the job with run_training; return per-step and per-phase timings."""
    from tmgg.task.train import run_training

    timer = _step_timer()
    started = time.perf_counter()
    run_training(cfg, extra_callbacks=[timer])
    returned = time.perf_counter()
    val_steps = set(timer.val_after_step)
    step_s, median, with_val = _window(timer.step_ends, val_steps, warmup)
    cpu_step_s, _, _ = _window(timer.cpu_ends, val_steps, warmup)
    ends = timer.step_ends
    val_cost = [interval - median for interval in with_val]
    # The validation after the last step (if any) is not inside an interval: take it
    # from the end of the last step to the end of fit.
    if len(ends) in val_steps and timer.fit_end is not None:
        val_cost.append(timer.fit_end - ends[-1])
    return {
        "step_s": step_s,
        "cpu_step_s": cpu_step_s,
        "median_s": median,
        "validation_s": statistics.mean(val_cost) if val_cost else 0.0,
        "validations": len(timer.val_after_step),
        "steps": len(ends),
        "setup_s": (timer.first_step_start or started) - started,
        "test_s": returned - (timer.fit_end or returned),
        "wall_s": returned - started,
    }


def _window(ends: list[float], val_steps: set[int], warmup: int
            ) -> tuple[float, float, list[float]]:
    """Mean and median step interval after warm-up, without intervals holding a validation."""
    kept: list[float] = []
    with_val: list[float] = []
    for i in range(max(warmup, 1), len(ends)):
        interval = ends[i] - ends[i - 1]
        (with_val if i in val_steps else kept).append(interval)
    return sum(kept) / len(kept), statistics.median(kept), with_val


def run_bare(cfg: Any, steps: int, warmup: int) -> dict[str, Any]:
    """The same model, data stream, optimiser, schedule and clipping in a plain loop."""
    import torch
    from omegaconf import OmegaConf

    from tmgg.task.data import TrainBatches
    from tmgg.task.metrics import masked_bce_with_logits
    from tmgg.task.models import build_model
    from tmgg.task.module import GraphDenoisingData
    from tmgg.task.optim import build_optimizer, build_scheduler
    from tmgg.task.train import set_threads

    set_threads(cfg)  # the job's own thread and float settings (1 thread, flush denormals)
    torch.manual_seed(int(cfg.seed))
    data = GraphDenoisingData(OmegaConf.to_container(cfg.data, resolve=True),
                              list(cfg.noise.levels), int(cfg.seed), FULL_STEPS)
    data.setup()
    assert data.splits is not None
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model_cfg, dict)
    model = build_model(model_cfg.pop("name"), **model_cfg)
    optimizer = build_optimizer(model.parameters(), OmegaConf.to_container(cfg.optimizer))
    scheduler = build_scheduler(optimizer, OmegaConf.to_container(cfg.scheduler), FULL_STEPS)
    clip = float(cfg.trainer.gradient_clip_val)
    stream = iter(TrainBatches(data.splits.train, int(cfg.data.batch_size), FULL_STEPS,
                               data.levels, int(cfg.seed)))
    model.train()

    def step() -> None:
        batch = next(stream)
        loss = masked_bce_with_logits(model(batch["noisy"]), batch["clean"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    for _ in range(warmup):
        step()
    times = []
    cpu_started = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    cpu_seconds = time.process_time() - cpu_started

    # Where a bare step's time goes (each part timed on its own, same sizes).
    batch = next(stream)
    noisy, clean = batch["noisy"], batch["clean"]

    def timed(fn: Any, n: int = 100) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    def fwd_bwd() -> None:
        loss = masked_bce_with_logits(model(noisy), clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    from tmgg.task.spectral import top_k_eigenpairs

    sym = (noisy + noisy.mT) * 0.5
    breakdown = {
        "data_batch": timed(lambda: next(stream)),
        "eigh": timed(lambda: torch.linalg.eigh(sym)),
        "top_k_eigenpairs": timed(lambda: top_k_eigenpairs(noisy, model.k)),
        "forward+loss": timed(lambda: masked_bce_with_logits(model(noisy), clean)),
        "forward+loss+backward": timed(fwd_bwd),
        "clip_grad_norm": timed(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                        clip)),
        "optimizer_step": timed(optimizer.step),
    }
    return {"times": times, "cpu_seconds": cpu_seconds, "breakdown": breakdown}


def bench_one(model: str, k: int, steps: int, val_every: int, warmup: int,
              root: Path) -> Result:
    cfg = compose_job(model, k, steps, val_every, root / f"{model}_k{k}")
    bare_steps = max(100, steps // 2)
    before = run_bare(cfg, bare_steps, warmup)
    real = run_real_job(cfg, warmup)
    after = run_bare(cfg, bare_steps, warmup)
    bare_times = before["times"] + after["times"]
    bare_step_s = sum(bare_times) / len(bare_times)
    bare_cpu_step_s = (before["cpu_seconds"] + after["cpu_seconds"]) / len(bare_times)
    missing_steps = FULL_STEPS - real["steps"]
    missing_vals = FULL_STEPS // FULL_VAL_EVERY - real["validations"]
    projected = (real["wall_s"] + missing_steps * real["step_s"]
                 + missing_vals * real["validation_s"])
    return Result(
        model=model, k=k,
        lightning_steps_per_s=1.0 / real["step_s"],
        bare_steps_per_s=1.0 / bare_step_s,
        ratio=bare_step_s / real["step_s"],
        lightning_ms_per_step=real["step_s"] * 1e3,
        bare_ms_per_step=bare_step_s * 1e3,
        lightning_median_ms=real["median_s"] * 1e3,
        bare_median_ms=statistics.median(bare_times) * 1e3,
        ratio_cpu=bare_cpu_step_s / real["cpu_step_s"],
        validation_s=real["validation_s"],
        setup_s=real["setup_s"],
        test_s=real["test_s"],
        measured_job_s=real["wall_s"],
        measured_steps=real["steps"],
        measured_validations=real["validations"],
        projected_job_s=projected,
        bare_breakdown_ms={name: round(ms, 4) for name, ms in
                           {n: (before["breakdown"][n] + after["breakdown"][n]) / 2
                            for n in before["breakdown"]}.items()},
    )


def print_results(results: list[Result], args: argparse.Namespace) -> bool:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(150, Console().width))
    table = Table(title=f"Training throughput on one core ({args.steps}-step real stage-1 "
                        f"jobs, validation every {args.val_every} steps; bare loop "
                        f"{max(100, args.steps // 2)} steps before + after)")
    for column in ("model", "k", "Lightning steps/s", "bare steps/s", "ratio L/bare",
                   "ratio (CPU time)", "L ms/step (median)", "bare ms/step (median)",
                   "validation s",
                   "setup s", "test s", f"projected {FULL_STEPS}-step job s"):
        table.add_column(column, justify="right" if column not in ("model",) else "left")
    ok = True
    for r in results:
        ratio_ok = r.ratio >= TARGET_RATIO
        job_ok = r.projected_job_s <= TARGET_JOB_SECONDS
        ok = ok and ratio_ok and job_ok
        table.add_row(
            r.model, str(r.k), f"{r.lightning_steps_per_s:.1f}", f"{r.bare_steps_per_s:.1f}",
            f"[{'green' if ratio_ok else 'red'}]{r.ratio:.2f}[/]", f"{r.ratio_cpu:.2f}",
            f"{r.lightning_ms_per_step:.2f} ({r.lightning_median_ms:.2f})",
            f"{r.bare_ms_per_step:.2f} ({r.bare_median_ms:.2f})",
            f"{r.validation_s:.3f}", f"{r.setup_s:.3f}", f"{r.test_s:.3f}",
            f"[{'green' if job_ok else 'red'}]{r.projected_job_s:.1f}[/]",
        )
    console.print(table)

    parts = Table(title="Bare step breakdown, ms (each part timed alone; forward includes "
                        "the eigendecomposition)")
    parts.add_column("model")
    parts.add_column("k", justify="right")
    names = list(results[0].bare_breakdown_ms) if results else []
    for name in names:
        parts.add_column(name, justify="right")
    parts.add_column("Lightning - bare", justify="right")
    for r in results:
        parts.add_row(r.model, str(r.k), *[f"{r.bare_breakdown_ms[n]:.2f}" for n in names],
                      f"{r.lightning_ms_per_step - r.bare_ms_per_step:.2f}")
    console.print(parts)
    console.print(
        f"Targets (issue 2): ratio >= {TARGET_RATIO} and projected job <= "
        f"{TARGET_JOB_SECONDS:.0f} s for every model: "
        + ("[green]met[/]" if ok else "[red]NOT met[/]")
        + ". Projection = measured short-job wall + missing steps x Lightning step time"
        " + missing validations x validation time. Timings on a shared machine are noisy;"
        " the ratio is measured in the same run."
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000,
                        help="training steps of each real (short) stage-1 job")
    parser.add_argument("--val-every", type=int, default=250,
                        help="validation interval of the short job (to measure validations)")
    parser.add_argument("--warmup", type=int, default=50, help="steps excluded from timing")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--k", nargs="+", type=int, default=list(KS))
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a target is not met")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 10:
        parser.error("--steps must exceed --warmup by more than 10")

    import torch

    torch.set_num_threads(1)
    import lightning  # (import cost is a per-worker, not a per-job, cost)

    _quiet()  # after the import: lightning sets its loggers' levels when imported

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tmgg_bench_training_") as tmp:
        root = Path(tmp)
        # A throwaway job first: a warm local worker has run jobs before, so the first
        # job's one-off costs (imports, lazy inits) are not part of a job's cost.
        run_training_warm = compose_job("linear_pe", 8, 60, 30, root / "warmup")
        run_real_job(run_training_warm, 5)
        for model in args.models:
            for k in args.k:
                result = bench_one(model, k, args.steps, args.val_every, args.warmup, root)
                results.append(result)
                print(f"{model} k={k}: Lightning {result.lightning_steps_per_s:.1f} steps/s, "
                      f"bare {result.bare_steps_per_s:.1f} steps/s, ratio {result.ratio:.2f}, "
                      f"projected job {result.projected_job_s:.1f} s", file=sys.stderr)
    ok = print_results(results, args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "training",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "machine": platform.platform(),
            "settings": {"steps": args.steps, "val_every": args.val_every,
                         "warmup": args.warmup, "full_steps": FULL_STEPS,
                         "full_validations": FULL_STEPS // FULL_VAL_EVERY},
            "targets": {"ratio": TARGET_RATIO, "job_seconds": TARGET_JOB_SECONDS},
            "targets_met": ok,
            "results": [asdict(r) for r in results],
        }, indent=2) + "\n")
    return 1 if (args.strict and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
