"""Rewards: ``reward(images [B, C, H, W] in [-1, 1], prompts, tasks, **metadata) -> Tensor[B]``.

Build one by name or config with ``build_reward``; see ``docs/rewards.md``.
"""
from lit_distill.rewards.base import (
    NonFiniteRewardError,
    Reward,
    TaskRouted,
    WeightedSum,
    build_reward,
    register_reward,
    registered_rewards,
    validate_rewards,
)
from lit_distill.rewards.builtin import (
    Brightness,
    DigitCorrectness,
    JpegCompressibility,
    JpegIncompressibility,
    Slant,
    Symmetry,
    jpeg_sizes_kb,
    parse_digit,
)
from lit_distill.rewards.models import ClipScore, HPSv2, ImageReward, LaionAesthetic, PickScore, PreferenceMLP

__all__ = [
    "NonFiniteRewardError",
    "Reward",
    "validate_rewards",
    "register_reward",
    "build_reward",
    "registered_rewards",
    "WeightedSum",
    "TaskRouted",
    "JpegCompressibility",
    "JpegIncompressibility",
    "Brightness",
    "Slant",
    "DigitCorrectness",
    "Symmetry",
    "jpeg_sizes_kb",
    "parse_digit",
    "ClipScore",
    "PickScore",
    "HPSv2",
    "LaionAesthetic",
    "ImageReward",
    "PreferenceMLP",
]
