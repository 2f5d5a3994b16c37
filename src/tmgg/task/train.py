"""One training job: compose-time config in, trained model and test metrics out.

This is what every launcher runs (through the job executor or Hydra's run_job). It
imports torch and lightning lazily so that Hydra's start-up stays light.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tmgg.config import validate_job_config

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"


def job_output_dir(cfg: DictConfig) -> Path:
    """The job's Hydra output directory (per-job, deterministic)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.outputs_dir) / str(cfg.stage.name) / str(cfg.job.run_name)


def set_threads(cfg: DictConfig) -> None:
    import torch

    # Subnormal floats (tiny eigenvector entries, decayed weights) make CPU kernels
    # ~10x slower; flushing them to zero costs no accuracy that matters here.
    torch.set_flush_denormal(True)
    threads = cfg.trainer.get("num_threads")
    if threads is None:
        threads = int(os.environ.get("TMGG_NUM_THREADS", "0")) or None
    if threads:
        torch.set_num_threads(int(threads))


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def run_training(cfg: DictConfig, extra_callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train and test one job; write metrics.json into its output dir and return it."""
    validate_job_config(cfg)
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tmgg.task.module import DenoisingModule, GraphDenoisingData

    started = time.perf_counter()
    output_dir = job_output_dir(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_threads(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    trainer_cfg = cfg.trainer
    data = GraphDenoisingData(OmegaConf.to_container(cfg.data, resolve=True),
                              list(cfg.noise.levels), int(cfg.seed), int(trainer_cfg.max_steps))
    data.setup()
    module = DenoisingModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        max_steps=int(trainer_cfg.max_steps),
        log_every_n_steps=int(trainer_cfg.log_every_n_steps),
        # Clipped in the module's own (manual) optimisation step, not by the Trainer.
        gradient_clip_val=float(trainer_cfg.gradient_clip_val),
        objective=objective_config(cfg),
    )
    module.references = module.reference_metrics(data.test_levels, "test")
    val_references = module.reference_metrics(data.val_levels, "val")

    from tmgg.task.loggers import build_logger

    logger = build_logger(cfg, output_dir)
    callbacks: list[Any] = list(extra_callbacks or []) + _launcher_callbacks(cfg, output_dir)
    if logger.__class__.__name__ == "WandbLogger":
        from tmgg.task.wandb_guard import WandbDestinationGuard

        # The live run must be at the pinned destination before any training step.
        callbacks.insert(0, WandbDestinationGuard.for_job(cfg))
    checkpoint_dir = output_dir / CHECKPOINT_DIR
    checkpoint = None
    if trainer_cfg.checkpoint:
        checkpoint = ModelCheckpoint(dirpath=str(checkpoint_dir), filename="best",
                                     monitor="val/loss", mode="min", save_top_k=1,
                                     save_last=True, auto_insert_metric_name=False)
        callbacks.append(checkpoint)
    trainer = L.Trainer(
        max_steps=int(trainer_cfg.max_steps),
        val_check_interval=int(trainer_cfg.val_check_interval),
        check_val_every_n_epoch=None,
        gradient_clip_val=None,  # DenoisingModule clips (it optimises manually)
        accelerator=str(trainer_cfg.accelerator),
        devices=trainer_cfg.devices,
        precision=str(trainer_cfg.precision),
        log_every_n_steps=int(trainer_cfg.log_every_n_steps),
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(output_dir),
        deterministic=True,
    )
    resume_from = checkpoint_dir / "last.ckpt"
    ckpt_path = str(resume_from) if trainer_cfg.resume and resume_from.exists() else None
    resumed_from_step = checkpoint_step(ckpt_path)  # before fit overwrites last.ckpt
    if ckpt_path:
        log.info("Resuming %s from %s", cfg.job.run_name, ckpt_path)
    # One line per training attempt in the job's log: how often a job trained, and from
    # where, can be read back (the exactly-once chaos test counts these).
    log.info("Training %s from step %d (pid %d)", cfg.job.run_name, resumed_from_step,
             os.getpid())
    failed = True
    try:
        with warnings.catch_warnings():
            # Lightning cannot see that the training stream resumes where the checkpoint
            # left off (GraphDenoisingData.train_dataloader), so it warns that it won't.
            warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that "
                                    "ended before the epoch ended")
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        validated = dict(trainer.callback_metrics)
        best = checkpoint.best_model_path if checkpoint is not None else ""
        if tests_last_weights(cfg):
            best = ""  # the weights in memory: those of the last step
        test_results = trainer.test(module, datamodule=data, ckpt_path=best or None,
                                    verbose=False)
        metrics = _floats(test_results[0] if test_results else {})
        # The last validation's averages (val/...), beside its reference scores.
        metrics.update({name: value for name, value in _floats(dict(validated)).items()
                        if name.startswith(("val/", "val_eps"))})
        metrics.update(val_references)
        result: dict[str, Any] = {
            "job_id": str(cfg.job.id),
            "run_name": str(cfg.job.run_name),
            **dict(sorted(metrics.items())),
            "global_step": int(trainer.global_step),
            "resumed_from_step": resumed_from_step,
            "train_seconds": round(time.perf_counter() - started, 3),
        }
        if logger.__class__.__name__ == "WandbLogger":
            from tmgg.task.wandb_guard import live_run_mode

            run = logger.experiment
            result["wandb_path"] = f"{run.entity}/{run.project}/{run.id}"
            result["wandb_mode"] = live_run_mode(run)
        _atomic_write_json(output_dir / METRICS_FILE, result)
        failed = False
        return result
    finally:
        # A warm worker runs many jobs: never let the next job reuse this W&B run.
        if logger.__class__.__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=1 if failed else 0)


def objective_config(cfg: DictConfig) -> dict[str, Any] | None:
    """The job's ``objective`` group as plain values (None: a config from before it)."""
    objective = cfg.get("objective")
    return None if objective is None else OmegaConf.to_container(objective, resolve=True)


def tests_last_weights(cfg: DictConfig) -> bool:
    """``trainer.test_checkpoint: last``: test the final weights, not the best val/loss."""
    return str(cfg.trainer.get("test_checkpoint", "best")) == "last"


def _launcher_callbacks(cfg: DictConfig, output_dir: Path) -> list[Any]:
    """Callbacks a launcher adds from where the job runs, named by TMGG_CALLBACK_FACTORY
    ("module:function", called with (cfg, output_dir)); the Modal launcher commits its
    volume once per validation round, after the round's checkpoints, this way. Tests'
    hold at a step (``tmgg.task.hold``) comes this way too."""
    from tmgg.task.hold import hold_callbacks

    spec = os.environ.get("TMGG_CALLBACK_FACTORY")
    if not spec:
        return hold_callbacks()
    import importlib

    module_name, _, function_name = spec.partition(":")
    return [*getattr(importlib.import_module(module_name), function_name)(cfg, output_dir),
            *hold_callbacks()]


def checkpoint_step(ckpt_path: str | None) -> int:
    if not ckpt_path:
        return 0
    import torch

    # weights_only: a checkpoint is data; unpickling it must not run code (as Lightning
    # itself loads it to resume).
    return int(torch.load(ckpt_path, map_location="cpu", weights_only=True)["global_step"])


def _atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
