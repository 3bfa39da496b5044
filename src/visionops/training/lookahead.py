"""Lookahead with an EMA of the weights, as airbench uses it.

Every `every` steps after `start` of training, the EMA moves toward the live weights with a decay
that grows over training, and the live weights are reset to the EMA: training moves fast early
and averages strongly at the end. BatchNorm running statistics are averaged too.
"""

from __future__ import annotations

import torch
from torch import nn


class Lookahead:
    def __init__(self, model: nn.Module, total_steps: int, start: float = 0.3, every: int = 5, decay: float = 0.95, power: float = 3.0):
        self.model, self.total_steps = model, total_steps
        self.start_step, self.every = int(start * total_steps), every
        self.base_rho, self.power = decay**every, power
        self.ema: list[torch.Tensor] | None = None

    def _floats(self) -> list[torch.Tensor]:
        return [t for t in self.model.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Call after optimizer step number `step` (1-based)."""
        if step < self.start_step or step % self.every:
            return
        live = self._floats()
        if self.ema is None:
            self.ema = [t.detach().clone() for t in live]
            return
        rho = self.base_rho * (step / self.total_steps) ** self.power
        torch._foreach_lerp_(self.ema, live, 1 - rho)
        torch._foreach_copy_(live, self.ema)

    def resume(self, step: int) -> None:
        """After loading a checkpoint taken at an epoch end (where live == EMA), restore the EMA."""
        first = max(self.every, -(-self.start_step // self.every) * self.every)
        if step >= first:
            self.ema = [t.detach().clone() for t in self._floats()]

    @torch.no_grad()
    def sync(self) -> None:
        """Reset the live weights to the EMA (airbench does this at the end of every epoch)."""
        if self.ema is not None:
            torch._foreach_copy_(self._floats(), self.ema)
