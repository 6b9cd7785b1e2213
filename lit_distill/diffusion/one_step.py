"""The one-step generator: a denoiser evaluated once at a fixed time t*, its output read as x0."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .rollout import Cond
from .schedules import Schedule


class OneStepGenerator(nn.Module):
    """``x0 = G(z, cond)``: treat the latent noise ``z`` as ``x_{t*}`` and map the network output to x0.

    Args:
        denoiser: an ``nn.Module`` callable as ``(x_t, timestep [B], cond) -> prediction`` (initialised
            from the teacher; it is trained, so it is a submodule here).
        schedule: the teacher's schedule (fixes the prediction type and ``alpha, sigma`` at t*).
        t_star: the model timestep the generator runs at; default: the noisiest training timestep
            (``num_train_timesteps - 1`` for VP, ``num_train_timesteps`` (t = 1) for flow).
    """

    def __init__(self, denoiser: nn.Module, schedule: Schedule, t_star: float | None = None):
        super().__init__()
        self.denoiser, self.schedule = denoiser, schedule
        if t_star is None:
            t_star = schedule.num_train_timesteps - (1 if schedule.family == "vp" else 0)
        self.t_star = float(t_star)

    def forward(self, z: Tensor, cond: Cond = None) -> Tensor:
        """``z``: ``[B, C, H, W]`` standard normal. Returns x0 ``[B, C, H, W]`` (float32)."""
        t = torch.full((z.shape[0],), self.t_star, device=z.device)
        if self.schedule.family == "vp":
            t = t.long()
        prediction = self.denoiser(z, t, cond).float()
        x0, _ = self.schedule.to_x0_eps(prediction, z.float(), t)
        return x0
