"""Training objectives as pure functions of tensors."""
from .denoising import denoising_loss, noised_sample
from .density_ratio import DIVERGENCES, classifier_loss, density_ratio_generator_loss, generator_loss_js, generator_loss_kl
from .distill import per_step_kl
from .policy import RunningNormalizer, group_advantages, ppo_clip_loss
from .score_distillation import (
    WEIGHTINGS, ScoreDistillation, dmd_normalizer, score_distillation_from_predictions, score_distillation_loss,
    score_weight,
)

__all__ = [
    "denoising_loss", "noised_sample", "per_step_kl", "RunningNormalizer", "group_advantages", "ppo_clip_loss",
    "DIVERGENCES", "classifier_loss", "density_ratio_generator_loss", "generator_loss_js", "generator_loss_kl",
    "WEIGHTINGS", "ScoreDistillation", "dmd_normalizer", "score_distillation_from_predictions",
    "score_distillation_loss", "score_weight",
]
