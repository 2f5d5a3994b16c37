"""Lightning module and data module of the denoising task.

Training batches are generated on the fly (a seeded stream, one eps per batch);
validation and test sets are built once per job from fixed seeds and evaluated at
every noise level, as one batch per level, so their numbers are deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from tmgg.task.data import EvalLevel, GraphSplits, TrainBatches, build_graph_splits, make_eval_set
from tmgg.task.metrics import (
    logit_metrics,
    masked_bce_with_logits,
    off_diagonal_mask,
    prediction_metrics,
)
from tmgg.task.models import build_model
from tmgg.task.optim import build_optimizer, build_scheduler

# Offsets that derive the evaluation sets' fixed seeds from the run seed.
VAL_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_003
SAMPLING_KEYS = ("name", "samples_per_epoch", "val_samples", "test_samples", "batch_size")


def level_tag(eps: float) -> str:
    """0.01 -> '0.01': the eps part of metric names such as val_eps0.01/mse."""
    return f"{eps:g}"


class _EvalLevels(torch.utils.data.Dataset):
    """One item per noise level: the whole evaluation set at that level."""

    def __init__(self, levels: list[EvalLevel]) -> None:
        self.levels = levels

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        level = self.levels[index]
        return {"eps": level.eps, "clean": level.clean, "noisy": level.noisy}


class GraphDenoisingData(L.LightningDataModule):
    def __init__(self, data_cfg: Mapping[str, Any], levels: list[float], seed: int,
                 max_steps: int) -> None:
        super().__init__()
        self.data_cfg = dict(data_cfg)
        self.levels = [float(x) for x in levels]
        self.seed = int(seed)
        self.max_steps = int(max_steps)
        self.splits: GraphSplits | None = None
        self.val_levels: list[EvalLevel] = []
        self.test_levels: list[EvalLevel] = []

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        params = {k: v for k, v in self.data_cfg.items() if k not in SAMPLING_KEYS}
        self.splits = build_graph_splits(self.data_cfg["name"], params, self.seed)
        self.val_levels = make_eval_set(self.splits.val, int(self.data_cfg["val_samples"]),
                                        self.levels, self.seed + VAL_SEED_OFFSET)
        self.test_levels = make_eval_set(self.splits.test, int(self.data_cfg["test_samples"]),
                                         self.levels, self.seed + TEST_SEED_OFFSET)

    def train_dataloader(self) -> Iterable[dict[str, torch.Tensor]]:
        assert self.splits is not None
        # One stream of max_steps batches: the 1000-sample "epoch" of SPEC.md is a
        # sampling unit, not a loop boundary worth paying Lightning's per-epoch cost for.
        # Lightning takes any iterable; the stream already yields whole batches, so a
        # DataLoader around it would only add its fetch/convert work to every step.
        # Resumed from a checkpoint (global_step restored before this is called): carry
        # on where the stream was, not at its first batch. One batch is one step.
        done = self.trainer.global_step if self.trainer is not None else 0
        return TrainBatches(self.splits.train, int(self.data_cfg["batch_size"]),
                            self.max_steps, self.levels, self.seed, start=done)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_EvalLevels(self.val_levels), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_EvalLevels(self.test_levels), batch_size=None)


class DenoisingModule(L.LightningModule):
    """Trains one spectral model with masked BCE; logs SPEC.md section 6 metrics.

    The optimisation step is written out (manual optimisation): a step of these tiny
    models takes a few milliseconds, and Lightning's automatic loop (closure, hook
    calls around zero_grad/backward/step/clipping) adds a tenth to each one. The
    arithmetic is the automatic loop's: zero_grad, backward, clip the gradient norm
    to ``gradient_clip_val`` (0 = off), optimiser step, then the per-step scheduler.
    Give the Trainer ``gradient_clip_val=None``: clipping is done here.
    """

    def __init__(self, model: Mapping[str, Any], optimizer: Mapping[str, Any],
                 scheduler: Mapping[str, Any], max_steps: int, log_every_n_steps: int = 50,
                 gradient_clip_val: float | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.gradient_clip_val = float(gradient_clip_val or 0.0)
        model_args = {k: v for k, v in model.items() if k != "name"}
        self.model = build_model(model["name"], **model_args)
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler)
        self.max_steps = int(max_steps)
        self.log_every_n_steps = int(log_every_n_steps)
        self._eval_outputs: list[dict[str, torch.Tensor]] = []
        self.references: dict[str, float] = {}

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return self.model(noisy)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        logits = self.model(batch["noisy"])
        loss = masked_bce_with_logits(logits, batch["clean"])
        # Log only on the steps Lightning writes: self.log costs more than a tiny step.
        # The lr is read before this step's optimizer/scheduler step: the lr it uses.
        if (self.global_step + 1) % self.log_every_n_steps == 0:
            self.log_dict({
                "train/loss": loss.detach(),
                "train/accuracy": edge_accuracy(logits.detach(), batch["clean"]),
                "train/noise_level": float(batch["eps"]),
                "lr": optimizer.param_groups[0]["lr"],
            }, on_step=True, on_epoch=False, batch_size=batch["noisy"].shape[0])
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.gradient_clip_val > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val,
                                gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # type: ignore[union-attr]
        return loss.detach()

    def _evaluate(self, batch: dict[str, Any], prefix: str) -> None:
        metrics = logit_metrics(self.model(batch["noisy"]), batch["clean"])
        tag = level_tag(float(batch["eps"]))
        self.log_dict({f"{prefix}_eps{tag}/{name}": value for name, value in metrics.items()},
                      on_epoch=True, batch_size=1)
        self._eval_outputs.append(metrics)

    def _log_average(self, prefix: str) -> None:
        if not self._eval_outputs:
            return
        names = self._eval_outputs[0].keys()
        averaged = {f"{prefix}/{name}": torch.stack([o[name] for o in self._eval_outputs]).mean()
                    for name in names}
        self._eval_outputs.clear()
        self.log_dict(averaged, on_epoch=True, batch_size=1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs.clear()

    def on_validation_epoch_end(self) -> None:
        self._log_average("val")

    def on_test_epoch_start(self) -> None:
        self._eval_outputs.clear()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_average("test")
        self.log_dict({name: torch.tensor(value) for name, value in self.references.items()},
                      batch_size=1)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.model.parameters(), self.optimizer_cfg)
        scheduler = build_scheduler(optimizer, self.scheduler_cfg, self.max_steps)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def edge_accuracy(logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The ``accuracy`` of ``logit_metrics`` alone, without its eigendecompositions.

    P = (L > 0) is an edge exactly where the logit is positive; compared with A off
    the diagonal, pooled over the batch, as ``prediction_metrics`` does.
    """
    mask = off_diagonal_mask(logits.shape[-1], logits.device)
    hits = (logits > 0) == (clean > 0.5)
    return hits[..., mask].to(logits.dtype).mean()


def reference_metrics(levels: list[EvalLevel], prefix: str) -> dict[str, float]:
    """The "no edges" and "noisy input" scores, averaged over noise levels (SPEC.md 6).

    These are ``metrics.reference_scores`` per level. The levels of an evaluation set
    share one clean set, and "no edges" depends on nothing else: it is scored once
    per distinct clean tensor, not once per level (each costs two eigendecompositions
    of the whole set).
    """
    no_edges_of: dict[int, dict[str, torch.Tensor]] = {}
    per_level = []
    for level in levels:
        key = id(level.clean)
        if key not in no_edges_of:
            no_edges_of[key] = prediction_metrics(torch.zeros_like(level.clean), level.clean)
        # prediction_metrics zeroes the diagonal itself, as reference_scores does.
        per_level.append({"no_edges": no_edges_of[key],
                          "noisy_input": prediction_metrics(level.noisy, level.clean)})
    out: dict[str, float] = {}
    for reference in ("no_edges", "noisy_input"):
        for name in per_level[0][reference]:
            values = torch.stack([scores[reference][name] for scores in per_level])
            out[f"{prefix}_reference_{reference}/{name}"] = float(values.mean())
    return out

