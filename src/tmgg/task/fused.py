"""Fused training: jobs that share a batch stream, trained together, each still its own job.

Jobs with the same data, noise, seed, batch size, step budget and evaluation schedule
(``tmgg.jobs.fusion.stream_key``) see the very same batches. A fused group
trains them in one Lightning Trainer: every step draws one batch and decomposes it
once (``symmetric_eigh``); members of the same architecture and k are evaluated as one
batched model (their parameters stacked on a leading member dim); each member keeps
its own parameters, optimiser, schedule, weight decay and gradient clipping.

A member is a plain :class:`~tmgg.task.module.DenoisingModule`, built exactly as the
solo job builds it (same seed, same RNG state), so its initial weights, its optimiser
and its checkpoints are the solo job's. What each member leaves is what a solo run
leaves: ``metrics.json``, ``checkpoints/best.ckpt`` and ``last.ckpt`` (in the solo
format: a solo job resumes from it), its own W&B run checked by the destination guard
before the first step. A member whose loss stops being finite, or whose W&B run fails
the guard, fails alone: it stops training and ``on_member_failed`` is told at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from tmgg.config import validate_job_config
from tmgg.task.loggers import PRUNED_AT_KEY, mark_run_pruned
from tmgg.task.metrics import distinct_graph_eigenpairs, member_losses_finite, predict
from tmgg.task.module import (
    DenoisingModule,
    GraphDenoisingData,
    TrainingDiverged,
    divergence_message,
    level_tag,
)
from tmgg.task.spectral import select_top_k, symmetric_eigh
from tmgg.task.stacked_optim import StackedBank, stackable_optimizer
from tmgg.task.train import CHECKPOINT_DIR, checkpoint_step

log = logging.getLogger(__name__)

#: The output directory of the member a log record is about (None: the whole group).
#: The launcher's per-member log files (``fused_jobs``) keep only their member's
#: records and the group's, as a solo job's ``app.log`` keeps its own.
LOGGING_MEMBER: ContextVar[str | None] = ContextVar("tmgg_fused_logging_member", default=None)


@contextlib.contextmanager
def logging_for(member: FusedMember) -> Iterator[None]:
    """Log records emitted inside are about ``member`` alone."""
    token = LOGGING_MEMBER.set(str(member.output_dir))
    try:
        yield
    finally:
        LOGGING_MEMBER.reset(token)



class MemberFailure(RuntimeError):
    """Why one member of a fused group stopped (the others go on)."""


class MemberDiverged(MemberFailure, TrainingDiverged):
    """A member's training loss stopped being finite: it fails as its solo job would."""


# --------------------------------------------------------------------------- optimiser


class MemberOptimizers(torch.optim.Optimizer):
    """The members' own optimisers and schedules, stepped as one optimiser.

    Lightning counts a step per ``optimizer.step()`` call in manual optimisation, so a
    group presents one optimiser. Its step is each active member's solo step in the
    solo order: clip the member's gradient norm to its ``gradient_clip_val`` (0 = off),
    the member's optimiser step, then its per-step schedule. Per-member learning rate,
    weight decay, betas and clipping are therefore exactly the solo job's.

    While training, members whose optimiser the stacked update reproduces (Adam/AdamW
    with the cosine warm-up or no schedule) are trained as ``StackedBank``s: one update
    per bank instead of one per member (``attach_banks``). Their own optimisers and
    schedules get the banks' state back (``write_back``) before anything reads them.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer],
                 schedulers: Sequence[Any | None], clip_values: Sequence[float],
                 active: set[int],
                 on_failure: Callable[[int, BaseException], None] | None = None) -> None:
        groups = [{"params": [p for g in opt.param_groups for p in g["params"]]}
                  for opt in optimizers]
        super().__init__(groups, defaults={})
        self.members = list(optimizers)
        self.schedulers = list(schedulers)
        self.clip_values = [float(v) for v in clip_values]
        self.active = active
        self.on_failure = on_failure
        self.banks: list[StackedBank] = []
        self._bank_of: dict[int, tuple[StackedBank, int]] = {}

    def attach_banks(self, models: Sequence[nn.Module]) -> list[StackedBank]:
        """Stack the active members that can be stacked, by architecture and k."""
        self.write_back()
        by_shape: dict[str, list[int]] = {}
        for index in sorted(self.active):
            if stackable_optimizer(self.members[index], self.schedulers[index]):
                model = models[index]
                by_shape.setdefault(f"{type(model).__name__}({model.extra_repr()})",
                                    []).append(index)
        self.banks = [StackedBank(indices, [models[i] for i in indices],
                                  [self.members[i] for i in indices],
                                  [self.schedulers[i] for i in indices],
                                  [self.clip_values[i] for i in indices])
                      for indices in by_shape.values()]
        self._bank_of = {index: (bank, row) for bank in self.banks
                         for row, index in enumerate(bank.indices)}
        return self.banks

    def detach_banks(self) -> None:
        """Back to the members' own parameters and optimisers (after training)."""
        self.write_back()
        self.banks = []
        self._bank_of = {}

    def write_back(self) -> None:
        """The banks' parameters and optimiser state into the active members' own."""
        for bank in self.banks:
            bank.write_back([row for row, i in enumerate(bank.indices) if i in self.active])

    def current_lr(self, index: int) -> float:
        """The learning rate member ``index`` uses at its next step."""
        if index in self._bank_of:
            bank, row = self._bank_of[index]
            return bank.lr(row)
        return float(self.members[index].param_groups[0]["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # A member that failed stays a row of its bank; rows never mix, and it is
        # never written back or saved again.
        for bank in self.banks:
            if not any(i in self.active for i in bank.indices):
                continue  # every member of the bank failed: no gradient to step with
            bank.clip_gradients()
            bank.optimizer_step()
        for index in sorted(self.active - self._bank_of.keys()):
            try:
                self._member_step(index)
            except Exception as error:  # noqa: BLE001 - this member fails alone
                if self.on_failure is None:
                    raise
                self.on_failure(index, MemberFailure(f"optimiser step failed: {error}"))
        return loss

    def _member_step(self, index: int) -> None:
        optimizer = self.members[index]
        if self.clip_values[index] > 0:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.clip_values[index])
        optimizer.step()
        if self.schedulers[index] is not None:
            self.schedulers[index].step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for bank in self.banks:
            bank.zero_grad()
        for index in self.active - self._bank_of.keys():
            self.members[index].zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        self.write_back()
        return {"members": [self.member_state(i) for i in range(len(self.members))]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for index, state in enumerate(state_dict["members"]):
            if state is not None:
                self.load_member_state(index, state)

    def member_state(self, index: int) -> dict[str, Any]:
        scheduler = self.schedulers[index]
        return {"optimizer": self.members[index].state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict()}

    def load_member_state(self, index: int, state: dict[str, Any]) -> None:
        self.members[index].load_state_dict(state["optimizer"])
        if self.schedulers[index] is not None and state.get("scheduler") is not None:
            self.schedulers[index].load_state_dict(state["scheduler"])


# --------------------------------------------------------------------------- module


class FusedDenoisingModule(L.LightningModule):
    """The members of a fused group as one LightningModule (manual optimisation).

    Each step: one eigendecomposition of the shared batch, the top-k selection once
    per distinct k, one batched forward per (architecture, k) bank, each member's
    loss exactly as its solo job computes it, one backward of their sum (the members
    share no parameter, so each gets its own gradient), then ``MemberOptimizers``.
    """

    def __init__(self, members: Sequence[DenoisingModule], log_every_n_steps: int,
                 on_member_failed: Callable[[int, BaseException], None]) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.members = nn.ModuleList(members)
        self.active: set[int] = set(range(len(members)))
        self.log_every_n_steps = int(log_every_n_steps)
        self.on_member_failed = on_member_failed
        self.failures: dict[int, BaseException] = {}
        # Members their sweeper pruned: the step, and their last validation's metrics.
        self.pruned: dict[int, int] = {}
        self.pruned_validation: dict[int, dict[str, float]] = {}
        self.val_metrics: dict[int, dict[str, float]] = {}
        self.test_metrics: dict[int, dict[str, float]] = {}
        self._eval_outputs: dict[int, list[dict[str, Tensor]]] = {}
        self._eval_levels: dict[int, dict[str, Tensor]] = {}
        self._pending_train_logs: dict[int, dict[str, Any]] = {}

    # -- membership
    def fail(self, index: int, error: BaseException) -> None:
        """Take a member out of the group; the others go on."""
        if index not in self.active:
            return
        self.active.discard(index)
        self.failures[index] = error
        log.error("fused member %d failed: %s", index, error)
        self.on_member_failed(index, error)
        if not self.active and self._trainer is not None:
            self.trainer.should_stop = True

    def prune(self, index: int, step: int) -> None:
        """Take a member its sweeper pruned out of training; the others go on.

        Its weights and optimiser state stay those of this validation (written back from
        its stacked bank first), the remaining members are stacked again without it (so
        its row costs nothing more), and it is tested with the others at the end, as a
        pruned solo job is tested after its last validation.
        """
        if index not in self.active:
            return
        optimizer = self.optimizers().optimizer
        optimizer.write_back()
        self.active.discard(index)
        self.pruned[index] = step
        self.pruned_validation[index] = dict(self.val_metrics.get(index, {}))
        if self.active:
            optimizer.attach_banks([m.model for m in self.members])
        else:
            self.trainer.should_stop = True

    def unstacked_banks(self) -> list[list[int]]:
        """Active members outside the optimiser's stacked banks, grouped by architecture,
        constructor arguments and k (all active members when no bank is attached)."""
        stacked = {i for bank in self._stacked_banks() for i in bank.indices}
        banks: dict[str, list[int]] = {}
        for index in sorted(self.active - stacked):
            model = self.members[index].model
            banks.setdefault(f"{type(model).__name__}({model.extra_repr()})", []).append(index)
        return list(banks.values())

    def _stacked_banks(self) -> list[StackedBank]:
        if self._trainer is None or not self.trainer.optimizers:
            return []
        optimizer = self.trainer.optimizers[0]
        return optimizer.banks if isinstance(optimizer, MemberOptimizers) else []

    def bank_outputs(self, noisy: Tensor) -> list[tuple[list[int], Tensor]]:
        """(member indices, their logits (M, B, n, n)) per bank: one eigendecomposition of
        the batch, the top-k selection once per k, one batched forward per bank. A
        stacked bank's rows include members that failed since it was stacked."""
        evals, evecs = symmetric_eigh(noisy)
        eigenpairs: dict[int, tuple[Tensor, Tensor]] = {}

        def top_k(k: int) -> tuple[Tensor, Tensor]:
            if k not in eigenpairs:
                eigenpairs[k] = select_top_k(evals, evecs, k)
            return eigenpairs[k]

        out = []
        for bank in self._stacked_banks():
            lead = bank.models[0]
            out.append((bank.indices, lead.symmetric_logits(bank.params, *top_k(lead.k))))
        for indices in self.unstacked_banks():
            lead = self.members[indices[0]].model
            per_member = [dict(self.members[i].model.named_parameters()) for i in indices]
            params = {name: torch.stack([p[name] for p in per_member]) for name in per_member[0]}
            out.append((indices, lead.symmetric_logits(params, *top_k(lead.k))))
        return out

    def all_logits(self, noisy: Tensor) -> dict[int, Tensor]:
        """Each active member's logits (B, n, n)."""
        out: dict[int, Tensor] = {}
        for indices, logits in self.bank_outputs(noisy):
            out.update((i, row) for i, row in zip(indices, logits.unbind(0), strict=True)
                       if i in self.active)
        return out

    def on_train_start(self) -> None:
        # After Lightning restored the members' optimiser states (a resumed group).
        self.optimizers().optimizer.attach_banks([m.model for m in self.members])

    def on_train_end(self) -> None:
        self.optimizers().optimizer.detach_banks()

    # -- training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        """One step of every active member: the BCE's gradient in closed form (bit for
        bit autograd's), the losses themselves only on logging steps or where a loss
        might not be finite; a member whose loss is not finite fails alone."""
        if not self.active:
            return None
        optimizer = self.optimizers()
        clean = batch["clean"]
        logging = (self.global_step + 1) % self.log_every_n_steps == 0
        trained: list[int] = []
        losses: dict[int, Tensor] = {}
        logits: dict[int, Tensor] = {}
        gradients: list[tuple[Tensor, Tensor]] = []  # (a bank's logits, dLoss/dlogits)
        for indices, bank_logits in self.bank_outputs(batch["noisy"]):
            members = [self.members[i] for i in indices]
            detached = bank_logits.detach()
            finite = member_losses_finite(detached).tolist()
            bank_losses = None
            if logging or not all(finite):
                bank_losses = DenoisingModule.stacked_losses(members, detached, clean)
                finite = torch.isfinite(bank_losses).tolist()
            rows = []
            for row, i in enumerate(indices):
                keep = i in self.active and finite[row]
                if i in self.active and not finite[row]:
                    self.fail(i, MemberDiverged(
                        divergence_message(float(bank_losses[row]), self.global_step)
                        + "; the other members of its fused group went on"))
                rows.append(1.0 if keep else 0.0)
                if keep:
                    trained.append(i)
                    logits[i] = detached[row]
                    if bank_losses is not None:
                        losses[i] = bank_losses[row]
            if any(rows):
                gradients.append((bank_logits, DenoisingModule.stacked_loss_gradient(
                    members, detached, clean, torch.tensor(rows, device=detached.device))))
        if not gradients:
            return None
        if logging:
            self._pending_train_logs = self._training_logs(sorted(trained), logits, losses,
                                                           batch, optimizer.optimizer)
        optimizer.zero_grad()
        # Each bank's logits take their loss gradient as it is (logits.backward(G)),
        # through Lightning's manual_backward (precision plugins, hooks); banks share no
        # parameter, so each member gets its own gradient.
        for bank_logits, gradient in gradients:
            self.manual_backward(bank_logits, gradient)
        optimizer.step()
        return None

    # Metrics go straight to each member's logger, not through self.log: Lightning's
    # result collection moves every logged value on each log call, which costs
    # quadratically in the keys of 36 members. Steps and names are the solo job's.
    def _training_logs(self, order: list[int], logits: dict[int, Tensor],
                       losses: dict[int, Tensor], batch: dict[str, Tensor],
                       optimizer: MemberOptimizers) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for i in order:
            if i in self.active:
                out[i] = {"train/loss": losses[i],
                          "train/accuracy": self.members[i].compute_accuracy(
                              logits[i], batch["clean"]),
                          "train/noise_level": float(batch["eps"]),
                          "lr": optimizer.current_lr(i)}
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pending, self._pending_train_logs = self._pending_train_logs, {}
        for i, values in pending.items():
            self.log_member(i, values)

    def log_member(self, index: int, values: dict[str, Any]) -> None:
        logger = self.logger
        if isinstance(logger, MemberLoggers) and index in self.active:
            logger.log_member(index, {name: float(value) for name, value in values.items()},
                              step=int(self.trainer.fit_loop.epoch_loop._batches_that_stepped),
                              epoch=int(self.current_epoch))

    # -- evaluation (what DenoisingModule logs, per member)
    def _evaluate(self, batch: dict[str, Any], prefix: str) -> None:
        tag = level_tag(float(batch["eps"]))
        targets: dict[Any, tuple[Tensor, Tensor]] = {}  # one per metric scope
        all_logits = self.all_logits(batch["noisy"])
        # Every member's predicted graphs decomposed together, each distinct one once.
        order = list(all_logits)
        vecs, vals = distinct_graph_eigenpairs(torch.cat([predict(all_logits[i])
                                                          for i in order]))
        pred_pairs = dict(zip(order, zip(vecs.split(len(batch["clean"])),
                                         vals.split(len(batch["clean"])), strict=True),
                              strict=True))
        for i, logits in all_logits.items():
            member = self.members[i]
            if member.metric_scope not in targets:
                targets[member.metric_scope] = member.metric_targets(batch["clean"])
            metrics = member.compute_metrics(logits, batch["clean"],
                                             target_pairs=targets[member.metric_scope],
                                             pred_pairs=pred_pairs[i])
            self._eval_outputs.setdefault(i, []).append(metrics)
            self._eval_levels.setdefault(i, {}).update(
                {f"{prefix}_eps{tag}/{name}": value for name, value in metrics.items()})

    def _finish_evaluation(self, prefix: str, with_references: bool = False
                           ) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for i, outputs in self._eval_outputs.items():
            values = dict(self._eval_levels.get(i, {}))
            for name in outputs[0]:
                values[f"{prefix}/{name}"] = torch.stack([o[name] for o in outputs]).mean()
            values = {name: float(value) for name, value in values.items()}
            if with_references:  # the member's own: its metric scope's reference scores
                values.update(self.members[i].references)
            out[i] = values
            self.log_member(i, values)
        self._eval_outputs.clear()
        self._eval_levels.clear()
        return out

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs.clear()
        self._eval_levels.clear()

    def on_validation_epoch_end(self) -> None:
        self.val_metrics = self._finish_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._eval_outputs.clear()
        self._eval_levels.clear()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._finish_evaluation("test", with_references=True)

    def configure_optimizers(self) -> Any:
        optimizers, schedulers = [], []
        for member in self.members:
            configured = member.configure_optimizers()
            if isinstance(configured, dict):
                optimizers.append(configured["optimizer"])
                schedulers.append(configured["lr_scheduler"]["scheduler"])
            else:
                optimizers.append(configured)
                schedulers.append(None)
        return MemberOptimizers(optimizers, schedulers,
                                [m.gradient_clip_val for m in self.members], self.active,
                                on_failure=self.fail)


# --------------------------------------------------------------------------- loggers


class MemberLoggers(Logger):
    """One Lightning logger for the group that hands each member's metrics, under their
    solo names, to that member's own logger (its W&B run or CSV file)."""

    def __init__(self, loggers: Sequence[Any], members: Sequence[DenoisingModule]) -> None:
        super().__init__()
        self.loggers = list(loggers)
        self.members = list(members)

    @property
    def name(self) -> str:
        return "fused"

    @property
    def version(self) -> str:
        return ""

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Each member's logger gets its own module's hyper-parameters, as solo."""
        for logger, member in zip(self.loggers, self.members, strict=True):
            if logger is not None:
                logger.log_hyperparams(member.hparams)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """The group module logs nothing through Lightning (see ``log_member``)."""

    def log_member(self, index: int, metrics: dict[str, float], step: int, epoch: int) -> None:
        """One member's metrics (solo names) to its own logger, at the step and with the
        epoch Lightning's logger connector gives a solo job's."""
        logger = self.loggers[index]
        if logger is not None:
            logger.log_metrics({**metrics, "epoch": epoch}, step=step)
            logger.save()

    def save(self) -> None:
        for logger in self.loggers:
            if logger is not None:
                logger.save()

    def finalize(self, status: str) -> None:
        for logger in self.loggers:
            if logger is not None:
                logger.finalize(status)


# --------------------------------------------------------------------------- checkpoints


def solo_checkpoint_callback(checkpoint_dir: Path) -> ModelCheckpoint:
    """The ModelCheckpoint a solo job configures (train.py), here as a member's state."""
    return ModelCheckpoint(dirpath=str(checkpoint_dir), filename="best", monitor="val/loss",
                           mode="min", save_top_k=1, save_last=True,
                           auto_insert_metric_name=False)


class MemberCheckpoints(Callback):
    """After every validation, each active member's last.ckpt and (when its val/loss
    improved) best.ckpt, in the format of a solo job's checkpoint: a solo job resumes
    from it, and a fused group resumes every member from its own."""

    def __init__(self, members: Sequence[DenoisingModule], dirs: Sequence[Path | None]) -> None:
        self.member_modules = list(members)
        self.callbacks = [None if d is None else solo_checkpoint_callback(d) for d in dirs]

    @property
    def state_key(self) -> str:
        return "MemberCheckpoints"

    def state_dict(self) -> dict[str, Any]:
        return {"members": [None if cb is None else cb.state_dict() for cb in self.callbacks]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for cb, state in zip(self.callbacks, state_dict.get("members", []), strict=False):
            if cb is not None and state is not None:
                cb.load_state_dict(state)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or not self.callbacks:
            return
        optimizer = trainer.optimizers[0]
        optimizer.write_back()  # the stacked banks' state into each member's own
        group = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        for i in sorted(pl_module.active):
            cb = self.callbacks[i]
            if cb is None:
                continue
            value = pl_module.val_metrics.get(i, {}).get("val/loss")
            score = None if value is None else torch.tensor(value)
            directory = Path(str(cb.dirpath))
            directory.mkdir(parents=True, exist_ok=True)
            best = str(directory / "best.ckpt")
            last = str(directory / "last.ckpt")
            improved = score is not None and (cb.best_model_score is None
                                              or float(score) < float(cb.best_model_score))
            if improved:
                cb.best_model_score = score.detach().clone()
                cb.best_model_path = best
                cb.best_k_models = {best: cb.best_model_score}
                cb.kth_best_model_path = best
                cb.kth_value = cb.best_model_score
            cb.current_score = score
            cb.last_model_path = last
            checkpoint = self.member_checkpoint(group, i, optimizer)
            io = trainer.strategy.checkpoint_io
            if improved:
                io.save_checkpoint(checkpoint, best)
            io.save_checkpoint(checkpoint, last)

    def member_checkpoint(self, group: dict[str, Any], index: int, optimizer: Any
                          ) -> dict[str, Any]:
        member = self.member_modules[index]
        state = optimizer.member_state(index)
        cb = self.callbacks[index]
        assert cb is not None
        return {
            **{key: group[key] for key in ("epoch", "global_step", "pytorch-lightning_version",
                                           "loops") if key in group},
            "state_dict": member.state_dict(),
            "optimizer_states": [state["optimizer"]],
            "lr_schedulers": [] if state["scheduler"] is None else [state["scheduler"]],
            "callbacks": {cb.state_key: cb.state_dict()},
            "hparams_name": "kwargs",
            "hyper_parameters": dict(member.hparams),
        }


def group_resume_checkpoint(member_checkpoints: Sequence[dict[str, Any] | None],
                            members: Sequence[DenoisingModule]) -> dict[str, Any]:
    """One group checkpoint from the members' own last.ckpt (all at one step)."""
    first = next(c for c in member_checkpoints if c is not None)
    state_dict: dict[str, Any] = {}
    optimizer_states: list[dict[str, Any] | None] = []
    callbacks: list[dict[str, Any] | None] = []
    for i, (ckpt, member) in enumerate(zip(member_checkpoints, members, strict=True)):
        source = ckpt["state_dict"] if ckpt is not None else member.state_dict()
        state_dict.update({f"members.{i}.{key}": value for key, value in source.items()})
        if ckpt is None:
            optimizer_states.append(None)
            callbacks.append(None)
            continue
        schedulers = ckpt.get("lr_schedulers") or [None]
        optimizer_states.append({"optimizer": ckpt["optimizer_states"][0],
                                 "scheduler": schedulers[0]})
        callbacks.append(next(iter((ckpt.get("callbacks") or {}).values()), None))
    return {
        **{key: first[key] for key in ("epoch", "global_step", "pytorch-lightning_version",
                                       "loops") if key in first},
        "state_dict": state_dict,
        "optimizer_states": [{"members": optimizer_states}],
        "lr_schedulers": [],
        "callbacks": {"MemberCheckpoints": {"members": callbacks}},
    }


class GuardMembers(Callback):
    """The W&B destination guard of every member with a W&B run, before the first step.

    A refused member fails alone (its stray run was finished as failed by the guard).
    """

    def __init__(self, guards: Sequence[Any | None], loggers: Sequence[Any | None]) -> None:
        self.guards = list(guards)
        self.loggers = list(loggers)

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        from tmgg.task.wandb_guard import WandbDestinationError

        for i, (guard, logger) in enumerate(zip(self.guards, self.loggers, strict=True)):
            if guard is None or logger is None or i not in pl_module.active:
                continue
            try:
                guard.check_run(logger.experiment, int(trainer.global_step))
            except WandbDestinationError as error:
                pl_module.fail(i, error)


class FenceMembers(Callback):
    """Stops a member whose job's claim was lost, before each step: ``member.extra
    ["fence"]`` (from the launcher side) raises then. That member fails alone and trains,
    checkpoints and records nothing more; the others go on."""

    def __init__(self, members: Sequence[FusedMember]) -> None:
        self.checks = [member.extra.get("fence") for member in members]

    def _check(self, pl_module: Any) -> None:
        for i, check in enumerate(self.checks):
            if check is None or i not in pl_module.active:
                continue
            try:
                check()
            except Exception as error:  # noqa: BLE001 - this member stops, the others train
                pl_module.fail(i, error)

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._check(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self._check(pl_module)


class PruneMembers(Callback):
    """The pruning channel of a fused group's trial members (``member.extra["trial"]``,
    ``tmgg.jobs.trials.TrialChannel``, set by the launcher side).

    After every validation (and after ``MemberCheckpoints`` wrote this step's
    checkpoints, as a solo job's are written before it stops), each active trial member
    reports its metric; all reports go out before any decision is awaited, so the
    sweeper answers them together. A pruned member leaves the group
    (``FusedDenoisingModule.prune``) and its W&B run is marked pruned.
    """

    def __init__(self, members: Sequence[FusedMember], loggers: Sequence[Any | None]) -> None:
        self.members = list(members)
        self.channels = [member.extra.get("trial") for member in members]
        self.loggers = list(loggers)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        step = int(trainer.global_step)
        reported = []
        for i, channel in enumerate(self.channels):
            if channel is None or i not in pl_module.active:
                continue
            value = pl_module.val_metrics.get(i, {}).get(channel.metric)
            if value is None:
                continue
            channel.report(step, float(value))
            reported.append(i)
        for i in reported:
            if self.channels[i].should_prune(step):
                pl_module.prune(i, step)
                with logging_for(self.members[i]):
                    log.info("%s pruned by its sweeper at step %d; the other members of "
                             "its fused group go on", self.members[i].cfg.job.run_name, step)
                mark_run_pruned(self.loggers[i] if i < len(self.loggers) else None, step)


# --------------------------------------------------------------------------- the group


@dataclass
class FusedMember:
    """One job of a fused group: its composed config, output dir and what became of it."""

    cfg: DictConfig
    output_dir: Path
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def resume_buckets(members: Sequence[FusedMember],
                   on_member_done: Callable[[FusedMember], None] | None = None
                   ) -> list[list[int]]:
    """Members by the step their last.ckpt resumes them from (0 = fresh), lowest first.

    An interrupted group saved every member at the same validations, so normally there
    is one bucket; members that stopped apart (one failed earlier and is re-run) run
    as separate sub-groups, each member from its own checkpoint. A member whose
    last.ckpt cannot be read fails alone, as its solo job would, and is left out.
    """
    buckets: dict[int, list[int]] = {}
    for i, member in enumerate(members):
        trainer_cfg = member.cfg.trainer
        step = 0
        if trainer_cfg.checkpoint and trainer_cfg.resume:
            try:
                last = member.output_dir / CHECKPOINT_DIR / "last.ckpt"
                step = checkpoint_step(str(last) if last.exists() else None)
            except Exception as error:  # noqa: BLE001 - this member fails alone
                member.error = error
                if on_member_done is not None:
                    on_member_done(member)
                continue
        buckets.setdefault(step, []).append(i)
    return [buckets[step] for step in sorted(buckets)]


def run_fused_training(members: Sequence[FusedMember],
                       on_member_done: Callable[[FusedMember], None] | None = None) -> None:
    """Train and test every member; fills each member's ``result`` or ``error``.

    ``on_member_done`` is called as soon as a member is finished or has failed (a
    failing member is reported mid-way, while the others train on).
    """
    for bucket in resume_buckets(members, on_member_done):
        _run_bucket([members[i] for i in bucket], on_member_done)


def _stream_settings(cfg: DictConfig) -> tuple[Any, ...]:
    trainer = cfg.trainer
    return (OmegaConf.to_container(cfg.data, resolve=True), list(cfg.noise.levels),
            int(cfg.seed), int(trainer.max_steps), int(trainer.val_check_interval))


def _run_bucket(members: Sequence[FusedMember],
                on_member_done: Callable[[FusedMember], None] | None) -> None:
    from tmgg.task.loggers import build_logger, finish_leftover_run, package_list_read_once
    from tmgg.task.train import (
        METRICS_FILE,
        _atomic_write_json,
        _launcher_callbacks,
        objective_config,
        set_threads,
        tests_last_weights,
    )
    from tmgg.task.wandb_guard import WandbDestinationGuard

    started = time.perf_counter()
    lead = members[0].cfg
    for member in members:
        validate_job_config(member.cfg)
        if _stream_settings(member.cfg) != _stream_settings(lead):
            raise ValueError(f"job {member.cfg.job.run_name} does not share the batch stream "
                             f"of {lead.job.run_name}: it cannot be fused with it")
        member.output_dir.mkdir(parents=True, exist_ok=True)
    set_threads(lead)
    trainer_cfg = lead.trainer
    L.seed_everything(int(lead.seed), workers=True, verbose=False)
    data = GraphDenoisingData(OmegaConf.to_container(lead.data, resolve=True),
                              list(lead.noise.levels), int(lead.seed), int(trainer_cfg.max_steps))
    data.setup()
    # Each member's weights are drawn from the RNG state its solo job has at that point.
    rng_state = torch.random.get_rng_state()
    modules = []
    for member in members:
        torch.random.set_rng_state(rng_state)
        cfg = member.cfg
        modules.append(DenoisingModule(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
            scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
            max_steps=int(cfg.trainer.max_steps),
            log_every_n_steps=int(cfg.trainer.log_every_n_steps),
            gradient_clip_val=float(cfg.trainer.gradient_clip_val),
            objective=objective_config(cfg)))

    done: set[int] = set()

    def finish_member(index: int, error: BaseException | None) -> None:
        member = members[index]
        member.error = error
        done.add(index)
        logger = loggers[index] if index < len(loggers) else None
        if _is_wandb(logger):
            run = logger.experiment
            try:
                run.finish(exit_code=1 if error is not None else 0)
            except Exception:  # noqa: BLE001 - the member's outcome must still be recorded
                log.exception("could not finish the W&B run of %s", member.cfg.job.run_name)
        if on_member_done is not None:
            on_member_done(member)

    def interrupt_member(index: int) -> None:
        """What a solo job's ``finally`` does when it is preempted: close its W&B run."""
        logger = loggers[index] if index < len(loggers) else None
        if _is_wandb(logger):
            try:
                logger.experiment.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - the preemption goes on
                log.exception("could not finish the W&B run of %s",
                              members[index].cfg.job.run_name)

    logs_to_wandb = any(m.cfg.logger.name == "wandb" for m in members)
    if logs_to_wandb:
        finish_leftover_run()
    loggers: list[Any] = []
    guards: list[Any] = []
    with package_list_read_once() if logs_to_wandb else contextlib.nullcontext():
        for member in members:
            try:
                with logging_for(member):
                    logger = build_logger(member.cfg, member.output_dir, concurrent=True)
            except Exception as error:  # noqa: BLE001 - this member fails alone
                loggers.append(None)
                guards.append(None)
                member.error = error
                continue
            loggers.append(logger)
            guards.append(WandbDestinationGuard.for_job(member.cfg) if _is_wandb(logger)
                          else None)

    module = FusedDenoisingModule(modules, int(trainer_cfg.log_every_n_steps),
                                  on_member_failed=lambda i, e: finish_member(i, e))
    # Reference scores per metric scope (each costs eigendecompositions of the sets).
    references: dict[Any, tuple[dict[str, float], dict[str, float]]] = {}
    for member_module in modules:
        scope = member_module.metric_scope
        if scope not in references:
            references[scope] = (member_module.reference_metrics(data.test_levels, "test"),
                                 member_module.reference_metrics(data.val_levels, "val"))
        member_module.references = references[scope][0]
    for i, member in enumerate(members):
        if member.error is not None:
            module.fail(i, member.error)

    checkpoint_dirs = [m.output_dir / CHECKPOINT_DIR if m.cfg.trainer.checkpoint else None
                       for m in members]
    checkpoints = MemberCheckpoints(modules, checkpoint_dirs)
    workdir = Path(tempfile.mkdtemp(prefix="tmgg-fused-"))
    trainer = L.Trainer(
        max_steps=int(trainer_cfg.max_steps),
        val_check_interval=int(trainer_cfg.val_check_interval),
        check_val_every_n_epoch=None,
        gradient_clip_val=None,
        accelerator=str(trainer_cfg.accelerator),
        devices=trainer_cfg.devices,
        precision=str(trainer_cfg.precision),
        log_every_n_steps=int(trainer_cfg.log_every_n_steps),
        logger=MemberLoggers(loggers, modules),
        # The launcher's own callbacks too (Modal commits its volume after every
        # checkpoint write, the members' included).
        callbacks=[GuardMembers(guards, loggers), FenceMembers(members), checkpoints,
                   PruneMembers(members, loggers),
                   *_launcher_callbacks(lead, members[0].output_dir)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(workdir),
        deterministic=True,
    )
    ckpt_path, resumed_from_step = _resume_path(members, modules, workdir)
    for member in members:  # the line a solo job logs (train.py), so each attempt shows
        log.info("Training %s from step %d (pid %d, fused group of %d)",
                 member.cfg.job.run_name,
                 resumed_from_step, os.getpid(), len(members))
    try:
        if module.active:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that "
                                        "ended before the epoch ended")
                trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        # Pruned members are tested with the others (their weights stopped at the step).
        module.active.update(module.pruned)
        # Test each member at its best checkpoint, as the solo job does.
        for i in sorted(module.active):
            cb = checkpoints.callbacks[i]
            if cb is not None and cb.best_model_path and not tests_last_weights(members[i].cfg):
                state = torch.load(cb.best_model_path, map_location="cpu", weights_only=True)
                modules[i].load_state_dict(state["state_dict"])
        validated = dict(module.val_metrics)  # the last validation's, as solo reports
        if module.active:
            trainer.test(module, datamodule=data, verbose=False)
        for i in sorted(module.active):
            member = members[i]
            metrics = dict(module.test_metrics.get(i, {}))
            metrics.update(module.pruned_validation.get(i) or validated.get(i, {}))
            metrics.update(references[modules[i].metric_scope][1])
            result: dict[str, Any] = {
                "job_id": str(member.cfg.job.id),
                "run_name": str(member.cfg.job.run_name),
                **dict(sorted(metrics.items())),
                "global_step": module.pruned.get(i, int(trainer.global_step)),
                "resumed_from_step": resumed_from_step,
                "train_seconds": round(time.perf_counter() - started, 3),
                "fused_members": len(members),
            }
            if i in module.pruned:  # recorded PRUNED with its step (tmgg.jobs.sweep)
                result[PRUNED_AT_KEY] = module.pruned[i]
            logger = loggers[i]
            if _is_wandb(logger):
                run = logger.experiment
                result["wandb_path"] = f"{run.entity}/{run.project}/{run.id}"
            _atomic_write_json(member.output_dir / METRICS_FILE, result)
            member.result = result
            finish_member(i, None)
    except BaseException as error:
        # Preemption (SystemExit, KeyboardInterrupt) is no outcome: each unfinished
        # member is left as a preempted solo job is, its W&B run closed, no record of an
        # end, its checkpoints in place for the resume.
        preempted = not isinstance(error, Exception)
        for i in range(len(members)):
            if i not in done:
                if preempted:
                    interrupt_member(i)
                else:
                    finish_member(i, error)
        if preempted:
            raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _is_wandb(logger: Any) -> bool:
    return logger is not None and logger.__class__.__name__ == "WandbLogger"


def _resume_path(members: Sequence[FusedMember], modules: Sequence[DenoisingModule],
                 workdir: Path) -> tuple[str | None, int]:
    """A group checkpoint built from the members' last.ckpt (one bucket: one step)."""
    checkpoints: list[dict[str, Any] | None] = []
    for member in members:
        path = member.output_dir / "checkpoints" / "last.ckpt"
        resumable = member.cfg.trainer.checkpoint and member.cfg.trainer.resume
        checkpoints.append(torch.load(path, map_location="cpu", weights_only=True)
                           if resumable and path.exists() else None)
    if all(c is None for c in checkpoints):
        return None, 0
    group = group_resume_checkpoint(checkpoints, modules)
    path = workdir / "group-resume.ckpt"
    torch.save(group, path)
    log.info("Resuming a fused group of %d from step %d", len(members), group["global_step"])
    return str(path), int(group["global_step"])
