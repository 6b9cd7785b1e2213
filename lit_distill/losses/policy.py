"""Policy-gradient pieces of TeacherRL: advantages and the PPO-clipped per-step objective."""
from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO advantages: ``(r - mean_group) / (std_group + eps)`` for rewards ``[P * G]`` laid out as P
    consecutive groups of G rollouts of one prompt. Returns ``[P * G]``.

    A group whose rewards are all equal gets advantage 0 (it carries no signal). ``std`` is the
    population std (ddof 0), so each group's advantages have mean 0 and std 1 (up to ``eps``)."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: GRPO needs at least 2 rollouts per prompt to "
                         "compare them; set group_size >= 2 or use advantage='running' (DDPO)")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(1, keepdim=True), groups.std(1, keepdim=True, unbiased=False)
    return ((groups - mean) / (std + eps)).view(-1)


class RunningNormalizer(torch.nn.Module):
    """DDPO-style advantages: rewards normalised by a running mean and std over every reward seen.

    Buffers live in the module so that checkpoints restore them; the update is on-device."""

    def __init__(self, eps: float = 1e-4):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m2", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, rewards: Tensor) -> None:
        """Chan et al.'s parallel update of count, mean and sum of squared deviations."""
        r = rewards.detach().double().flatten()
        n, mean, m2 = r.numel(), r.mean(), ((r - r.mean()) ** 2).sum()
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.count.copy_(total)

    def normalize(self, rewards: Tensor) -> Tensor:
        """``(rewards - mean) / (std + eps)`` with the current statistics."""
        std = (self.m2 / self.count.clamp_min(1)).sqrt()
        return ((rewards.double() - self.mean) / (std + self.eps)).to(rewards.dtype)

    def forward(self, rewards: Tensor) -> Tensor:
        """Update with ``rewards`` then normalise them."""
        self.update(rewards)
        return self.normalize(rewards)


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """Per-element PPO objective ``-min(ratio A, clip(ratio, 1-c, 1+c) A)``, ``ratio = exp(lp - lp_old)``.

    All inputs broadcast to one shape (e.g. ``[B]`` for one step per sample). At ratio 1 its gradient is
    ``-A * grad log p`` (REINFORCE); where the clip is active the gradient is exactly zero."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range) * advantages
    return -torch.minimum(unclipped, clipped)
