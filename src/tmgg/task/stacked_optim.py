"""The optimiser step of many same-shaped models at once: stacked parameters, one update.

A fused group's members of one architecture and k (a *bank*) keep their parameters
stacked on a leading member dim for the whole of training, so a training step is one
batched forward, one backward and one optimiser update for the bank, not one per
member. Each member keeps its own hyper-parameters: learning rate and schedule,
weight decay, betas, eps and gradient clipping enter the update as per-member values
broadcast over the member dim.

The arithmetic is that of a solo job's step, in the solo order and with the same
floating-point operations where torch offers them (the per-member scalars are
computed in double precision, as ``torch.optim.AdamW`` computes its Python floats,
then applied as float32 tensors): the clipped gradient norm of
``torch.nn.utils.clip_grad_norm_``, then the non-foreach single-tensor Adam/AdamW
update of ``torch.optim``. Only reductions (a member's gradient norm) may round
differently, as a reassociation.

The members' own ``torch.optim`` optimisers and ``LambdaLR`` schedules stay the
source of truth between banks and checkpoints: a bank starts from their state
(fresh or restored from a checkpoint) and ``write_back`` puts its state into them
before a checkpoint is written or training ends, in the exact format a solo job's
optimiser and scheduler have after the same number of steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

#: The schedule of one member: step number (steps already taken) -> learning rate.
LrSchedule = Callable[[int], float]


def stackable_optimizer(optimizer: torch.optim.Optimizer, scheduler: Any | None) -> bool:
    """Whether the stacked update reproduces this member's optimiser and schedule.

    Adam and AdamW without amsgrad, maximize or a tensor learning rate, one parameter
    group, and no schedule or a per-step ``LambdaLR`` (the cosine warm-up of
    ``tmgg.task.optim``). Anything else trains through its own optimiser (still in
    the group, just not stacked).
    """
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    if len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    if group.get("amsgrad") or group.get("maximize") or isinstance(group["lr"], Tensor):
        return False
    return scheduler is None or type(scheduler) is torch.optim.lr_scheduler.LambdaLR


def _lr_schedule(optimizer: torch.optim.Optimizer, scheduler: Any | None) -> LrSchedule:
    if scheduler is None:
        lr = float(optimizer.param_groups[0]["lr"])
        return lambda step: lr
    base_lr = float(scheduler.base_lrs[0])
    factor = scheduler.lr_lambdas[0]
    return lambda step: base_lr * factor(step)


class StackedBank:
    """One bank of a fused group: members of one architecture and k, trained stacked.

    ``params`` are leaf tensors of shape (M, *parameter shape) that the group's forward
    uses directly; their ``.grad`` is each member's gradient in its row.
    """

    def __init__(self, indices: Sequence[int], models: Sequence[nn.Module],
                 optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[Any | None],
                 clip_values: Sequence[float]) -> None:
        self.indices = list(indices)
        self.models = list(models)
        self.optimizers = list(optimizers)
        self.schedulers = list(schedulers)
        self.names = [name for name, _ in self.models[0].named_parameters()]
        members = [dict(m.named_parameters()) for m in self.models]
        self.params: dict[str, Tensor] = {
            name: torch.stack([p[name].detach() for p in members]).requires_grad_(True)
            for name in self.names}
        steps = {self._member_step(j) for j in range(len(self.models))}
        if len(steps) != 1:
            raise ValueError(f"bank members are at different steps {sorted(steps)}: "
                             "they cannot be stacked")
        self.step = steps.pop()
        self.exp_avg = {name: self._stacked_state(name, "exp_avg") for name in self.names}
        self.exp_avg_sq = {name: self._stacked_state(name, "exp_avg_sq") for name in self.names}
        groups = [opt.param_groups[0] for opt in self.optimizers]
        self.decoupled = [isinstance(opt, torch.optim.AdamW) for opt in self.optimizers]
        self.weight_decay = [float(g["weight_decay"]) for g in groups]
        self.beta1 = [float(g["betas"][0]) for g in groups]
        self.beta2 = [float(g["betas"][1]) for g in groups]
        self.eps = [float(g["eps"]) for g in groups]
        self.clip = [float(c) for c in clip_values]
        self.schedules = [_lr_schedule(o, s) for o, s in zip(self.optimizers, self.schedulers,
                                                                strict=True)]
        dtype = next(iter(self.params.values())).dtype
        self._clip_rows = torch.tensor([c > 0 for c in self.clip])
        self._clip_max = torch.tensor([c if c > 0 else 1.0 for c in self.clip], dtype=dtype)

    # -- state in and out of the members' own optimisers
    def _member_step(self, j: int) -> int:
        state = self.optimizers[j].state
        steps = {int(state[p]["step"]) for p in self.models[j].parameters() if p in state}
        if len(steps) > 1:
            raise ValueError(f"member {self.indices[j]} has parameters at different steps")
        return steps.pop() if steps else 0

    def _stacked_state(self, name: str, key: str) -> Tensor:
        rows = []
        for model, optimizer in zip(self.models, self.optimizers, strict=True):
            param = model.get_parameter(name)
            state = optimizer.state.get(param, {})
            rows.append(state[key].detach() if key in state else torch.zeros_like(param))
        return torch.stack(rows)

    def lr(self, row: int, step: int | None = None) -> float:
        """The learning rate member ``row`` uses at ``step`` (default: its next step)."""
        return self.schedules[row](self.step if step is None else step)

    @torch.no_grad()
    def write_back(self, rows: Sequence[int] | None = None) -> None:
        """Put the bank's state into the members' modules, optimisers and schedules, as
        a solo job's look after ``self.step`` steps."""
        for j in range(len(self.models)) if rows is None else rows:
            optimizer = self.optimizers[j]
            for name in self.names:
                param = self.models[j].get_parameter(name)
                param.copy_(self.params[name][j])
                if self.step > 0:
                    optimizer.state[param] = {
                        "step": torch.tensor(float(self.step), dtype=torch.float32),
                        "exp_avg": self.exp_avg[name][j].clone(),
                        "exp_avg_sq": self.exp_avg_sq[name][j].clone(),
                    }
            lr = self.lr(j)
            optimizer.param_groups[0]["lr"] = lr
            scheduler = self.schedulers[j]
            if scheduler is not None:
                scheduler.last_epoch = self.step
                scheduler._step_count = self.step + 1
                scheduler._last_lr = [lr]

    # -- the step
    def zero_grad(self) -> None:
        for param in self.params.values():
            param.grad = None

    def _column(self, values: Sequence[float], like: Tensor) -> Tensor:
        """Per-member values as an (M, 1, ..., 1) tensor broadcasting over ``like``."""
        shape = (len(values),) + (1,) * (like.dim() - 1)
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)

    @torch.no_grad()
    def clip_gradients(self) -> None:
        """Each clipping member's gradient scaled as ``clip_grad_norm_`` scales it."""
        if not bool(self._clip_rows.any()):
            return
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in grads],
                            dim=1)
        total = torch.linalg.vector_norm(norms, 2, dim=1)  # (M,)
        # clip_grad_norm_'s max_norm / (total + 1e-6) is reciprocal-times-scalar in torch.
        coef = torch.clamp(torch.reciprocal(total + 1e-6) * self._clip_max, max=1.0)
        coef = torch.where(self._clip_rows, coef, torch.ones_like(coef))
        for g in grads:
            g.mul_(coef.view((-1,) + (1,) * (g.dim() - 1)))

    @torch.no_grad()
    def optimizer_step(self) -> None:
        """One Adam/AdamW step of every member, each with its own hyper-parameters."""
        self.step += 1
        step = self.step
        lrs = [self.lr(j, step - 1) for j in range(len(self.models))]
        decay = [1 - lr * wd if dec else 1.0
                 for lr, wd, dec in zip(lrs, self.weight_decay, self.decoupled, strict=True)]
        l2 = [0.0 if dec else wd for wd, dec in zip(self.weight_decay, self.decoupled,
                                                     strict=True)]
        neg_step = [-(lr / (1 - b1 ** step)) for lr, b1 in zip(lrs, self.beta1, strict=True)]
        bc2_sqrt = [(1 - b2 ** step) ** 0.5 for b2 in self.beta2]
        uniform_b2 = len(set(self.beta2)) == 1
        for name in self.names:
            param = self.params[name]
            grad = param.grad
            if grad is None:
                continue
            if any(l2):
                grad = grad.add(param * self._column(l2, param))
            if any(d != 1.0 for d in decay):
                param.mul_(self._column(decay, param))
            exp_avg, exp_avg_sq = self.exp_avg[name], self.exp_avg_sq[name]
            exp_avg.lerp_(grad, self._column([1 - b for b in self.beta1], param))
            # Scalars where the members agree (the usual case): torch's scalar ops then
            # round exactly as the solo optimiser's do.
            if uniform_b2:
                exp_avg_sq.mul_(self.beta2[0]).addcmul_(grad, grad, value=1 - self.beta2[0])
                denom = (exp_avg_sq.sqrt() / bc2_sqrt[0])
            else:
                exp_avg_sq.mul_(self._column(self.beta2, param)).add_(
                    self._column([1 - b for b in self.beta2], param) * grad * grad)
                denom = exp_avg_sq.sqrt() / self._column(bc2_sqrt, param)
            denom.add_(self.eps[0] if len(set(self.eps)) == 1 else self._column(self.eps, param))
            # addcdiv_(exp_avg, denom, value=-step_size) is param + (value * exp_avg) / denom.
            param.add_(exp_avg * self._column(neg_step, param) / denom)
