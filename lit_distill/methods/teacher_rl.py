"""TeacherRL: reward fine-tuning of a diffusion / flow model by policy gradient over SDE rollouts."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from ..data.prompts import collate_prompts
from ..diffusion import gaussian_kl, gaussian_log_prob
from ..losses import RunningNormalizer, group_advantages, ppo_clip_loss
from ..models.lora import lora_disabled
from ..rewards import NonFiniteRewardError, build_reward, validate_rewards
from ..protocols import PromptSource
from .base import check_at_least_one, module_args
from .on_policy import OnPolicyModule, metadata_of, repeat_rows


class TeacherRL(OnPolicyModule):
    """GRPO / DDPO fine-tuning of one model on one task's reward.

    Each training step takes a batch of P prompts, rolls out ``group_size`` (G) SDE samples per prompt
    with the shared rollout function, scores them, turns rewards into advantages (per-prompt groups:
    GRPO; running normaliser: DDPO), then runs ``inner_epochs`` passes of the PPO-clipped per-step
    policy loss over (sample, step) pairs in minibatches, each an optimiser step, plus
    ``kl_weight`` times the closed-form per-step KL to the frozen reference.

    Args (beyond :class:`OnPolicyModule`'s):
        reward: a registered reward name, a reward config dict, or a ``Reward`` (see ``lit_distill.rewards``).
        group_size: rollouts per prompt (G >= 2 for GRPO).
        advantage: ``"group"`` (GRPO) or ``"running"`` (DDPO's running reward normalisation).
        adv_clip: advantages are clipped to ``[-adv_clip, adv_clip]``.
        steps_per_sample: train on this many random stochastic steps of each rollout (None: all).
        inner_epochs: passes over one rollout batch; minibatch_size: (sample, step) pairs per update.
        clip_range: PPO ratio clip; kl_weight: beta of the KL to the reference (0: no reference kept).
        reference: ``"copy"`` (a frozen copy of the initial model, in ``reference_dtype``) or
            ``"lora_base"`` (the model with LoRA disabled: no copy; needs ``lora_rank > 0``).
        logprob_reduction: ``"sum"`` (exact log-density of the step) or ``"mean"`` (per element, as
            DDPO / Flow-GRPO: divides log-probs and KLs by the number of elements D).
        max_grad_norm: gradient clipping by global norm (None: off).
    """

    method = "teacher_rl"

    def __init__(self, model: str = "embedded:base", reward: Union[str, dict, Any] = "digit_correctness",
                 model_kwargs: Optional[dict] = None, *, lora_rank: int = 0, num_steps: int = 10,
                 noise_level: float = 0.7, sde_steps: Optional[Sequence[int]] = None, guidance_scale: float = 1.0,
                 timestep_fraction: float = 1.0, eval_steps: int = 20, group_size: int = 8, advantage: Literal["group", "running"] = "group",
                 adv_clip: float = 5.0, steps_per_sample: Optional[int] = None, inner_epochs: int = 1,
                 minibatch_size: int = 64, clip_range: float = 0.2, kl_weight: float = 0.0,
                 reference: Literal["copy", "lora_base"] = "copy", reference_dtype: Optional[str] = None,
                 logprob_reduction: Literal["sum", "mean"] = "sum", max_grad_norm: Optional[float] = 1.0,
                 lr: float = 1e-5, weight_decay: float = 0.0, nan_policy: str = "raise", compile: bool = False,
                 gradient_checkpointing: bool = False, seed: int = 0):
        super().__init__(model, model_kwargs, lora_rank=lora_rank, num_steps=num_steps, noise_level=noise_level,
                         sde_steps=sde_steps, guidance_scale=guidance_scale, eval_steps=eval_steps, seed=seed,
                         timestep_fraction=timestep_fraction, lr=lr, weight_decay=weight_decay, nan_policy=nan_policy, compile=compile,
                         gradient_checkpointing=gradient_checkpointing)
        self.save_hyperparameters(ignore=module_args(model=model, reward=reward))
        self.automatic_optimization = False
        check_at_least_one(group_size=group_size, inner_epochs=inner_epochs, minibatch_size=minibatch_size)
        if advantage not in ("group", "running"):
            raise ValueError(f"advantage={advantage!r}: choose 'group' (GRPO) or 'running' (DDPO)")
        if advantage == "group" and group_size < 2:
            raise ValueError(f"group_size={group_size} with advantage='group': GRPO compares rollouts of the "
                             "same prompt, so it needs group_size >= 2 (or use advantage='running')")
        if logprob_reduction not in ("sum", "mean"):
            raise ValueError(f"logprob_reduction={logprob_reduction!r}: choose 'sum' or 'mean'")
        if reference == "lora_base" and lora_rank <= 0:
            raise ValueError("reference='lora_base' needs lora_rank > 0 (the LoRA-free base is the reference)")
        if not any(self.step_stds):
            raise ValueError("no stochastic step: noise_level must be > 0 and sde_steps non-empty "
                             "(policy gradients need the log-probs of noisy steps)")
        self.reward = build_reward(reward)
        self.normalizer = RunningNormalizer() if advantage == "running" else None
        self.reference = None
        if kl_weight > 0 and reference == "copy":
            dtype = getattr(torch, reference_dtype) if reference_dtype else None
            self.reference = self.model.copy_frozen(dtype)
        self.cfg = dict(group_size=group_size, adv_clip=adv_clip, steps_per_sample=steps_per_sample,
                        inner_epochs=inner_epochs, minibatch_size=minibatch_size, clip_range=clip_range,
                        kl_weight=kl_weight, reference=reference, max_grad_norm=max_grad_norm)
        self.rollouts_per_prompt = group_size
        self.logprob_scale = 1.0 if logprob_reduction == "sum" else 1.0 / torch.Size(self.model.sample_shape).numel()

    # -- seams ----------------------------------------------------------------------------------
    def compute_rewards(self, images: Tensor, batch: dict) -> Tensor:
        """Rewards ``[B]`` of decoded images ``[B, C, H, W]`` in [-1, 1] for a (repeated) prompt batch. A NaN/inf
        score raises, or with ``nan_policy='skip'`` makes the rewards NaN so that the step is skipped and counted."""
        try:
            values = self.reward(images, batch["prompt"], batch["task"], **metadata_of(batch))
            return validate_rewards(values, images.shape[0], getattr(self.reward, "name", "reward"))
        except NonFiniteRewardError:
            if self.nan_policy != "skip":
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
            adv = group_advantages(rewards, self.cfg["group_size"])
        else:
            distributed = self._trainer is not None and self.trainer.world_size > 1
            self.normalizer.update(self.all_gather(rewards).flatten() if distributed else rewards)
            adv = self.normalizer.normalize(rewards)
        return adv.clamp(-self.cfg["adv_clip"], self.cfg["adv_clip"])

    def reference_mean(self, traj, rows, steps, cond, uncond) -> Tensor:
        """The reference policy's kernel mean at the pairs (no gradient)."""
        with torch.no_grad():
            if self.reference is not None:
                return self.kernel(self.reference, traj, rows, steps, cond, uncond)[0].float()
            with lora_disabled(self.model.net):
                return self.kernel(self.model, traj, rows, steps, cond, uncond)[0].float()

    # -- training -------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        cfg = self.cfg
        group = repeat_rows(batch, cfg["group_size"])
        n = len(group["prompt"])
        cond, uncond = self.encode(group["prompt"])
        traj = self.sample_trajectories(self.model, cond, uncond, n, self.step_generator())
        with torch.no_grad():
            rewards = self.compute_rewards(self.model.decode(traj.sample), group)
        if not self.check_finite("reward", rewards):
            return
        adv = self.advantages(rewards)
        cpu_gen = self.step_generator(torch.device("cpu"))
        rows, steps = (t.to(self.device) for t in self.training_pairs(traj, cfg["steps_per_sample"], cpu_gen))
        old_log_probs = traj.log_probs[rows, steps]
        stats = defaultdict(list)
        opt = self.optimizers()
        for _ in range(cfg["inner_epochs"]):
            for chunk in torch.randperm(len(rows), generator=cpu_gen).to(self.device).split(cfg["minibatch_size"]):
                self._update(opt, traj, rows[chunk], steps[chunk], old_log_probs[chunk], adv, cond, uncond, stats)
        self._log_step(rewards, group["task"], stats)

    def _update(self, opt, traj, rows, steps, old_log_probs, adv, cond, uncond, stats) -> None:
        cfg, scale = self.cfg, self.logprob_scale
        mean, std = self.kernel(self.model, traj, rows, steps, cond, uncond)
        log_probs = gaussian_log_prob(traj.latents[rows, steps + 1], mean, std)
        policy_loss = ppo_clip_loss(log_probs * scale, old_log_probs * scale, adv[rows], cfg["clip_range"]).mean()
        loss = policy_loss
        if cfg["kl_weight"] > 0:
            kl = gaussian_kl(mean, self.reference_mean(traj, rows, steps, cond, uncond), std).mean() * scale
            loss = loss + cfg["kl_weight"] * kl
            stats["kl_ref"].append(kl.detach())
        if not self.apply_update(opt, loss, "policy loss", cfg["max_grad_norm"]):
            return
        log_ratio = (log_probs.detach() - old_log_probs) * scale
        stats["policy_loss"].append(policy_loss.detach())
        stats["approx_kl"].append(0.5 * log_ratio.pow(2).mean())
        stats["clipfrac"].append((log_ratio.exp().sub(1).abs() > cfg["clip_range"]).float().mean())

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
