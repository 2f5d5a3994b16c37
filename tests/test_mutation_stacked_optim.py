"""The stacked optimiser step (tmgg.task.stacked_optim) against each member's own solo
``torch.optim`` step, pinned down where mutation testing found it unexamined (issue 25):
Adam and AdamW, with and without a schedule, equal and differing betas and eps, a bank
started from restored optimiser state, and what ``write_back`` leaves for a checkpoint.

A fused job's science rests on this: each member must train as it would alone.
Fast and in-process (tiny models, a few steps): part of ``make mutate``'s selection.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch.func import functional_call

from tmgg.task.stacked_optim import StackedBank, stackable_optimizer

STEPS = 4


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 3) * 0.5 * (1 + math.cos(math.pi * step / 10))


def template() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def optimiser(model: torch.nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if spec.get("adamw", True) else torch.optim.Adam
    return kind(model.parameters(), lr=spec.get("lr", 0.05), betas=spec.get("betas", (0.9, 0.99)),
                eps=spec.get("eps", 1e-8), weight_decay=spec.get("wd", 0.0))


def batches(members: int, steps: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(steps, members, 8, 4, generator=torch.Generator().manual_seed(seed)) * 3


def loss(output: torch.Tensor) -> torch.Tensor:
    return (output ** 2).mean() * 10


def solo_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
              batch: torch.Tensor, clip: float) -> None:
    optimizer.zero_grad()
    loss(model(batch)).backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def compare(specs: list[dict[str, Any]], scheduled: bool, warm_steps: int = 0,
            dtype: torch.dtype = torch.float32, tolerance: float = 1e-5) -> StackedBank:
    """Train each member solo and in one bank for STEPS steps (after ``warm_steps`` solo
    steps both start from) and assert the same parameters, optimiser state and lr."""
    base = template().to(dtype)
    data = batches(len(specs), warm_steps + STEPS).to(dtype)
    members = []
    for spec in specs:
        model = copy.deepcopy(base)
        opt = optimiser(model, spec)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup) if scheduled else None
        members.append((model, opt, sched))
    for step in range(warm_steps):  # a bank restored mid-training
        for j, (model, opt, sched) in enumerate(members):
            solo_step(model, opt, sched, data[step, j], specs[j].get("clip", 0.0))
    stacked = copy.deepcopy(members)
    for step in range(warm_steps, warm_steps + STEPS):
        for j, (model, opt, sched) in enumerate(members):
            solo_step(model, opt, sched, data[step, j], specs[j].get("clip", 0.0))
    models = [m for m, _, _ in stacked]
    bank = StackedBank(list(range(len(specs))), models, [o for _, o, _ in stacked],
                       [s for _, _, s in stacked], [spec.get("clip", 0.0) for spec in specs])
    assert bank.step == warm_steps
    for step in range(warm_steps, warm_steps + STEPS):
        bank.zero_grad()
        total = sum(loss(functional_call(base, {n: bank.params[n][j] for n in bank.names},
                                         (data[step, j],))) for j in range(len(specs)))
        total.backward()
        bank.clip_gradients()
        bank.optimizer_step()
    assert bank.step == warm_steps + STEPS
    bank.write_back()
    for j, ((solo, solo_opt, solo_sched), (model, opt, sched)) in enumerate(
            zip(members, stacked, strict=True)):
        for (name, want), got in zip(solo.named_parameters(), model.parameters(), strict=True):
            assert got.dtype == dtype
            assert float((want - got).detach().abs().max()) < tolerance, (j, name)
            mine, theirs = opt.state[got], solo_opt.state[want]
            assert float(mine["step"]) == float(theirs["step"]) == warm_steps + STEPS
            for key in ("exp_avg", "exp_avg_sq"):
                assert float((mine[key] - theirs[key]).abs().max()) < tolerance / 10, \
                    (j, name, key)
        assert opt.param_groups[0]["lr"] == pytest.approx(solo_opt.param_groups[0]["lr"])
        if sched is not None:
            assert sched.last_epoch == solo_sched.last_epoch
            assert sched._step_count == solo_sched._step_count
            assert sched.get_last_lr() == pytest.approx(solo_sched.get_last_lr())
            assert bank.lr(j) == pytest.approx(solo_opt.param_groups[0]["lr"])
    return bank


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant-lr", "lambda-lr"])
def test_members_with_their_own_settings_train_as_alone(scheduled: bool) -> None:
    compare([{"wd": 0.0, "clip": 0.0},
             {"wd": 0.1, "clip": 0.5, "lr": 0.02},
             {"wd": 0.3, "clip": 3.0, "betas": (0.8, 0.95), "eps": 1e-6},
             {"wd": 0.05, "adamw": False, "betas": (0.85, 0.9)}], scheduled)


def test_members_that_agree_on_betas_and_eps_and_plain_adam_with_l2() -> None:
    compare([{"adamw": False, "wd": 0.2, "clip": 1.0}, {"adamw": False, "wd": 0.0}],
            scheduled=True)
    compare([{"wd": 0.0}, {"wd": 0.0, "lr": 0.1}], scheduled=False)


def test_a_bank_started_from_restored_optimiser_state_continues_each_member() -> None:
    compare([{"wd": 0.1, "clip": 0.5}, {"wd": 0.0, "betas": (0.7, 0.9)}], scheduled=True,
            warm_steps=2)


def test_a_double_precision_bank_steps_in_double_precision() -> None:
    """An fp64 stage's members: the per-member scalars are applied as float64 tensors, so
    the bank matches its solo runs to double precision, not to float32's."""
    # 0.3: a clip bound that float32 cannot hold exactly.
    compare([{"wd": 0.1, "clip": 0.3, "betas": (0.8, 0.95)}, {"wd": 0.0, "lr": 0.02}],
            scheduled=True, dtype=torch.float64, tolerance=1e-12)


def test_each_member_needs_its_own_optimiser() -> None:
    base = template()
    models = [copy.deepcopy(base) for _ in range(2)]
    optimizers = [optimiser(m, {}) for m in [*models, copy.deepcopy(base)]]
    with pytest.raises(ValueError):
        StackedBank([0, 1], models, optimizers, [None, None, None], [0.0, 0.0])
    with pytest.raises(ValueError):  # and its own schedule (None: a constant rate)
        StackedBank([0, 1], models, optimizers[:2], [None], [0.0, 0.0])


def test_write_back_of_a_fresh_bank_leaves_no_optimiser_state() -> None:
    base = template()
    models = [copy.deepcopy(base) for _ in range(2)]
    optimizers = [optimiser(m, {"lr": 0.05}) for m in models]
    bank = StackedBank([4, 7], models, optimizers, [None, None], [0.0, 0.0])
    assert bank.indices == [4, 7] and bank.lr(0) == 0.05 and bank.lr(1, step=9) == 0.05
    bank.write_back(rows=[1])
    assert optimizers[1].state == {} and optimizers[1].param_groups[0]["lr"] == 0.05
    # Gradients are cleared, and a bank without clipping leaves the gradients alone.
    for param in bank.params.values():
        param.grad = torch.ones_like(param)
    bank.clip_gradients()
    assert all(bool((p.grad == 1).all()) for p in bank.params.values())
    bank.zero_grad()
    assert all(p.grad is None for p in bank.params.values())


def test_members_at_different_steps_cannot_be_stacked() -> None:
    base = template()
    models = [copy.deepcopy(base) for _ in range(2)]
    optimizers = [optimiser(m, {}) for m in models]
    solo_step(models[0], optimizers[0], None, batches(1, 1)[0, 0], 0.0)
    with pytest.raises(ValueError) as refused:
        StackedBank([0, 1], models, optimizers, [None, None], [0.0, 0.0])
    assert str(refused.value) == (
        "bank members are at different steps [0, 1]: they cannot be stacked")
    odd = copy.deepcopy(base)
    odd_optimiser = optimiser(odd, {})
    solo_step(odd, odd_optimiser, None, batches(1, 1)[0, 0], 0.0)
    first = next(odd.parameters())
    odd_optimiser.state[first]["step"] = torch.tensor(5.0)
    with pytest.raises(ValueError, match="member 3 has parameters at different steps"):
        StackedBank([3], [odd], [odd_optimiser], [None], [0.0])


def test_only_plain_adam_and_adamw_with_a_lambda_schedule_stack() -> None:
    model = template()

    def adam(**kwargs: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=0.01, **kwargs)

    assert stackable_optimizer(adam(), None)
    assert stackable_optimizer(torch.optim.AdamW(model.parameters()), None)
    assert not stackable_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), None)
    assert not stackable_optimizer(adam(amsgrad=True), None)
    assert not stackable_optimizer(adam(maximize=True), None)
    assert not stackable_optimizer(torch.optim.Adam(model.parameters(),
                                                    lr=torch.tensor(0.01)), None)
    two_groups = torch.optim.Adam([{"params": model[0].parameters()},
                                   {"params": model[2].parameters()}], lr=0.01)
    assert not stackable_optimizer(two_groups, None)
    plain = adam()
    assert stackable_optimizer(plain, torch.optim.lr_scheduler.LambdaLR(plain, warmup))
    stepped = adam()
    assert not stackable_optimizer(stepped, torch.optim.lr_scheduler.StepLR(stepped, 2))
