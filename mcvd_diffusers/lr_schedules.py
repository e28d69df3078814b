"""Learning-rate schedules, stepped once per optimizer step and saved as plain data in checkpoints.

``warmup_plateau`` is the reproduction's strategy done right: a linear warm-up to the base LR,
then ReduceLROnPlateau on the validation loss. Every other name is a diffusers schedule from
``get_scheduler``. The training loop calls ``step()`` after each optimizer step and
``report(val_loss)`` after each validation; both kinds accept both calls.
"""

from __future__ import annotations

import math

import torch
from diffusers.optimization import get_scheduler

DIFFUSERS_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LR_SCHEDULES = ("warmup_plateau", *DIFFUSERS_SCHEDULES)


class WarmupPlateauLR:
    """Linear warm-up over ``warmup_steps``, then the LR is multiplied by ``factor`` whenever the
    validation loss has not improved by a relative ``threshold`` for more than ``patience``
    validations in a row, never going below ``min_lr`` (torch's ReduceLROnPlateau rule, mode
    "min", threshold mode "rel")."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, factor: float, patience: int,
                 threshold: float, min_lr: float):
        if not 0 < factor < 1:
            raise ValueError(f"plateau factor must be in (0, 1), got {factor}")
        self.optimizer = optimizer
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.warmup_steps, self.factor, self.patience = warmup_steps, factor, patience
        self.threshold, self.min_lr = threshold, min_lr
        self.steps, self.scale, self.best, self.num_bad = 0, 1.0, math.inf, 0
        self._apply()

    def _apply(self) -> None:
        warmup = min(1.0, self.steps / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.scale * warmup

    def step(self) -> None:
        self.steps += 1
        self._apply()

    def report(self, val_loss: float) -> bool:
        """Takes a validation loss; returns True when it cut the learning rate."""
        if val_loss < self.best * (1 - self.threshold):
            self.best, self.num_bad = val_loss, 0
            return False
        self.num_bad += 1
        if self.num_bad <= self.patience:
            return False
        self.num_bad = 0
        floor = min(self.min_lr / base for base in self.base_lrs)
        if self.scale <= floor:
            return False
        self.scale = max(self.scale * self.factor, floor)
        self._apply()
        return True

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "scale": self.scale, "best": self.best, "num_bad": self.num_bad}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.scale, self.best, self.num_bad = state["steps"], state["scale"], state["best"], state["num_bad"]
        self._apply()


class DiffusersLR:
    """A diffusers ``get_scheduler`` schedule; validation losses do not change it."""

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
        self.inner = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)

    def step(self) -> None:
        self.inner.step()

    def report(self, val_loss: float) -> bool:
        return False

    def get_last_lr(self) -> list[float]:
        return self.inner.get_last_lr()

    def state_dict(self) -> dict:
        # LambdaLR's state holds plain numbers (its lambdas are functions, stored as None).
        return {k: v for k, v in self.inner.state_dict().items() if k != "lr_lambdas"}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict({**state, "lr_lambdas": [None] * len(self.inner.lr_lambdas)})


def make_lr_schedule(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                     factor: float = 0.5, patience: int = 3, threshold: float = 0.01, min_lr: float = 1e-6):
    if name == "warmup_plateau":
        return WarmupPlateauLR(optimizer, warmup_steps, factor, patience, threshold, min_lr)
    if name in DIFFUSERS_SCHEDULES:
        return DiffusersLR(name, optimizer, warmup_steps, total_steps)
    raise ValueError(f"unknown lr_scheduler {name!r}; choose one of {LR_SCHEDULES}")
