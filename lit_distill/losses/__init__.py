"""Training objectives as pure functions of tensors."""
from .denoising import denoising_loss, noised_sample
from .distill import per_step_kl
from .policy import RunningNormalizer, group_advantages, ppo_clip_loss

__all__ = ["denoising_loss", "noised_sample", "per_step_kl", "RunningNormalizer", "group_advantages", "ppo_clip_loss"]
