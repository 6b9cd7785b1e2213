"""Score distillation (Diff-Instruct / VSD / DMD): the generator gradient as a surrogate loss.

A one-step generator makes ``x0 = g_theta(z)``; noised, ``x_t = alpha x0 + sigma eps``. The gradient of the
integral reverse KL ``sum_t w(t) KL(p_g,t || p_data,t)`` with respect to theta is

    E_{t, eps}[ w(t) (s_fake(x_t, t) - s_real(x_t, t)) . dx_t/dtheta ]

with ``s_real`` the teacher's score and ``s_fake`` the score of the generator's own noised samples (an
auxiliary network trained online by DSM). The scores are treated as constants, so the surrogate

    L = mean_b sum_pixels( [w (s_fake - s_real)].detach() * x_t )

has exactly that gradient. Its *value* is meaningless (do not plot it as a loss).

Weightings ``w(t)`` (:func:`score_weight`). Writing ``x_t = alpha x0 + sigma eps`` and
``s = -eps_hat / sigma = -(x_t - alpha x0_hat) / sigma^2``, the score difference is
``s_fake - s_real = alpha (x0_fake - x0_real) / sigma^2`` and the gradient reaching the sample ``x0`` is
``w alpha (s_fake - s_real)``:

- ``"x0"`` (default), ``w = sigma^2 / alpha^2``: the per-pixel gradient on x0 is ``x0_fake - x0_real``,
  bounded at every t. This is the direction DMD / DMD2 use, and DisBack's code (built on DMD2).
- ``"eps"``, ``w = sigma / alpha``: the gradient on x0 is ``eps_real - eps_fake``: SDS / VSD
  (ProlificDreamer) with their ``omega(t) = 1``.
- ``"sigma2"``, ``w = sigma^2``: the gradient on x_t is ``sigma (eps_real - eps_fake)``; with ``alpha = 1`` this is
  the ``sigma^2`` weighting of EDM-parametrised score distillation (Diff-Instruct leaves ``w(t)`` free).
- ``"constant"``, ``w = 1``: the plain integral KL.

``normalize=True`` multiplies by DMD's per-sample ``1 / mean|x0 - x0_real|`` (:func:`dmd_normalizer`),
which makes the step size independent of how far the sample is from the teacher's denoised estimate.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..diffusion.parametrization import expand_like, to_x0_eps

WEIGHTINGS = ("x0", "eps", "sigma2", "constant")


def score_weight(alpha: Tensor, sigma: Tensor, kind: str = "x0") -> Tensor:
    """``w(t)`` of shape ``alpha``'s (``[B]`` or ``[B, 1, 1, 1]``) for one of :data:`WEIGHTINGS`."""
    if kind == "x0":
        return sigma**2 / alpha**2
    if kind == "eps":
        return sigma / alpha
    if kind == "sigma2":
        return sigma**2
    if kind == "constant":
        return torch.ones_like(alpha)
    raise ValueError(f"weighting={kind!r}: choose one of {list(WEIGHTINGS)}")


def dmd_normalizer(x0: Tensor, x0_real: Tensor, eps: float = 1e-8) -> Tensor:
    """DMD's per-sample normaliser ``1 / mean_pixels |x0 - x0_real|`` ``[B]`` (detached).

    ``x0``: the generator's samples ``[B, ...]``; ``x0_real``: the real score's denoised estimate at ``x_t``."""
    return 1.0 / ((x0 - x0_real).detach().abs().flatten(1).mean(1) + eps)


def score_distillation_loss(x_t: Tensor, score_fake: Tensor, score_real: Tensor,
                            weight: Tensor | None = None) -> Tensor:
    """Surrogate whose gradient is ``mean_b w_b (s_fake - s_real) . dx_t/dtheta``.

    Args:
        x_t: ``[B, ...]`` noised generator samples, differentiable w.r.t. the generator.
        score_fake, score_real: ``[B, ...]`` scores at ``x_t`` (detached here).
        weight: ``[B]`` (or broadcastable to ``x_t``) ``w(t)``; default 1.
    Returns a scalar: ``mean_b sum_pixels(w (s_fake - s_real) * x_t)``.
    """
    direction = (score_fake - score_real).detach()
    if weight is not None:
        direction = expand_like(weight.detach(), x_t) * direction
    return (direction * x_t).flatten(1).sum(1).mean()


def _per_sample(c: Tensor, batch: int) -> Tensor:
    """A coefficient given as a scalar, ``[B]`` or ``[B, 1, ..., 1]`` as ``[B]``."""
    c = torch.as_tensor(c)
    return c.reshape(-1)[:1].expand(batch) if c.numel() == 1 else c.reshape(batch, -1)[:, 0]


class ScoreDistillation(NamedTuple):
    """Output of :func:`score_distillation_from_predictions`: the surrogate and the two denoised estimates."""
    loss: Tensor
    x0_fake: Tensor
    x0_real: Tensor


def score_distillation_from_predictions(x_t: Tensor, pred_fake: Tensor, pred_real: Tensor, alpha: Tensor,
                                        sigma: Tensor, prediction_type: str, *, weight: Tensor | str = "x0",
                                        normalize: bool = False, x0: Tensor | None = None) -> ScoreDistillation:
    """The surrogate from two network outputs of the schedule's ``prediction_type``.

    ``alpha``, ``sigma``: ``[B, 1, ..., 1]`` (broadcastable to ``x_t``). ``weight``: ``w(t)`` as a tensor ``[B]``
    or the name of a weighting in :data:`WEIGHTINGS`. ``normalize`` needs ``x0`` (the generator samples that
    were noised into ``x_t``). Scores come from :func:`lit_distill.diffusion.parametrization.to_x0_eps`:
    ``s = -eps_hat / sigma``.
    """
    x0_fake, eps_fake = to_x0_eps(pred_fake.detach(), x_t.detach(), alpha, sigma, prediction_type)
    x0_real, eps_real = to_x0_eps(pred_real.detach(), x_t.detach(), alpha, sigma, prediction_type)
    if isinstance(weight, str):
        batch = x_t.shape[0]
        weight = score_weight(_per_sample(alpha, batch), _per_sample(sigma, batch), weight)
    if normalize:
        if x0 is None:
            raise ValueError("normalize=True needs x0 (the generator samples) for DMD's 1/mean|x0 - x0_real|")
        weight = weight * dmd_normalizer(x0, x0_real)
    loss = score_distillation_loss(x_t, -eps_fake / sigma, -eps_real / sigma, weight)
    return ScoreDistillation(loss, x0_fake, x0_real)
