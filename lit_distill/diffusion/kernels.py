"""One reverse step t -> s (s < t) as a Gaussian ``p(x_s | x_t) = N(mean, std^2 I)``.

Pure functions of tensors. Coefficients (``abar``, ``t``, ``std``...) are scalars or per-sample
tensors ``[B]``; they broadcast over the sample dimensions. All sums run over every element of one
sample (``D = C*H*W``), so log-probs and KLs are densities of the whole sample, shape ``[B]``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .parametrization import expand_like


def ddim_kernel(x0: Tensor, eps: Tensor, abar_t: Tensor, abar_s: Tensor, eta: float | Tensor) -> tuple[Tensor, Tensor]:
    """DDIM step with stochasticity ``eta`` (0: the deterministic ODE step; 1: DDPM's posterior).

    ``std = eta * sqrt((1 - abar_s) / (1 - abar_t)) * sqrt(1 - abar_t / abar_s)`` and
    ``mean = sqrt(abar_s) * x0 + sqrt(1 - abar_s - std^2) * eps`` (Song et al. 2021, eq. 12), the
    same as ``diffusers.DDIMScheduler.step``. Returns ``(mean [like x0], std [like abar_t])``.
    """
    abar_t, abar_s = torch.as_tensor(abar_t), torch.as_tensor(abar_s)
    std = ddim_std(abar_t, abar_s, eta)
    direction = (1 - abar_s - std**2).clamp_min(0).sqrt()
    mean = expand_like(abar_s.sqrt(), x0) * x0 + expand_like(direction, eps) * eps
    return mean, std


def ddim_std(abar_t: Tensor, abar_s: Tensor, eta: float | Tensor) -> Tensor:
    """The std of the DDIM-eta step (0 where ``abar_s = 1``: the last step with ``set_alpha_to_one``)."""
    return eta * ((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)).sqrt()


def flow_sde_std(t: Tensor, s: Tensor, a: float | Tensor) -> Tensor:
    """The std ``a sqrt(t / (1 - t)) sqrt(t - s)`` of the flow SDE step (``1 - t`` read at ``s`` when t = 1)."""
    one_minus_t = torch.where(t >= 1, 1 - s, 1 - t)
    return a * (t / one_minus_t).sqrt() * (t - s).sqrt()


def flow_sde_kernel(x_t: Tensor, velocity: Tensor, t: Tensor, s: Tensor, a: float | Tensor) -> tuple[Tensor, Tensor]:
    """Euler-Maruyama step of the rectified-flow SDE with noise level ``a`` (Flow-GRPO's form).

    With ``sigma_t = a * sqrt(t / (1 - t))`` and ``dt = s - t < 0``:
    ``mean = x_t + [v + sigma_t^2 / (2 t) * (x_t + (1 - t) v)] dt``, ``std = sigma_t * sqrt(-dt)``.
    The drift adds ``-sigma_t^2/2 * score`` to the ODE velocity (score = -(x_t + (1-t) v) / t), so the
    SDE keeps the ODE's marginals. ``a = 0`` is the Euler ODE step ``x_t + v dt``. At ``t = 1`` the noise
    level diverges; like Flow-GRPO we evaluate ``1 - t`` at the step's target ``s`` there.
    """
    t, s = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device), torch.as_tensor(s, dtype=x_t.dtype, device=x_t.device)
    dt = s - t
    std = flow_sde_std(t, s, a)
    noise_sq = std**2 / (-dt)  # sigma_t^2
    t_b, dt_b, noise_sq_b = expand_like(t, x_t), expand_like(dt, x_t), expand_like(noise_sq, x_t)
    drift = velocity + noise_sq_b / (2 * t_b) * (x_t + (1 - t_b) * velocity)
    return x_t + drift * dt_b, std


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(x; mean, std^2 I)`` summed over each sample's elements: ``[B, ...] -> [B]``.

    ``-||x - mean||^2 / (2 std^2) - D log std - D/2 log(2 pi)``; ``std`` is a scalar or ``[B]``, > 0.
    """
    d = x[0].numel()
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    sq = (x - mean).pow(2).flatten(1).sum(1)
    return -sq / (2 * std**2) - d * std.log() - 0.5 * d * math.log(2 * math.pi)


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
    """``KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) = ||mean_p - mean_q||^2 / (2 std^2)``: ``[B]``.

    Closed form for two kernels sharing a schedule (hence the same std): no sampling variance.
    """
    std = torch.as_tensor(std, dtype=mean_p.dtype, device=mean_p.device)
    return (mean_p - mean_q).pow(2).flatten(1).sum(1) / (2 * std**2)


def mean_matching(mean_p: Tensor, mean_q: Tensor) -> Tensor:
    """``||mean_p - mean_q||^2`` per sample, ``[B]``: the per-step objective of deterministic (ODE) steps,
    where the KL of two Dirac kernels is undefined."""
    return (mean_p - mean_q).pow(2).flatten(1).sum(1)
