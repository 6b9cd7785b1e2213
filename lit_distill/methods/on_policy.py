"""What TeacherRL and OPDStudent share: a trained denoiser that samples its own training data.

The module owns the trained model (full fine-tune or LoRA), the sampling grid and per-step noise
levels, prompt encoding (frozen text encoder), the rollout through the one shared sampler, and the
recomputation of the kernel of chosen (sample, step) pairs with gradient.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..diffusion import Trajectory, guided_prediction, noise_levels, rollout, sample
from ..diffusion.schedules import SamplingGrid
from ..models.diffusion_model import DiffusionModel
from ..models.lora import add_lora, merge_lora, save_lora
from ..utils import eval_mode
from .base import DistillModule, check_at_least_one
from .checkpoints import load_source


def repeat_rows(batch: dict[str, Any], times: int) -> dict[str, Any]:
    """Repeat every row of a prompt batch ``times`` times, consecutively (groups of one prompt)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, Tensor):
            out[key] = value.repeat_interleave(times, dim=0)
        else:
            out[key] = [v for v in value for _ in range(times)]
    return out


def metadata_of(batch: dict[str, Any]) -> dict[str, Any]:
    """The fields of a prompt batch other than ``prompt`` and ``task`` (e.g. ``digit``), for rewards."""
    return {k: v for k, v in batch.items() if k not in ("prompt", "task")}


class OnPolicyModule(DistillModule):
    """Base of TeacherRL and OPDStudent (see their docstrings for the arguments they add).

    Args:
        model: the trained model's source (see ``load_model``); ``model_kwargs`` its loader arguments.
        lora_rank: 0 trains the whole denoiser; > 0 trains LoRA adapters of that rank only.
        num_steps: sampling steps of a rollout.
        noise_level: eta (VP, DDIM) or a (rectified flow) of the stochastic steps.
        sde_steps: which steps are stochastic (None: all); the others are ODE steps.
        guidance_scale: classifier-free guidance in rollouts and in recomputed kernels (1: off).
        timestep_fraction: train on the first ``int(num_steps * timestep_fraction)`` steps of each rollout only
            (Flow-GRPO's and DiffusionOPD's ``train.timestep_fraction``; their 0.99 with 10 steps leaves out the
            last step, whose kernel std is near zero on a flow grid).
        eval_steps: ODE steps of evaluation samples (``generate_eval_samples``).
        seed: base seed of rollout noise; step ``k`` on rank ``r`` draws from ``seed + k * 1009 + r``,
            so a resumed run draws the same noise as an uninterrupted one.
        eval_prompts: prompts cycled by ``generate_eval_samples`` when the caller gives none.
    """

    def __init__(self, model: str, model_kwargs: Optional[dict], *, lora_rank: int, num_steps: int,
                 noise_level: float, sde_steps: Optional[Sequence[int]], guidance_scale: float,
                 eval_steps: int, seed: int, timestep_fraction: float = 1.0,
                 eval_prompts: Optional[list[str]] = None, **base: Any):
        super().__init__(**base)
        check_at_least_one(num_steps=num_steps, eval_steps=eval_steps)
        if not 0 < timestep_fraction <= 1 or int(num_steps * timestep_fraction) < 1:
            raise ValueError(f"timestep_fraction={timestep_fraction}: need 0 < timestep_fraction <= 1 with at least "
                             f"one of the num_steps={num_steps} steps trained (int(num_steps * timestep_fraction) >= 1)")
        self.model: DiffusionModel = load_source(model, **(model_kwargs or {}))
        self.model.requires_grad_(False)
        if lora_rank > 0:
            add_lora(self.model.net, rank=lora_rank)
        else:
            self.model.net.requires_grad_(True)
        self.prepare_network(self.model.net)
        self.num_steps, self.guidance_scale, self.eval_steps, self.seed = num_steps, guidance_scale, eval_steps, seed
        self.eval_prompts = eval_prompts
        self.levels = noise_levels(num_steps, noise_level, sde_steps)
        grid = self.model.schedule.grid(num_steps)
        # host copy of each step's kernel std: which steps have a density, known without a device sync
        self.step_stds = [float(self.model.schedule.kernel_std(grid.at(i), level)) for i, level in enumerate(self.levels)]
        self.step_lengths = (grid.sigma_t - grid.sigma_s).tolist()  # how far each step moves the noise level
        self.train_steps = int(num_steps * timestep_fraction)  # steps 0 .. train_steps - 1 enter the loss
        self._grids: dict[tuple, SamplingGrid] = {}

    def setup(self, stage: str) -> None:
        self.maybe_compile(self.model.net)

    # -- pieces ---------------------------------------------------------------------------------
    def grid(self, num_steps: Optional[int] = None) -> SamplingGrid:
        key = (num_steps or self.num_steps, str(self.device))
        if key not in self._grids:
            self._grids[key] = self.model.schedule.grid(key[0], device=self.device)
        return self._grids[key]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[Optional[dict], Optional[dict]]:
        """``(cond, uncond)`` for the prompts; ``uncond`` only when guidance is on."""
        cond = self.model.encode_prompts(list(prompts))
        uncond = self.model.null_cond(len(prompts)) if self.guidance_scale != 1.0 else None
        return cond, uncond

    @torch.no_grad()
    def sample_trajectories(self, model: DiffusionModel, cond, uncond, batch_size: int,
                            generator: torch.Generator) -> Trajectory:
        """SDE rollouts of ``model`` in eval mode under ``torch.no_grad``."""
        noise = torch.randn((batch_size,) + model.sample_shape, generator=generator, device=self.device)
        with eval_mode(model):
            return rollout(model, noise, cond, model.schedule, self.grid(), noise_level=self.levels,
                           generator=generator, guidance_scale=self.guidance_scale, uncond=uncond, store_means=False)

    def kernel(self, model: DiffusionModel, traj: Trajectory, rows: Tensor, steps: Tensor,
               cond: Optional[dict], uncond: Optional[dict],
               guidance_scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
        """Mean and std of ``model``'s kernel at ``(rows, steps)`` pairs of a trajectory ``[M]``, with classifier-free
        guidance ``guidance_scale`` (default: the rollouts' ``guidance_scale``).

        Gradient flows into ``model`` unless called under ``no_grad``; ``x_t`` comes from the
        trajectory and is never differentiated."""
        pick = lambda c: None if c is None else {k: v[rows] for k, v in c.items()}  # noqa: E731
        x = traj.latents[rows, steps]
        grid = self.grid().at(steps)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        prediction = guided_prediction(model, x, grid.timesteps, pick(cond), pick(uncond), scale)
        levels = traj.noise_levels[steps]
        return model.schedule.kernel(prediction.float(), x, grid, levels)

    def training_pairs(self, traj: Trajectory, steps_per_sample: Optional[int], generator: torch.Generator,
                       stochastic_only: bool = True):
        """``(rows, steps)`` LongTensors ``[M]``: for each sample, ``steps_per_sample`` steps drawn
        without replacement (all of them if None) among the stochastic steps (or all steps) of the first
        ``train_steps``, in random order (Flow-GRPO's denoising reduction). ``generator`` and the results are on
        the CPU, so that routing and chunking never read device memory back."""
        candidates = torch.tensor(self.step_stds) > 0 if stochastic_only else torch.ones(len(self.levels), dtype=torch.bool)
        candidates[self.train_steps:] = False
        stochastic = torch.nonzero(candidates).flatten()
        k = len(stochastic) if steps_per_sample is None else min(steps_per_sample, len(stochastic))
        batch = traj.latents.shape[0]
        scores = torch.rand(batch, len(stochastic), generator=generator)
        chosen = stochastic[scores.argsort(dim=1)[:, :k]]  # [B, k]
        rows = torch.arange(batch).repeat_interleave(k)
        return rows, chosen.flatten()

    # -- evaluation, export --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_eval_samples(self, n: int, generator: torch.Generator,
                              prompts: Optional[Sequence[str]] = None) -> Tensor:
        """``lit_distill.protocols.EvalSampler``: ``n`` images in [-1, 1] from the ODE sampler with ``eval_steps``
        steps (and the rollouts' guidance scale)."""
        prompts = self.eval_prompts_for(n, prompts)
        noise = torch.randn((n,) + self.model.sample_shape, generator=generator, device=generator.device)
        with eval_mode(self.model):
            cond, uncond = self.encode(prompts)
            x = sample(self.model, noise.to(self.device), cond, self.model.schedule, self.eval_steps,
                       guidance_scale=self.guidance_scale, uncond=uncond)
            return self.model.decode(x)

    @contextmanager
    def exported_model(self) -> Iterator[DiffusionModel]:
        """The trained model as exported: ``self.model``, or a copy with the LoRA adapters merged."""
        if self.hparams.get("lora_rank", 0) > 0:
            merged = copy.deepcopy(self.model)
            merged.net = merge_lora(merged.net)
            yield merged
        else:
            yield self.model

    def export(self, path) -> Path:
        """Write the trained model as a diffusers-style directory loadable by ``load_model(path)``
        (LoRA merged into a copy) and, when training LoRA, the adapter alone under ``path/lora`` in the
        diffusers format (``pipe.load_lora_weights(path/"lora")``)."""
        path = super().export(path)
        if self.hparams.get("lora_rank", 0) > 0:
            save_lora(self.model.net, path / "lora")  # after save_pretrained, which replaces the directory
        return path

    def images_per_batch(self, batch: dict[str, Any]) -> int:
        """Rollouts of one training step: prompts x rollouts per prompt."""
        return len(batch["prompt"]) * self.rollouts_per_prompt

    def configure_optimizers(self):
        return self.make_optimizer(self.model.net.parameters())
