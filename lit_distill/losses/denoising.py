"""Denoising score matching / flow matching: the regression loss that trains every score network."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..diffusion.parametrization import expand_like, from_x0_eps
from ..diffusion.schedules import Schedule


def noised_sample(schedule: Schedule, x0: Tensor, *, generator: torch.Generator | None = None,
                  timesteps: Tensor | None = None, t_min: float = 0.0, t_max: float = 1.0):
    """Draw ``t ~ p(t)`` (unless given) and ``eps``; return ``(x_t, timesteps [B], eps, target)`` where
    ``target`` is what a network of the schedule's prediction type should output at ``x_t``."""
    if timesteps is None:
        timesteps = schedule.training_timesteps(x0.shape[0], device=x0.device, generator=generator, t_min=t_min, t_max=t_max)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha, sigma = (expand_like(c, x0) for c in schedule.coefficients(timesteps))
    x_t = alpha * x0 + sigma * eps
    return x_t, timesteps, eps, from_x0_eps(x0, eps, alpha, sigma, schedule.prediction_type)


def denoising_loss(denoiser: Callable, schedule: Schedule, x0: Tensor, cond: Optional[dict] = None, *,
                   generator: torch.Generator | None = None, weight: Tensor | None = None,
                   t_min: float = 0.0, t_max: float = 1.0) -> Tensor:
    """``E_t,eps || f(x_t, t) - target ||^2`` (mean over elements): DSM for eps / v / x0 prediction,
    conditional flow matching for velocity. ``weight`` ``[B]`` reweights samples (default 1)."""
    x_t, timesteps, _, target = noised_sample(schedule, x0, generator=generator, t_min=t_min, t_max=t_max)
    prediction = denoiser(x_t, timesteps, cond).float()
    per_sample = (prediction - target).pow(2).flatten(1).mean(1)
    return (per_sample if weight is None else weight * per_sample).mean()
