"""TeacherRL: reward fine-tuning of a diffusion / flow model by policy gradient over SDE rollouts."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ..data.prompts import collate_prompts
from ..diffusion import gaussian_kl, gaussian_log_prob
from ..losses import RunningNormalizer, group_advantages, ppo_clip_loss
from ..models.diffusion_model import DiffusionModel
from ..models.lora import lora_disabled
from ..protocols import PromptSource
from ..rewards import NonFiniteRewardError, build_reward, validate_rewards
from .base import module_args
from .on_policy import OnPolicyModule, metadata_of, repeat_rows
from .settings import Optim, Policy, Runtime, Sampling, Updates, groups


class TeacherRL(OnPolicyModule):
    """GRPO / DDPO fine-tuning of one model on one task's reward.

    Each training step takes a batch of P prompts, rolls out ``sampling.rollouts_per_prompt`` (G) SDE samples
    per prompt with the shared rollout function, scores them, turns rewards into advantages (per-prompt groups:
    GRPO; running normaliser: DDPO), then runs ``updates.inner_epochs`` passes of the PPO-clipped per-step
    policy loss over (sample, step) pairs in minibatches, each an optimiser update, plus ``policy.kl_weight``
    times the closed-form per-step KL to the frozen reference.

    Args (beyond :class:`OnPolicyModule`'s):
        reward: a registered reward name, a reward config dict, or a ``Reward`` (see ``lit_distill.rewards``).
        policy: :class:`~lit_distill.methods.settings.Policy` (advantages, PPO clip, KL to the reference).
    """

    method = "teacher_rl"

    def __init__(self, model: "str | DiffusionModel" = "embedded:base",
                 reward: Union[str, dict, Any] = "digit_correctness", model_kwargs: Optional[dict] = None, *,
                 lora_rank: int = 0, sampling: Sampling = Sampling(), updates: Updates = Updates(),
                 policy: Policy = Policy(), optim: Optim = Optim(lr=1e-5), runtime: Runtime = Runtime(),
                 eval_prompts: Optional[list[str]] = None):
        sampling, updates, policy, optim, runtime = groups(
            TeacherRL, sampling=sampling, updates=updates, policy=policy, optim=optim, runtime=runtime)
        super().__init__(model, model_kwargs, lora_rank=lora_rank, sampling=sampling, updates=updates, optim=optim,
                         runtime=runtime, eval_prompts=eval_prompts)
        self.save_settings(ignore=module_args(model=model, reward=reward))
        self.automatic_optimization = False
        self.policy = policy
        if policy.advantage == "group" and sampling.rollouts_per_prompt < 2:
            raise ValueError(f"sampling.rollouts_per_prompt={sampling.rollouts_per_prompt} with policy.advantage="
                             "'group': GRPO compares rollouts of the same prompt, so it needs rollouts_per_prompt >= 2 "
                             "(or use policy.advantage='running')")
        if policy.reference == "lora_base" and self.lora_rank <= 0:
            raise ValueError("policy.reference='lora_base' needs lora_rank > 0 (the LoRA-free base is the reference)")
        if not any(self.step_stds):
            raise ValueError("no stochastic step: sampling.noise_level must be > 0 and sampling.sde_steps non-empty "
                             "(policy gradients need the log-probs of noisy steps)")
        self.reward = build_reward(reward)
        self.normalizer = RunningNormalizer() if policy.advantage == "running" else None
        self.reference = None
        if policy.kl_weight > 0 and policy.reference == "copy":
            dtype = getattr(torch, policy.reference_dtype) if policy.reference_dtype else None
            self.reference = self.model.copy_frozen(dtype)

    # -- seams ----------------------------------------------------------------------------------
    def compute_rewards(self, images: Tensor, batch: dict) -> Tensor:
        """Rewards ``[B]`` of decoded images ``[B, C, H, W]`` in [-1, 1] for a (repeated) prompt batch. A NaN/inf
        score raises, or with ``runtime.nan_policy="skip"`` makes the rewards NaN so that the step is skipped and
        counted."""
        try:
            values = self.reward(images, batch["prompt"], batch["task"], **metadata_of(batch))
            return validate_rewards(values, images.shape[0], getattr(self.reward, "name", "reward"))
        except NonFiniteRewardError:
            if self.runtime.nan_policy != "skip":
                raise
            return torch.full((images.shape[0],), float("nan"), device=images.device)

    def check_reward_inputs(self, rows: Sequence[dict], source: str) -> None:
        """Score blank images for the first prompt row of each task before any rollout, so that a reward that cannot
        use the prompt set (a metadata field missing or of the wrong type, a task without a reward) fails at once,
        naming the row, instead of after the first rollout."""
        sample = list({row["task"]: row for row in reversed(list(rows))}.values())
        batch = collate_prompts(sample)
        with torch.no_grad():
            images = self.model.decode(torch.zeros((len(sample),) + self.model.sample_shape, device=self.device))
            try:
                self.compute_rewards(images, batch)
            except NonFiniteRewardError:
                pass  # blank images may score NaN; real rollouts are checked at every step
            except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
                name = getattr(self.reward, "name", "reward")
                raise ValueError(f"reward {name!r} cannot score the prompts of {source} (checked before any rollout "
                                 f"on one row per task, e.g. {sample[0]}): {e}") from e

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, PromptSource) and datamodule.train_rows:
            self.check_reward_inputs(datamodule.train_rows, repr(datamodule.train))

    def advantages(self, rewards: Tensor) -> Tensor:
        """Group-relative (GRPO) or running-normalised (DDPO) advantages ``[B]``. The running statistics
        see every rank's rewards (gathered), so all ranks keep the same normaliser."""
        if self.normalizer is None:
            adv = group_advantages(rewards, self.sampling.rollouts_per_prompt)
        else:
            self.normalizer.update(self.all_gather(rewards).flatten() if self.world_size > 1 else rewards)
            adv = self.normalizer.normalize(rewards)
        return adv.clamp(-self.policy.adv_clip, self.policy.adv_clip)

    def reference_mean(self, traj, rows, steps, cond, uncond) -> Tensor:
        """The reference policy's kernel mean at the pairs (no gradient)."""
        with torch.no_grad():
            if self.reference is not None:
                return self.kernel(self.reference, traj, rows, steps, cond, uncond)[0].float()
            with lora_disabled(self.model.net):
                return self.kernel(self.model, traj, rows, steps, cond, uncond)[0].float()

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        group_rows = repeat_rows(batch, self.sampling.rollouts_per_prompt)
        n = len(group_rows["prompt"])
        cond, uncond = self.encode(group_rows["prompt"])
        traj = self.sample_trajectories(self.model, cond, uncond, n, self.step_generator())
        with torch.no_grad():
            rewards = self.compute_rewards(self.model.decode(traj.sample), group_rows)
        if not self.check_finite("reward", rewards):
            return
        adv = self.advantages(rewards)
        cpu_gen = self.step_generator("cpu")
        rows, steps = (t.to(self.device) for t in self.training_pairs(traj, self.updates.steps_per_sample, cpu_gen))
        old_log_probs = traj.log_probs[rows, steps]
        stats, opt = defaultdict(list), self.optimizers()
        for chunk in self.minibatches(len(rows), cpu_gen):
            chunk = chunk.to(self.device)
            self._update(opt, traj, rows[chunk], steps[chunk], old_log_probs[chunk], adv, cond, uncond, stats)
        self._log_step(rewards, group_rows["task"], stats)

    def _update(self, opt, traj, rows, steps, old_log_probs, adv, cond, uncond, stats) -> None:
        policy, scale = self.policy, self.reduction_scale
        mean, std = self.kernel(self.model, traj, rows, steps, cond, uncond)
        log_probs = gaussian_log_prob(traj.latents[rows, steps + 1], mean, std)
        policy_loss = ppo_clip_loss(log_probs * scale, old_log_probs * scale, adv[rows], policy.clip_range).mean()
        loss = policy_loss
        if policy.kl_weight > 0:
            kl = gaussian_kl(mean, self.reference_mean(traj, rows, steps, cond, uncond), std).mean() * scale
            loss = loss + policy.kl_weight * kl
            stats["kl_ref"].append(kl.detach())
        if not self.apply_update(opt, loss, "policy loss"):
            return
        log_ratio = (log_probs.detach() - old_log_probs) * scale
        stats["policy_loss"].append(policy_loss.detach())
        stats["approx_kl"].append(0.5 * log_ratio.pow(2).mean())
        stats["clipfrac"].append((log_ratio.exp().sub(1).abs() > policy.clip_range).float().mean())

    def _log_step(self, rewards: Tensor, tasks: Sequence[str], stats: dict) -> None:
        self.log("train/reward", rewards.mean(), prog_bar=True)
        by_task = defaultdict(list)
        for i, task in enumerate(tasks):
            by_task[task].append(i)
        if len(by_task) > 1:
            for task, idx in by_task.items():
                self.log(f"train/reward/{task}", rewards[idx].mean())
        for name, values in stats.items():
            self.log(f"train/{name}", torch.stack(values).mean())
