"""RewardCallback: reward of a fixed evaluation prompt set, per task, during training."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch

from ..data.prompts import collate_prompts, read_prompt_file
from ..protocols import EvalSampler, HasReward
from ..rewards import build_reward, validate_rewards
from ..utils.images import make_grid_png


class RewardCallback(L.Callback):
    """Every ``every_n_steps`` training steps (and at the end of training) sample a fixed prompt set
    with the module's ODE sampler and fixed seeds, log ``eval/reward/<task>`` and ``eval/reward``, write
    a PNG grid, and keep the best checkpoint by mean reward over tasks.

    Args:
        prompts: a prompt file or ``embedded:NAME`` set, or a list of rows (dicts with ``prompt``, ``task``
            and metadata such as ``digit``), e.g. a PromptDataModule's held-out ``val_rows``.
        reward: a reward spec (see ``lit_distill.rewards.build_reward``); None: the module's own ``reward``
            (``lit_distill.protocols.HasReward``, e.g. TeacherRL's).
        num_prompts: evaluate the first N rows (None: all).
        samples_per_prompt: images drawn per prompt (more: a less noisy estimate).
        every_n_steps: evaluation period in training steps (``trainer.global_step``; 0: only at the end).
        seed: seed of the evaluation noise (the same images are drawn each time for the same weights).
        output_dir: where grids and ``best.ckpt`` go (default: the trainer's log dir / ``reward_eval``).
        save_best: write ``best.ckpt`` whenever the mean reward improves.
    The module must be a ``lit_distill.protocols.EvalSampler`` (every method is: TeacherRL, OPDStudent,
    DiffusionPretrain and the one-step generators alike); images are drawn for the rows' prompts.
    ``history`` holds ``{"step": k, "reward": mean, "<task>": mean, ...}`` for every evaluation.
    """

    def __init__(self, prompts: Union[str, list] = "embedded:digits_multitask",
                 reward: Union[str, dict, Any, None] = None, num_prompts: Optional[int] = 30,
                 samples_per_prompt: int = 1, every_n_steps: int = 50, seed: int = 0,
                 output_dir: Optional[str] = None, save_best: bool = True, batch_size: int = 64):
        rows = read_prompt_file(prompts) if isinstance(prompts, str) else list(prompts)
        rows = rows[:num_prompts] if num_prompts else rows
        self.rows = [row for row in rows for _ in range(samples_per_prompt)]
        self.reward = build_reward(reward) if reward is not None else None
        self.every_n_steps, self.seed, self.save_best, self.batch_size = every_n_steps, seed, save_best, batch_size
        self.output_dir = Path(output_dir) if output_dir else None
        self.history: list[dict] = []
        self.best = -math.inf

    def _dir(self, trainer: L.Trainer) -> Path:
        root = self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "reward_eval"
        root.mkdir(parents=True, exist_ok=True)
        return root

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict:
        if not isinstance(module, EvalSampler):
            raise TypeError(f"RewardCallback: {type(module).__name__} has no generate_eval_samples(n, generator, "
                            "prompts) (lit_distill.protocols.EvalSampler)")
        reward = self.reward or (module.reward if isinstance(module, HasReward) else None)
        if reward is None:
            raise ValueError(f"RewardCallback needs `reward`: {type(module).__name__} has no reward of its own "
                             "(e.g. OPDStudent); pass reward: {name: per_task, rewards: {...}}")
        reward.to(module.device)
        generator = torch.Generator(module.device).manual_seed(self.seed)
        images, scores = [], []
        for start in range(0, len(self.rows), self.batch_size):
            batch = collate_prompts(self.rows[start:start + self.batch_size])
            meta = {k: (v.to(module.device) if isinstance(v, torch.Tensor) else v)
                    for k, v in batch.items() if k not in ("prompt", "task")}
            x = module.generate_eval_samples(len(batch["prompt"]), generator, batch["prompt"])
            scores.append(validate_rewards(reward(x, batch["prompt"], batch["task"], **meta), x.shape[0],
                                           getattr(reward, "name", "reward")))
            images.append(x.cpu())
        scores = torch.cat(scores).cpu()
        by_task = defaultdict(list)
        for row, score in zip(self.rows, scores.tolist()):
            by_task[row["task"]].append(score)
        result = {"step": trainer.global_step, **{t: sum(v) / len(v) for t, v in by_task.items()}}
        result["reward"] = sum(result[t] for t in by_task) / len(by_task)
        self.history.append(result)
        if trainer.is_global_zero:
            make_grid_png(torch.cat(images), self._dir(trainer) / f"step_{trainer.global_step:06d}.png", nrow=10)
        return result

    def _run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.history and self.history[-1]["step"] == trainer.global_step:
            return  # already evaluated these weights
        result = self.evaluate(trainer, module)
        metrics = {("eval/reward" if k == "reward" else f"eval/reward/{k}"): v for k, v in result.items() if k != "step"}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.save_best and result["reward"] > self.best:
            self.best = result["reward"]
            trainer.save_checkpoint(self._dir(trainer) / "best.ckpt")

    def on_train_start(self, trainer, module) -> None:
        self._run(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # a step that made no update does not count: evaluate once the period has passed
        last = self.history[-1]["step"] if self.history else 0
        if self.every_n_steps and trainer.global_step - last >= self.every_n_steps:
            self._run(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._run(trainer, module)
