"""Lightning module and data module of the denoising task.

Training batches are generated on the fly (a seeded stream, one eps per batch);
validation and test sets are built once per job from fixed seeds and evaluated at
every noise level, as one batch per level, so their numbers are deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from tmgg.task.data import EvalLevel, GraphSplits, TrainBatches, build_graph_splits, make_eval_set
from tmgg.task.metrics import (
    edge_accuracy,
    logit_metrics,
    masked_bce_with_logits,
    member_bce_gradient,
    member_bce_with_logits,
    prediction_metrics,
    target_eigenpairs,
)
from tmgg.task.models import build_model
from tmgg.task.optim import build_optimizer, build_scheduler

# Offsets that derive the evaluation sets' fixed seeds from the run seed.
VAL_SEED_OFFSET = 1_000_003
TEST_SEED_OFFSET = 2_000_003
SAMPLING_KEYS = ("name", "samples_per_epoch", "val_samples", "test_samples", "batch_size")
#: The objective group's default (SPEC.md sections 1 and 6): off-diagonal loss and metrics.
DEFAULT_OBJECTIVE = {"name": "bce", "loss_diagonal": False, "metrics_diagonal": False}


class TrainingDiverged(RuntimeError):
    """The training loss stopped being finite: the job fails, solo or fused alike (a
    job that trained on into NaN weights would otherwise finish with a NaN test loss)."""


def divergence_message(loss: float, step: int) -> str:
    """Why a diverged job failed, in the same words for a solo job and a fused member."""
    return (f"non-finite training loss ({loss}) at step {step}: the job diverged (its "
            "learning rate, schedule or clipping)")


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
                                        self.levels, self.seed + VAL_SEED_OFFSET, self.self_loops)
        self.test_levels = make_eval_set(self.splits.test, int(self.data_cfg["test_samples"]),
                                         self.levels, self.seed + TEST_SEED_OFFSET,
                                         self.self_loops)

    @property
    def self_loops(self) -> bool:
        """Whether the graphs (clean and noisy) carry self-loops (``data.self_loops``)."""
        return bool(self.data_cfg.get("self_loops", False))

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
                            self.max_steps, self.levels, self.seed, start=done,
                            self_loops=self.self_loops)

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

    The loss and the metrics are methods (``compute_loss``, ``compute_metrics``, ...)
    so that a fused group (``tmgg.task.fused``) scores each member exactly as its solo
    job does; ``objective`` (the config group) says which entries they take.
    """

    def __init__(self, model: Mapping[str, Any], optimizer: Mapping[str, Any],
                 scheduler: Mapping[str, Any], max_steps: int, log_every_n_steps: int = 50,
                 gradient_clip_val: float | None = None,
                 objective: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        objective = dict(objective or DEFAULT_OBJECTIVE)
        if objective.get("name", "bce") != "bce":
            raise ValueError(f"objective.name: unknown objective {objective['name']!r}")
        #: BCE over all n x n entries (the diagonal logits included), not off-diagonal.
        self.loss_diagonal = bool(objective.get("loss_diagonal", False))
        #: Metrics (and the reference scores) over all n x n entries, P's diagonal zeroed.
        self.metrics_diagonal = bool(objective.get("metrics_diagonal", False))
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

    # -- loss and metrics (solo and fused call these)
    def compute_loss(self, logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """The training loss: mean BCE with logits over the scored entries."""
        return masked_bce_with_logits(logits, clean, self.loss_diagonal)

    @staticmethod
    def stacked_losses(members: Sequence[DenoisingModule], logits: torch.Tensor,
                       clean: torch.Tensor) -> torch.Tensor:
        """Each member's ``compute_loss`` of its row of ``logits`` (M, B, n, n), in one
        call (a fused group's stacked bank): shape (M,)."""
        return member_bce_with_logits(logits, clean, [m.loss_diagonal for m in members])

    @staticmethod
    def stacked_loss_gradient(members: Sequence[DenoisingModule], logits: torch.Tensor,
                              clean: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The gradient w.r.t. ``logits`` of the sum of the ``stacked_losses`` of the rows
        where ``rows`` is 1, equal bit for bit to autograd's (``member_bce_gradient``)."""
        return member_bce_gradient(logits, clean, [m.loss_diagonal for m in members], rows)

    def compute_accuracy(self, logits: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """``train/accuracy``: the accuracy of P = (L > 0) without eigendecompositions."""
        return edge_accuracy(logits, clean, self.metrics_diagonal)

    @property
    def metric_scope(self) -> bool:
        """Members with one scope share target eigenpairs and reference scores."""
        return self.metrics_diagonal

    def metric_targets(self, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean graphs' eigenpairs ``compute_metrics`` compares with (reusable)."""
        return target_eigenpairs(clean, self.metrics_diagonal)

    def compute_metrics(self, logits: torch.Tensor, clean: torch.Tensor,
                        target_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
                        pred_pairs: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
        """The SPEC.md section 6 metrics of one evaluation batch, ``loss`` included
        (``target_pairs`` / ``pred_pairs``: eigenpairs a fused group computed once)."""
        return logit_metrics(logits, clean, target_pairs, diagonal=self.metrics_diagonal,
                             loss_diagonal=self.loss_diagonal, pred_pairs=pred_pairs)

    def reference_metrics(self, levels: list[EvalLevel], prefix: str) -> dict[str, float]:
        """The "no edges" and "noisy input" scores under this module's metric scope."""
        return reference_metrics(levels, prefix, diagonal=self.metrics_diagonal)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        logits = self.model(batch["noisy"])
        loss = self.compute_loss(logits, batch["clean"])
        if not bool(torch.isfinite(loss)):  # before the step: its checkpoints stay finite
            raise TrainingDiverged(divergence_message(float(loss), self.global_step))
        # Log only on the steps Lightning writes: self.log costs more than a tiny step.
        # The lr is read before this step's optimizer/scheduler step: the lr it uses.
        if (self.global_step + 1) % self.log_every_n_steps == 0:
            self.log_dict({
                "train/loss": loss.detach(),
                "train/accuracy": self.compute_accuracy(logits.detach(), batch["clean"]),
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
        metrics = self.compute_metrics(self.model(batch["noisy"]), batch["clean"])
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


def reference_metrics(levels: list[EvalLevel], prefix: str,
                      diagonal: bool = False) -> dict[str, float]:
    """The "no edges" and "noisy input" scores, averaged over noise levels (SPEC.md 6),
    and "noisy input" per level.

    ``diagonal``: scored over all n x n entries (``objective.metrics_diagonal``).

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
            no_edges_of[key] = prediction_metrics(torch.zeros_like(level.clean), level.clean,
                                                  diagonal=diagonal)
        # prediction_metrics zeroes the diagonal itself, as reference_scores does.
        per_level.append({"no_edges": no_edges_of[key],
                          "noisy_input": prediction_metrics(level.noisy, level.clean,
                                                            diagonal=diagonal)})
    out: dict[str, float] = {}
    for reference in ("no_edges", "noisy_input"):
        for name in per_level[0][reference]:
            values = torch.stack([scores[reference][name] for scores in per_level])
            out[f"{prefix}_reference_{reference}/{name}"] = float(values.mean())
    # "noisy input" at each level, beside that level's metrics (``test_eps0.1/mse``):
    # a model may beat it at one noise level and not at another (issue 24). Already
    # computed above; "no edges" is the same at every level.
    for level, scores in zip(levels, per_level, strict=True):
        for name, value in scores["noisy_input"].items():
            out[f"{prefix}_eps{level_tag(level.eps)}_reference_noisy_input/{name}"] = \
                float(value)
    return out

