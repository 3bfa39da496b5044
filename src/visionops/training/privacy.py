"""DP-SGD for the training loop (Opacus): per-image clipping, Gaussian noise, Poisson sampling, an (ε, δ) budget.

Each step takes every train image independently with probability q = batch_size / N (Poisson sampling, which
the accountant's amplification-by-sampling bound assumes), clips each image's gradient to `max_grad_norm`,
adds Gaussian noise of `noise_multiplier * max_grad_norm` and divides by the expected batch size. The noise
multiplier is the smallest that keeps `train.epochs` epochs of ceil(N / batch_size) steps within
`target_epsilon` at `delta`; before each epoch the loop asks whether one more would still fit, and stops
when it would not. Batch norm mixes images within a batch, so models are converted to group norm first
(Opacus's `ModuleValidator.fix`); the model file records it, so loading rebuilds the same layers.
The guarantee covers the train split: val (model selection, the temperature) and test are treated as public.
The noise comes from torch's seeded generator (checkpointed, so a resumed run is exact), not from a
cryptographically secure one (Opacus's `secure_mode`): fine for research and audits, not for a deployment
facing an attacker who could predict the generator.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from visionops.config import PrivacyConfig, TrainConfig
from visionops.errors import InvalidInputError


class PrivacySettingsError(InvalidInputError):
    """A training setting that DP-SGD cannot account for; the message names it."""


def default_delta(n: int) -> float:
    """The largest power of ten at most 1 / n (n train images): 1e-5 for CIFAR-10's 40,053."""
    return 10.0 ** -math.ceil(math.log10(max(n, 1)))


def group_norm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """(`model`, or a copy with every batch norm replaced by group norm, the names of the layers replaced).

    In-place activations are turned off: Opacus's backward hooks refuse an output modified in place.
    """
    from opacus.validators import ModuleValidator

    replaced = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if replaced:
        model = ModuleValidator.fix(model)
        print(f"train: DP-SGD: {len(replaced)} batch norm layers trained as group norm (Opacus ModuleValidator.fix)",
              file=sys.stderr)
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacySettingsError(f"train.privacy: Opacus cannot train this model privately: {errors[0]}")
    return model, replaced


def check_settings(cfg: TrainConfig, model: nn.Module, device: torch.device, world_size: int) -> None:
    """Refuse, in one line naming the setting, what DP-SGD here cannot account for."""
    if world_size > 1:
        raise PrivacySettingsError("train.privacy: DP-SGD runs in one process; launch the stage without torchrun")
    if cfg.amp == "cuda" and device.type == "cuda":
        raise PrivacySettingsError("train.amp: bf16 autocast cannot be used with train.privacy.enabled (Opacus clips "
                                   "per-image gradients in float32); set train.amp to false")
    if any(hasattr(m, "init_from_data") for m in model.modules()):
        raise PrivacySettingsError(f"train.model: {cfg.model} initialises layers from the training images' statistics, "
                                   "which DP-SGD does not account for; pick another model with train.privacy.enabled")


class DPSGD:
    """One private training run's sampler, optimizer wrapper and accountant."""

    def __init__(self, cfg: PrivacyConfig, n: int, batch_size: int, epochs: int, noise_multiplier: float | None = None):
        from opacus.accountants import create_accountant
        from opacus.accountants.utils import get_noise_multiplier

        self.cfg, self.n = cfg, n
        self.delta = cfg.delta if cfg.delta is not None else default_delta(n)
        self.sample_rate = min(batch_size / n, 1.0)
        self.steps_per_epoch = max(math.ceil(n / batch_size), 1)
        self.noise_multiplier = noise_multiplier or get_noise_multiplier(
            target_epsilon=cfg.target_epsilon, target_delta=self.delta, sample_rate=self.sample_rate,
            steps=epochs * self.steps_per_epoch, accountant=cfg.accountant,
        )  # fmt: skip
        self.accountant = create_accountant(cfg.accountant)

    def wrap(self, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(the model with per-image gradient hooks, the optimizer that clips, noises and counts every step);
        the noise draws from `gen`, which checkpoints save, so a resumed run continues the same noise."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        dp_opt = DPOptimizer(opt, noise_multiplier=self.noise_multiplier, max_grad_norm=self.cfg.max_grad_norm,
                             expected_batch_size=max(round(self.sample_rate * self.n), 1), generator=gen)
        dp_opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(self.sample_rate))
        return GradSampleModule(model), dp_opt

    def batches(self, gen: torch.Generator, device: torch.device):
        """One epoch's Poisson-sampled index batches (an image is in a batch with probability q, independently)."""
        for _ in range(self.steps_per_epoch):
            keep = torch.rand(self.n, generator=gen, device=gen.device) < self.sample_rate
            yield keep.nonzero().squeeze(1).to(device)

    def epsilon(self, history: list | None = None) -> float:
        """ε spent so far at δ (or after `history`, a list of (noise multiplier, sample rate, steps))."""
        from opacus.accountants import create_accountant

        acc = create_accountant(self.cfg.accountant)
        acc.history = list(self.accountant.history if history is None else history)
        return float(acc.get_epsilon(delta=self.delta)) if acc.history else 0.0

    def next_epoch_fits(self) -> bool:
        """Whether one more epoch keeps ε within the target; says so on stderr when it does not."""
        after = self.epsilon([*self.accountant.history, (self.noise_multiplier, self.sample_rate, self.steps_per_epoch)])
        if after <= self.cfg.target_epsilon:
            return True
        print(f"train: privacy budget reached: another epoch would spend ε = {after:.3f} > target_epsilon "
              f"{self.cfg.target_epsilon:g} (spent {self.epsilon():.3f}); stopping", file=sys.stderr)
        return False

    def record(self, group_norm_layers: list[str]) -> dict:
        """What the model file, the reports and the registry keep of the run's privacy."""
        steps = sum(s for _, _, s in self.accountant.history)
        return {
            "epsilon": self.epsilon(), "delta": self.delta, "target_epsilon": self.cfg.target_epsilon,
            "accountant": self.cfg.accountant, "max_grad_norm": self.cfg.max_grad_norm,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": steps,
            "train_images": self.n, "group_norm": group_norm_layers,
        }  # fmt: skip


def unwrap(model: nn.Module) -> None:
    """Remove the per-image gradient hooks `DPSGD.wrap` added (the model stays the same object)."""
    close = getattr(model, "_close", None)
    if close is not None:
        close()


def compose(student: dict, teacher: dict) -> dict:
    """A distilled student's privacy: it reads the train images through its own DP-SGD and through the teacher's
    soft labels, so basic composition bounds it by (ε_student + ε_teacher, δ_student + δ_teacher)."""
    return {
        **student, "epsilon": student["epsilon"] + teacher["epsilon"], "delta": student["delta"] + teacher["delta"],
        "student_epsilon": student["epsilon"], "student_delta": student["delta"],
        "teacher_epsilon": teacher["epsilon"], "teacher_delta": teacher["delta"], "composition": "basic (sum)",
    }  # fmt: skip
