"""Rollouts: run a denoiser through a sampling grid and keep what training needs.

One sampler for every method: ODE (noise level 0), SDE (DDIM eta > 0 / flow noise level a > 0), or
an SDE on a chosen subset of steps. Buffers are preallocated and the loop never reads a tensor back
to the host, so it is safe under CUDA graphs / ``torch.compile`` of the denoiser.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .kernels import gaussian_log_prob
from .schedules import SamplingGrid, Schedule

Cond = Optional[dict]
Denoiser = Callable[[Tensor, Tensor, Cond], Tensor]
"""``denoiser(x_t [B,C,H,W], timestep [B], cond) -> prediction [B,C,H,W]`` of the schedule's type."""


def concat_cond(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditioning dicts along the batch (``None`` stays ``None``)."""
    if a is None:
        return None
    return {k: torch.cat([a[k], b[k]]) for k in a}


def guided_prediction(denoiser: Denoiser, x_t: Tensor, timestep: Tensor, cond: Cond,
                      uncond: Cond = None, guidance_scale: float = 1.0) -> Tensor:
    """Classifier-free guidance: ``p_uncond + w (p_cond - p_uncond)`` in one batched call.

    With ``guidance_scale == 1`` or no ``uncond`` this is just ``denoiser(x_t, timestep, cond)``.
    """
    if guidance_scale == 1.0 or uncond is None:
        return denoiser(x_t, timestep, cond)
    both = denoiser(torch.cat([x_t, x_t]), torch.cat([timestep, timestep]), concat_cond(cond, uncond))
    p_cond, p_uncond = both.chunk(2)
    return p_uncond + guidance_scale * (p_cond - p_uncond)


def noise_levels(num_steps: int, noise_level: float, sde_steps: Sequence[int] | None = None) -> list[float]:
    """Per-step noise levels: ``noise_level`` on ``sde_steps`` (all steps if None), 0 (ODE) elsewhere."""
    chosen = range(num_steps) if sde_steps is None else set(sde_steps)
    bad = [i for i in chosen if not 0 <= i < num_steps]
    if bad:
        raise ValueError(f"sde_steps {bad} outside 0..{num_steps - 1}")
    return [float(noise_level) if i in chosen else 0.0 for i in range(num_steps)]


def window_start(size: int, first: int, end: int, mode: str, step: int, seed: int, shift_every: int = 1,
                 stride: int = 1) -> int:
    """First step of a window of ``size`` consecutive steps within ``first .. end - 1`` at training step ``step``.

    ``mode="random"``: uniform over the ``end - first - size + 1`` positions, drawn from a generator seeded by
    ``(seed, step)`` alone (every rank and a resumed run draw the same; Flow-GRPO-Fast's random window).
    ``mode="sliding"``: ``first`` at step 0, ``stride`` later every ``shift_every`` steps, back to ``first`` once
    the window would end past ``end`` (MixGRPO's progressive window with roll-back).
    """
    positions = end - first - size + 1
    if positions < 1:
        raise ValueError(f"a window of {size} steps does not fit in steps {first}..{end - 1}")
    if mode == "random":
        return first + random.Random(f"sde_window/{seed}/{step}").randrange(positions)
    if mode == "sliding":
        return first + stride * ((step // shift_every) % ((positions - 1) // stride + 1))
    raise ValueError(f"window mode {mode!r}: choose 'random' or 'sliding'")


@dataclass
class Trajectory:
    """What one rollout of ``B`` samples over ``N`` steps produced. Batch-major so rows can be selected.

    latents:   ``[B, N+1, C, H, W]`` ``latents[:, i]`` is the input of step ``i``; ``latents[:, N]`` the sample.
    timesteps: ``[N]`` model timesteps of the steps.
    means:     ``[B, N, C, H, W]`` kernel means (``None`` if not stored).
    stds:      ``[N]`` kernel stds (0 on deterministic steps).
    log_probs: ``[B, N]`` ``log p(latents[:, i+1] | latents[:, i])`` (0 on deterministic steps).
    noise_levels: ``[N]`` the eta / a used at each step.
    """
    latents: Tensor
    timesteps: Tensor
    means: Optional[Tensor]
    stds: Tensor
    log_probs: Tensor
    noise_levels: Tensor

    @property
    def sample(self) -> Tensor:
        return self.latents[:, -1]

    @property
    def stochastic(self) -> Tensor:
        """``[N]`` bool: which steps sampled noise."""
        return self.stds > 0

    @staticmethod
    def cat(parts: Sequence["Trajectory"]) -> "Trajectory":
        """Concatenate trajectories of the same grid along the batch."""
        cat = lambda name: None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        first = parts[0]
        return Trajectory(cat("latents"), first.timesteps, cat("means"), first.stds, cat("log_probs"), first.noise_levels)


@torch.no_grad()
def rollout(denoiser: Denoiser, noise: Tensor, cond: Cond, schedule: Schedule, grid: SamplingGrid, *,
            noise_level: float | Sequence[float] = 0.0, generator: torch.Generator | None = None,
            guidance_scale: float = 1.0, uncond: Cond = None, store_means: bool = True) -> Trajectory:
    """Sample ``x_{t_0} = noise`` down the grid with the schedule's kernel.

    Args:
        denoiser: ``(x_t, timestep [B], cond) -> prediction``.
        noise: ``[B, C, H, W]`` float32 starting point (standard normal at t=1).
        cond / uncond: conditioning dicts for the prompts and for the empty prompt (CFG).
        grid: ``schedule.grid(N)`` on ``noise``'s device.
        noise_level: eta (VP) or a (flow); a float for every step or one value per step
            (:func:`noise_levels`); 0 makes the step deterministic.
        generator: source of the step noise, for reproducible rollouts.
    Returns a :class:`Trajectory`; ``log_probs`` are exact Gaussian log-densities of each stochastic step.
    """
    n, batch = grid.num_steps, noise.shape[0]
    levels = [float(noise_level)] * n if isinstance(noise_level, (int, float)) else [float(v) for v in noise_level]
    if len(levels) != n:
        raise ValueError(f"noise_level has {len(levels)} values for a grid of {n} steps")
    latents = noise.new_empty((batch, n + 1) + noise.shape[1:])
    means = noise.new_empty((batch, n) + noise.shape[1:]) if store_means else None
    log_probs = noise.new_zeros((batch, n))
    stds = noise.new_zeros(n)
    x = noise
    latents[:, 0] = x
    for i in range(n):
        step = grid.at(i)
        prediction = guided_prediction(denoiser, x, step.timesteps.expand(batch), cond, uncond, guidance_scale)
        mean, std = schedule.kernel(prediction.to(x.dtype), x, step, levels[i])
        if levels[i] > 0:
            x = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            # a noisy level can still give std 0 (DDIM's last step onto abar = 1): no density there
            log_probs[:, i] = torch.where(std > 0, gaussian_log_prob(x, mean, std.clamp_min(1e-20)), 0.0)
            stds[i] = std
        else:
            x = mean
        latents[:, i + 1] = x
        if store_means:
            means[:, i] = mean
    return Trajectory(latents, grid.timesteps, means, stds, log_probs, torch.tensor(levels, device=noise.device))


def sample(denoiser: Denoiser, noise: Tensor, cond: Cond, schedule: Schedule, num_steps: int, *,
           guidance_scale: float = 1.0, uncond: Cond = None, noise_level: float = 0.0,
           generator: torch.Generator | None = None) -> Tensor:
    """Final samples of a ``num_steps`` pass: the evaluation sampler (the ODE by default)."""
    grid = schedule.grid(num_steps, device=noise.device)
    return rollout(denoiser, noise, cond, schedule, grid, noise_level=noise_level, generator=generator,
                   guidance_scale=guidance_scale, uncond=uncond, store_means=False).sample
