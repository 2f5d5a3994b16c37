"""Optimisers and the learning-rate schedule of SPEC.md section 5."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """Every configured option reaches the optimiser (amsgrad included)."""
    name = cfg["name"]
    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return cls(
            params,
            lr=float(cfg["lr"]),
            weight_decay=float(cfg["weight_decay"]),
            betas=tuple(float(b) for b in cfg.get("betas", (0.9, 0.999))),
            eps=float(cfg.get("eps", 1e-8)),
            amsgrad=bool(cfg.get("amsgrad", False)),
        )
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=float(cfg["lr"]),
            weight_decay=float(cfg["weight_decay"]),
            momentum=float(cfg.get("momentum", 0.0)),
            nesterov=bool(cfg.get("nesterov", False)),
        )
    raise ValueError(f"optimizer.name: unknown optimiser {name!r}")


def cosine_warmup_factor(
    step: int, max_steps: int, warmup_fraction: float, decay_end_fraction: float
) -> float:
    """Linear warm-up to 1 over warmup_fraction of max_steps, cosine to 0 at decay_end."""
    warmup_steps = max(1, round(warmup_fraction * max_steps))
    decay_end = max(warmup_steps + 1, round(decay_end_fraction * max_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_end:
        return 0.0
    progress = (step - warmup_steps) / (decay_end - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], max_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    name = cfg["name"]
    if name == "none":
        return None
    if name == "cosine_warmup":
        warmup = float(cfg["warmup_fraction"])
        decay_end = float(cfg["decay_end_fraction"])
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_warmup_factor(step, max_steps, warmup, decay_end)
        )
    raise ValueError(f"scheduler.name: unknown scheduler {name!r}")
