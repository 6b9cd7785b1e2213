"""Noise schedules: VP/DDPM (``alphas_cumprod``) and rectified flow (``x_t = (1-t) x0 + t eps``).

A schedule knows how a noisy sample is built (``x_t = alpha x0 + sigma eps``), which timestep the
network sees, the grid of a sampling pass (taken from diffusers' own scheduler so that step counts,
spacing and shift agree with it exactly) and the reverse kernel of one step. It holds no state that
changes during sampling: one schedule serves every rollout.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .parametrization import check_prediction_type, expand_like, to_x0_eps


@dataclass(frozen=True)
class SamplingGrid:
    """The steps of one reverse pass. Step ``i`` moves ``x`` from time ``t_i`` to ``s_i < t_i``.

    All tensors have shape ``[N]`` (N = number of steps). The coefficients are float64 (the kernels
    cast them to the samples' dtype); ``timesteps`` are the model timesteps the network is called with
    (long for VP, float32 for flow). ``alpha_*``/``sigma_*`` are the
    coefficients of ``x = alpha x0 + sigma eps`` at ``t_i`` and ``s_i``.
    """
    timesteps: Tensor
    alpha_t: Tensor
    sigma_t: Tensor
    alpha_s: Tensor
    sigma_s: Tensor

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SamplingGrid":
        """Move to ``device``; ``dtype`` casts the float coefficients (e.g. float64 for reference tests)."""
        def move(v: Tensor) -> Tensor:
            return v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        return SamplingGrid(*(move(getattr(self, f)) for f in self.__dataclass_fields__))

    def at(self, index: Tensor | int) -> "SamplingGrid":
        """The coefficients of the steps ``index`` (an int or a LongTensor ``[B]`` of step indices)."""
        return SamplingGrid(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


class Schedule(abc.ABC):
    """Base class. Subclasses set ``family`` and implement ``grid``, ``coefficients``,
    ``training_timesteps`` and ``kernel``."""

    family: str = ""

    def __init__(self, prediction_type: str, num_train_timesteps: int = 1000):
        check_prediction_type(prediction_type, self.family)
        self.prediction_type = prediction_type
        self.num_train_timesteps = num_train_timesteps

    # -- training-time noising -------------------------------------------------------------
    @abc.abstractmethod
    def coefficients(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` ``[B]`` float32 at model timesteps ``[B]``."""

    @abc.abstractmethod
    def training_timesteps(self, batch_size: int, *, device=None, generator=None,
                           t_min: float = 0.0, t_max: float = 1.0) -> Tensor:
        """Model timesteps ``[B]`` drawn from the training distribution p(t), restricted to the
        fraction ``[t_min, t_max]`` of the time range (1 = pure noise)."""

    def to_x0_eps(self, prediction: Tensor, x_t: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``(x0_hat, eps_hat)`` from a network output at model timesteps ``[B]``."""
        alpha, sigma = self.coefficients(timesteps)
        return to_x0_eps(prediction, x_t, expand_like(alpha, x_t), expand_like(sigma, x_t), self.prediction_type)

    # -- sampling --------------------------------------------------------------------------
    @abc.abstractmethod
    def grid(self, num_steps: int, device=None) -> SamplingGrid:
        """The :class:`SamplingGrid` of an ``num_steps`` reverse pass, on ``device``."""

    @abc.abstractmethod
    def kernel_std(self, steps: SamplingGrid, noise_level: float | Tensor) -> Tensor:
        """The std of the kernel at ``steps`` (it does not depend on x_t): 0 where the step is deterministic."""

    @abc.abstractmethod
    def kernel(self, prediction: Tensor, x_t: Tensor, steps: SamplingGrid,
               noise_level: float | Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``[like x_t]`` and std (``[B]`` or scalar) of ``p(x_s | x_t)`` for the steps ``steps``
        (a grid restricted with :meth:`SamplingGrid.at`: one step, or one per sample)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prediction_type={self.prediction_type!r})"


class VPSchedule(Schedule):
    """DDPM/DDIM variance-preserving schedule from ``alphas_cumprod``; kernel: DDIM with ``eta``.

    The grid is that of ``diffusers.DDIMScheduler.set_timesteps`` for the same config, and step ``i``
    goes from ``t_i`` to ``t_i - num_train_timesteps // N`` (``final_alpha_cumprod`` below 0), exactly
    as ``DDIMScheduler.step`` does.
    """

    family = "vp"

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon",
                 final_alpha_cumprod: float = 1.0, scheduler_config: dict | None = None):
        super().__init__(prediction_type, len(alphas_cumprod))
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self.scheduler_config = dict(scheduler_config or {})

    @classmethod
    def from_config(cls, config: dict) -> "VPSchedule":
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(dict(config))
        return cls(ddim.alphas_cumprod, config.get("prediction_type", "epsilon"),
                   float(ddim.final_alpha_cumprod), dict(ddim.config))

    def coefficients(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()].float()
        return abar.sqrt(), (1 - abar).sqrt()

    def training_timesteps(self, batch_size, *, device=None, generator=None, t_min=0.0, t_max=1.0):
        lo, hi = int(t_min * (self.num_train_timesteps - 1)), int(round(t_max * (self.num_train_timesteps - 1)))
        return torch.randint(lo, hi + 1, (batch_size,), device=device, generator=generator)

    def grid(self, num_steps: int, device=None) -> SamplingGrid:
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(self.scheduler_config)
        ddim.set_timesteps(num_steps)
        t = ddim.timesteps.long()
        prev = t - self.num_train_timesteps // num_steps
        abar_t = self.alphas_cumprod[t]
        abar_s = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp_min(0)],
                             torch.tensor(self.final_alpha_cumprod, dtype=torch.float64))
        return SamplingGrid(t, abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt()).to(device)

    def kernel_std(self, steps, noise_level):
        return kernels.ddim_std(steps.alpha_t**2, steps.alpha_s**2, noise_level)

    def kernel(self, prediction, x_t, steps, noise_level):
        x0, eps = to_x0_eps(prediction, x_t, expand_like(steps.alpha_t, x_t), expand_like(steps.sigma_t, x_t),
                            self.prediction_type)
        return kernels.ddim_kernel(x0, eps, steps.alpha_t**2, steps.alpha_s**2, noise_level)


class FlowSchedule(Schedule):
    """Rectified flow ``x_t = (1 - t) x0 + t eps`` (SD3, FLUX); model timestep ``= t * 1000``.

    The grid is ``diffusers.FlowMatchEulerDiscreteScheduler.set_timesteps`` (shift and dynamic
    shifting included: pass ``mu`` for resolution-dependent shifting); the kernel is the Flow-GRPO SDE
    with noise level ``a`` (0 gives the scheduler's Euler step). Training times: ``"uniform"`` or
    ``"logit_normal"`` (SD3), then shifted with the scheduler's ``shift``.
    """

    family = "flow"

    def __init__(self, prediction_type: str = "velocity", scheduler_config: dict | None = None,
                 time_sampling: str = "uniform", mu: float | None = None):
        self.scheduler_config = dict(scheduler_config or {"num_train_timesteps": 1000, "shift": 1.0})
        super().__init__(prediction_type, int(self.scheduler_config.get("num_train_timesteps", 1000)))
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling={time_sampling!r}: choose 'uniform' or 'logit_normal'")
        self.shift = float(self.scheduler_config.get("shift", 1.0))
        self.time_sampling, self.mu = time_sampling, mu

    @classmethod
    def from_config(cls, config: dict) -> "FlowSchedule":
        from diffusers import FlowMatchEulerDiscreteScheduler

        full = dict(FlowMatchEulerDiscreteScheduler.from_config(dict(config)).config)
        prediction_type = config.get("prediction_type") or "velocity"
        return cls("velocity" if prediction_type == "flow_prediction" else prediction_type, full)

    def coefficients(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        t = timesteps.float() / self.num_train_timesteps
        return 1 - t, t

    def training_timesteps(self, batch_size, *, device=None, generator=None, t_min=0.0, t_max=1.0):
        if self.time_sampling == "uniform":
            u = torch.rand(batch_size, device=device, generator=generator)
        else:
            u = torch.randn(batch_size, device=device, generator=generator).sigmoid()
        t = self.shift * u / (1 + (self.shift - 1) * u)
        # keep t away from 0 (sigma = 0 makes eps undefined) and inside the requested range
        t = t_min + (t_max - t_min) * t
        return t.clamp(1e-3, 1.0) * self.num_train_timesteps

    def grid(self, num_steps: int, device=None) -> SamplingGrid:
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(num_steps, mu=self.mu)
        sig = sched.sigmas.double()
        t, s = sig[:-1], sig[1:]
        return SamplingGrid(sched.timesteps.float(), 1 - t, t, 1 - s, s).to(device)

    def kernel_std(self, steps, noise_level):
        return kernels.flow_sde_std(steps.sigma_t, steps.sigma_s, noise_level)

    def kernel(self, prediction, x_t, steps, noise_level):
        v = prediction
        if self.prediction_type != "velocity":
            x0, eps = to_x0_eps(prediction, x_t, expand_like(steps.alpha_t, x_t), expand_like(steps.sigma_t, x_t),
                                self.prediction_type)
            v = eps - x0
        return kernels.flow_sde_kernel(x_t, v, steps.sigma_t, steps.sigma_s, noise_level)


_FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"}


def schedule_from_scheduler_config(config: dict[str, Any], prediction_type: str | None = None) -> Schedule:
    """Build a :class:`Schedule` from a diffusers scheduler config (``scheduler.config`` or the dict in
    ``scheduler/scheduler_config.json``): flow-matching schedulers give a :class:`FlowSchedule`,
    every DDPM-family scheduler (DDPM, DDIM, PNDM, Euler, DPM-Solver...) a :class:`VPSchedule`.
    ``prediction_type`` overrides the config's (flow configs carry none: velocity)."""
    config = dict(config)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    name = config.get("_class_name", "")
    if name in _FLOW_SCHEDULERS or (not name and "shift" in config):
        return FlowSchedule.from_config(config)
    if "beta_schedule" in config or "trained_betas" in config or name:
        return VPSchedule.from_config(config)
    raise ValueError(f"scheduler config has no '_class_name' and no beta schedule: {sorted(config)}; "
                     "pass a diffusers scheduler config (scheduler.config)")
