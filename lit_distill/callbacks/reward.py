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
    """At the start of training, every ``every_n_steps`` training steps and at the end, sample a fixed prompt
    set with the module's ODE sampler and fixed seeds, log ``eval/reward/<task>`` and ``eval/reward``, write
    a PNG grid (``step_NNNNNN.png``: a row per prompt, labelled with its task and prompt), and keep the best
    checkpoint by mean reward over tasks.

    Args:
        prompts: a prompt file or ``embedded:NAME`` set, or a list of rows (dicts with ``prompt``, ``task``
            and metadata such as ``digit``), e.g. a PromptDataModule's held-out ``val_rows``.
        reward: a reward spec (see ``lit_distill.rewards.build_reward``); None: the module's own ``reward``
            (``lit_distill.protocols.HasReward``, e.g. TeacherRL's).
        num_prompts: evaluate N rows, taken in turn from each task (None: all).
        samples_per_prompt: images drawn per prompt (more: a less noisy estimate).
        every_n_steps: evaluation period in training steps (``trainer.global_step``; 0: only at the end).
        seed: seed of the evaluation noise (the same images are drawn each time for the same weights).
        output_dir: where grids and ``best.ckpt`` go (default: the trainer's log dir / ``reward_eval``).
        save_best: write ``best.ckpt`` whenever the mean reward improves.
        eval_at_start: evaluate the starting weights too (False: when another run already scored them).
        grid_prompts: prompts shown in each grid (spread over the tasks), ``samples_per_prompt`` images each.
    The module must be a ``lit_distill.protocols.EvalSampler`` (every method is: TeacherRL, OPDStudent,
    DiffusionPretrain and the one-step generators alike); images are drawn for the rows' prompts.
    ``history`` holds ``{"step": k, "reward": mean, "<task>": mean, ...}`` for every evaluation.
    """

    def __init__(self, prompts: Union[str, list] = "embedded:digits_multitask",
                 reward: Union[str, dict, Any, None] = None, num_prompts: Optional[int] = 30,
                 samples_per_prompt: int = 1, every_n_steps: int = 50, seed: int = 0,
                 output_dir: Optional[str] = None, save_best: bool = True, batch_size: int = 64,
                 eval_at_start: bool = True, grid_prompts: int = 12):
        rows = read_prompt_file(prompts) if isinstance(prompts, str) else list(prompts)
        rows = [rows[i] for i in spread_over_tasks(rows, num_prompts)] if num_prompts else rows
        self.samples_per_prompt = samples_per_prompt
        self.rows = [row for row in rows for _ in range(samples_per_prompt)]
        self.grid_rows = spread_over_tasks(rows, grid_prompts)
        self.eval_at_start = eval_at_start
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
    def score(self, module: L.LightningModule, grid: Optional[Path] = None) -> dict:
        """Mean reward per task of ``module``'s samples of the prompt set, and ``"reward"``, their mean over
        tasks; writes the labelled grid to ``grid`` when given. Needs no trainer (e.g. to score a base model)."""
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
        result = {t: sum(v) / len(v) for t, v in by_task.items()}
        result["reward"] = sum(result.values()) / len(result)
        if grid is not None:
            self.write_grid(torch.cat(images), grid)
        return result

    def write_grid(self, images: torch.Tensor, path: Path) -> Path:
        """The images of the ``grid_prompts`` shown prompts: a row per prompt, labelled ``task: prompt``."""
        k = self.samples_per_prompt
        shown = torch.cat([images[i * k:(i + 1) * k] for i in self.grid_rows])
        prompt_rows = self.rows[::k]
        labels = [f"{prompt_rows[i]['task']}: {prompt_rows[i]['prompt']}" for i in self.grid_rows]
        return make_grid_png(shown, path, nrow=k, row_labels=labels, scale=3)

    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict:
        """:meth:`score` at the current step, appended to ``history`` (the grid is written on rank zero)."""
        grid = self._dir(trainer) / f"step_{trainer.global_step:06d}.png" if trainer.is_global_zero else None
        result = {"step": trainer.global_step, **self.score(module, grid)}
        self.history.append(result)
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
            trainer.save_checkpoint(self._dir(trainer) / "best.ckpt", weights_only=False)

    def on_train_start(self, trainer, module) -> None:
        if self.eval_at_start:
            self._run(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # a step that made no update does not count: evaluate once the period has passed
        last = self.history[-1]["step"] if self.history else 0
        if self.every_n_steps and trainer.global_step - last >= self.every_n_steps:
            self._run(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self._run(trainer, module)


def spread_over_tasks(rows: list[dict], count: int) -> list[int]:
    """Indices of up to ``count`` of ``rows`` in file order, taken in turn from each task (in order of first
    appearance), so that a subset of a multi-task prompt set holds every task (of one task: its first rows)."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_task[row["task"]].append(i)
    queues = list(by_task.values())
    picked: list[int] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        picked += [q[depth] for q in queues if depth < len(q)]
    return sorted(picked[:count])
