"""Conversions between what a denoiser predicts and the clean sample / noise it implies.

Every schedule writes a noisy sample as ``x_t = alpha * x0 + sigma * eps``. A network predicts one of

- ``"epsilon"``:      eps
- ``"sample"``:       x0
- ``"v_prediction"``: v = alpha * eps - sigma * x0   (VP schedules, alpha^2 + sigma^2 = 1)
- ``"velocity"``:     v = eps - x0 = dx_t/dt        (rectified flow, alpha = 1 - t, sigma = t)

``alpha`` and ``sigma`` are tensors broadcastable to ``x_t`` (use :func:`expand_like` for ``[B]``).
"""
from __future__ import annotations

import torch
from torch import Tensor

PREDICTION_TYPES = {
    "vp": ("epsilon", "v_prediction", "sample"),
    "flow": ("velocity", "epsilon", "sample"),
}


def check_prediction_type(prediction_type: str, family: str) -> None:
    """Raise a ValueError naming ``prediction_type`` unless it belongs to the schedule ``family``."""
    allowed = PREDICTION_TYPES[family]
    if prediction_type not in allowed:
        other = [f for f, types in PREDICTION_TYPES.items() if prediction_type in types]
        hint = (f" '{prediction_type}' belongs to {other[0]!r} schedules." if other else "")
        raise ValueError(
            f"prediction_type={prediction_type!r} does not fit a {family!r} schedule.{hint} "
            f"Choose one of {list(allowed)} or change the scheduler config."
        )


def expand_like(c: Tensor | float, x: Tensor) -> Tensor:
    """View a per-sample coefficient ``[B]`` (or a scalar) as ``[B, 1, ..., 1]`` to broadcast with ``x``."""
    c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


def to_x0_eps(prediction: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor,
              prediction_type: str) -> tuple[Tensor, Tensor]:
    """``(x0_hat, eps_hat)`` implied by ``prediction`` at ``x_t = alpha x0 + sigma eps``."""
    if prediction_type == "epsilon":
        return (x_t - sigma * prediction) / alpha, prediction
    if prediction_type == "sample":
        return prediction, (x_t - alpha * prediction) / sigma
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * prediction, sigma * x_t + alpha * prediction
    if prediction_type == "velocity":
        return x_t - sigma * prediction, x_t + alpha * prediction
    raise ValueError(f"unknown prediction_type={prediction_type!r}; "
                     f"expected one of epsilon, sample, v_prediction, velocity")


def from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """The prediction of type ``prediction_type`` for a given ``(x0, eps)``: the regression target."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "velocity":
        return eps - x0
    raise ValueError(f"unknown prediction_type={prediction_type!r}; "
                     f"expected one of epsilon, sample, v_prediction, velocity")


def convert(prediction: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor,
            source: str, target: str) -> Tensor:
    """Re-express a prediction of type ``source`` as type ``target`` (identity when they agree)."""
    if source == target:
        return prediction
    x0, eps = to_x0_eps(prediction, x_t, alpha, sigma, source)
    return from_x0_eps(x0, eps, alpha, sigma, target)
