"""Learning-rate schedules, stepped once per optimizer step and saved as plain data in checkpoints: ours,
``warmup_plateau``, and diffusers' ``get_scheduler`` ones. Both kinds take ``step()`` after each optimizer
step and ``report(val_loss)`` after each validation."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

DIFFUSERS_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
LR_SCHEDULES = ("warmup_plateau", *DIFFUSERS_SCHEDULES)


class WarmupPlateauLR:
    """Linear warm-up over ``warmup_steps``, then torch's ReduceLROnPlateau on the validation loss (``factor``,
    ``patience``, relative ``threshold``, ``min_lr``). Validations during the warm-up are not reported to it."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, factor: float, patience: int,
                 threshold: float, min_lr: float):
        self.optimizer, self.warmup_steps, self.steps = optimizer, warmup_steps, 0
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=factor, patience=patience,
                                                                  threshold=threshold, min_lr=min_lr)
        self._warm_up()

    def _warm_up(self) -> None:
        if self.steps <= self.warmup_steps and self.warmup_steps > 0:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * self.steps / self.warmup_steps

    def step(self) -> None:
        self.steps += 1
        self._warm_up()

    def report(self, val_loss: float) -> bool:
        """Takes a validation loss; returns True when it cut the learning rate."""
        if self.steps < self.warmup_steps:
            return False
        before = self.get_last_lr()
        self.plateau.step(val_loss)
        return self.get_last_lr() != before

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps": self.steps, "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict) -> None:  # the LR itself comes back with the optimizer's state
        self.steps = state["steps"]
        self.plateau.load_state_dict(state["plateau"])
        self._warm_up()


class DiffusersLR:
    """A diffusers ``get_scheduler`` schedule (a LambdaLR); validation losses do not change it."""

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
        self.inner = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
        self.step, self.get_last_lr = self.inner.step, self.inner.get_last_lr

    def report(self, val_loss: float) -> bool:
        return False

    def state_dict(self) -> dict:  # plain numbers: the lambdas are functions, which LambdaLR stores as None
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
