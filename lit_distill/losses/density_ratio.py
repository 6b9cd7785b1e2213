"""Density-ratio losses (arXiv 2502.08005): a classifier replaces the teacher's score.

A classifier with logit ``d(x_t, t)`` is trained to separate noised data (label 1) from noised generator samples
(label 0) with the logistic loss. With balanced classes its optimum is

    d*(x_t, t) = log p_data,t(x_t) - log p_g,t(x_t),     so     grad_x d* = s_real - s_fake.

For an f-divergence ``D_f(p_data || p_g) = E_{p_g}[f(r)]``, ``r = p_data / p_g = exp(d)``, reparametrising the
generator's samples gives ``grad_theta D_f = E[-r^2 f''(r) grad_x log r . dx_t/dtheta]``. Two members:

- reverse KL, ``KL(p_g || p_data)``: ``f(r) = -log r``, ``r^2 f'' = 1``; gradient ``-w grad_x d . dx_t/dtheta``,
  which equals score distillation's ``w (s_fake - s_real) . dx_t/dtheta``. Surrogate: ``-w d(x_t)``.
- Jensen-Shannon, ``JS(p_data || p_g)``: ``f(r) = (r log(2r/(1+r)) + log(2/(1+r))) / 2``,
  ``r^2 f'' = sigmoid(d) / 2``; gradient ``-w sigmoid(d)/2 grad_x d . dx_t/dtheta``. Since
  ``grad_x softplus(d) = sigmoid(d) grad_x d``, the surrogate is ``-w softplus(d(x_t)) / 2`` (the saturating
  GAN generator loss ``log(1 - D)/2``, D = sigmoid(d)). The JS gradient damps samples the classifier already
  calls fake (sigmoid(d) -> 0), which the KL form does not.

The generator surrogates must be evaluated with ``d`` differentiable w.r.t. ``x_t`` (run the classifier on the
generator's noised samples with autograd on) while only the generator is stepped.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("kl", "js")


def classifier_loss(logit_real: Tensor, logit_fake: Tensor) -> Tensor:
    """Logistic loss ``mean softplus(-d(real)) + mean softplus(d(fake))``; logits ``[B_real]``, ``[B_fake]``.

    Minimised by ``d = log p_real / p_fake`` (for equal class priors)."""
    return F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()


def generator_loss_kl(logit_fake: Tensor, weight: Tensor | None = None) -> Tensor:
    """Reverse-KL surrogate ``-mean_b w_b d_b``; ``logit_fake`` ``[B]`` at the generator's ``x_t``."""
    return -(logit_fake if weight is None else weight * logit_fake).mean()


def generator_loss_js(logit_fake: Tensor, weight: Tensor | None = None) -> Tensor:
    """Jensen-Shannon surrogate ``-mean_b w_b softplus(d_b) / 2``; gradient ``-w sigmoid(d)/2 grad d``."""
    value = 0.5 * F.softplus(logit_fake)
    return -(value if weight is None else weight * value).mean()


def density_ratio_generator_loss(logit_fake: Tensor, divergence: str = "kl", weight: Tensor | None = None) -> Tensor:
    """Dispatch on ``divergence`` in :data:`DIVERGENCES`; ``weight`` ``[B]`` is ``w(t)`` (default 1)."""
    if divergence == "kl":
        return generator_loss_kl(logit_fake, weight)
    if divergence == "js":
        return generator_loss_js(logit_fake, weight)
    raise ValueError(f"divergence={divergence!r}: choose one of {list(DIVERGENCES)}")
