"""The diffusion core: schedules, prediction conversions, reverse kernels, rollouts. Pure tensors."""
from .kernels import ddim_kernel, flow_sde_kernel, gaussian_kl, gaussian_log_prob, mean_matching
from .one_step import OneStepGenerator
from .parametrization import convert, expand_like, from_x0_eps, to_x0_eps
from .rollout import Trajectory, guided_prediction, noise_levels, rollout, sample, window_start
from .schedules import FlowSchedule, SamplingGrid, Schedule, VPSchedule, schedule_from_scheduler_config

__all__ = [
    "ddim_kernel", "flow_sde_kernel", "gaussian_kl", "gaussian_log_prob", "mean_matching",
    "OneStepGenerator", "convert", "expand_like", "from_x0_eps", "to_x0_eps",
    "Trajectory", "guided_prediction", "noise_levels", "rollout", "sample", "window_start",
    "FlowSchedule", "SamplingGrid", "Schedule", "VPSchedule", "schedule_from_scheduler_config",
]
