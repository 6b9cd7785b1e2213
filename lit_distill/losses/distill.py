"""DiffusionOPD's per-step objective between a student's and a teacher's reverse kernels."""
from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion.kernels import gaussian_kl, mean_matching


def per_step_kl(mean_student: Tensor, mean_teacher: Tensor, std: Tensor, ode_weight: float = 1.0) -> Tensor:
    """Per-sample loss ``[B]`` of one reverse step for each row.

    Stochastic rows (``std > 0``): the closed-form ``KL(student || teacher) = ||mu_s - mu_T||^2 / (2 std^2)``.
    Deterministic rows (``std == 0``): mean matching ``ode_weight * ||mu_s - mu_T||^2``.
    ``std`` is a scalar or ``[B]`` (rows may come from different steps). The teacher's mean is
    detached: gradient reaches the student only.
    """
    mean_teacher = mean_teacher.detach()
    std = torch.as_tensor(std, dtype=mean_student.dtype, device=mean_student.device).expand(mean_student.shape[0])
    stochastic = std > 0
    kl = gaussian_kl(mean_student, mean_teacher, torch.where(stochastic, std, torch.ones_like(std)))
    return torch.where(stochastic, kl, ode_weight * mean_matching(mean_student, mean_teacher))
