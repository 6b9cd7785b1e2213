"""What TeacherRL and OPDStudent share: a trained denoiser that samples its own training data.

The module owns the trained model (full fine-tune or LoRA), the sampling grid and per-step noise
levels, prompt encoding (frozen text encoder), the rollout through the one shared sampler, the
recomputation of the kernel of chosen (sample, step) pairs with gradient, and their minibatches.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..diffusion import Trajectory, guided_prediction, noise_levels, rollout, sample, window_start
from ..diffusion.schedules import SamplingGrid
from ..models.compilation import cuda_graph_denoiser, drop_compiled, new_graph_step
from ..models.diffusion_model import DiffusionModel
from ..models.lora import add_lora, merge_lora, save_lora
from ..utils import eval_mode
from .base import DistillModule
from .settings import Optim, Runtime, Sampling, Updates
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
        model: the trained model's source (see ``load_source``); ``model_kwargs`` its loader arguments.
        lora_rank: 0 trains the whole denoiser; > 0 trains LoRA adapters of that rank only.
        sampling: :class:`~lit_distill.methods.settings.Sampling` (rollouts and evaluation images).
        updates: :class:`~lit_distill.methods.settings.Updates` (which pairs of a rollout train, in which batches).
        optim, runtime, eval_prompts: see :class:`~lit_distill.methods.base.DistillModule`.

    One training step (``trainer.global_step`` + 1, what ``max_steps`` counts) is one prompt batch: its
    rollouts, then every optimiser update on them (``inner_epochs`` passes of minibatches).
    """

    def __init__(self, model: "str | DiffusionModel", model_kwargs: Optional[dict], *, lora_rank: int,
                 sampling: Sampling, updates: Updates, optim: Optim, runtime: Runtime,
                 eval_prompts: Optional[list[str]]):
        super().__init__(optim=optim, runtime=runtime, eval_prompts=eval_prompts)
        if int(sampling.num_steps * updates.timestep_fraction) < 1:
            raise ValueError(f"updates.timestep_fraction={updates.timestep_fraction}: with sampling.num_steps="
                             f"{sampling.num_steps} no step would be trained; need int(num_steps * timestep_fraction) "
                             ">= 1")
        self.sampling, self.updates, self.lora_rank = sampling, updates, int(lora_rank)
        self.model: DiffusionModel = load_source(model, **(model_kwargs or {}))
        self.model.requires_grad_(False)
        if self.lora_rank > 0:
            add_lora(self.model.net, rank=self.lora_rank)
        else:
            self.model.net.requires_grad_(True)
        self.prepare_network(self.model.net)
        self.levels = noise_levels(sampling.num_steps, sampling.noise_level, sampling.sde_steps)
        grid = self.model.schedule.grid(sampling.num_steps)
        # host copy of each step's kernel std: which steps have a density, known without a device sync
        self.step_stds = [float(self.model.schedule.kernel_std(grid.at(i), level)) for i, level in enumerate(self.levels)]
        self.step_lengths = (grid.sigma_t - grid.sigma_s).tolist()  # how far each step moves the noise level
        self.train_steps = int(sampling.num_steps * updates.timestep_fraction)  # steps 0 .. train_steps - 1 train
        window = sampling.sde_window
        self.window_span = None if window is None else (window.range or (0, self.train_steps))
        if self.window_span is not None and (self.window_span[1] > self.train_steps
                                             or window.size > self.window_span[1] - self.window_span[0]):
            raise ValueError(f"sampling.sde_window={window}: the window of {window.size} steps must lie within the "
                             f"trained steps 0..{self.train_steps - 1} (num_steps * updates.timestep_fraction); "
                             "shorten it or change its range")
        # log-densities and KLs of a step: summed over the D elements of a sample, or per element
        self.reduction_scale = 1.0 if updates.reduction == "sum" else 1.0 / torch.Size(self.model.sample_shape).numel()
        self._grids: dict[tuple, SamplingGrid] = {}
        self._graphed_rollout: dict[str, Callable] = {}  # CUDA-graph denoiser (a plain dict: not a submodule)
        self.current_step = 0  # the training step in progress (``on_train_batch_start``)

    # -- pieces ---------------------------------------------------------------------------------
    def grid(self, num_steps: Optional[int] = None) -> SamplingGrid:
        key = (num_steps or self.sampling.num_steps, str(self.device))
        if key not in self._grids:
            self._grids[key] = self.model.schedule.grid(key[0], device=self.device)
        return self._grids[key]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[Optional[dict], Optional[dict]]:
        """``(cond, uncond)`` for the prompts; ``uncond`` only when guidance is on."""
        cond = self.model.encode_prompts(list(prompts))
        uncond = self.model.null_cond(len(prompts)) if self.sampling.guidance_scale != 1.0 else None
        return cond, uncond

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # trainer.global_step moves on at the first optimiser update of a step: keep the index of the step in progress
        self.current_step = self.global_step

    def window_steps(self, step: Optional[int] = None) -> Optional[range]:
        """The steps of ``sampling.sde_window`` at training step ``step`` (default: the step in progress,
        ``current_step``); None without a window. A function of (``runtime.seed``, step) alone: the same on every rank
        and after a resume."""
        window = self.sampling.sde_window
        if window is None:
            return None
        step = self.current_step if step is None else step
        first = window_start(window.size, *self.window_span, window.mode, step, self.seed, window.shift_every,
                             window.stride)
        return range(first, first + window.size)

    def rollout_levels(self) -> list[float]:
        """Per-step noise levels of this training step's rollouts: ``sampling.noise_level`` on the stochastic steps
        (``sampling.sde_steps``, the window's steps, or all), 0 (ODE) elsewhere."""
        window = self.window_steps()
        if window is None:
            return self.levels
        return noise_levels(self.sampling.num_steps, self.sampling.noise_level, window)

    def trained_steps(self, stochastic_only: bool = True) -> Tensor:
        """The steps whose (sample, step) pairs may enter this training step's loss: the first ``train_steps``, within
        the window when there is one, and with a density (std > 0) when ``stochastic_only``. A CPU LongTensor."""
        window = self.window_steps()
        allowed = torch.zeros(len(self.levels), dtype=torch.bool)
        allowed[:self.train_steps] = True
        if window is not None:
            inside = torch.zeros_like(allowed)
            inside[window.start:window.stop] = True
            allowed &= inside
        if stochastic_only:
            levels = self.rollout_levels()
            allowed &= torch.tensor([std > 0 and level > 0 for std, level in zip(self.step_stds, levels)])
        return torch.nonzero(allowed).flatten()

    def rollout_denoiser(self, model: DiffusionModel) -> Callable:
        """What the rollout calls: ``model``, or with ``runtime.rollout_cuda_graphs`` its CUDA-graph compilation
        (made on first use; it shares the model's parameters)."""
        if not self.runtime.rollout_cuda_graphs or model is not self.model:
            return model
        if "model" not in self._graphed_rollout:
            graphed = cuda_graph_denoiser(model)

            def denoiser(x_t: Tensor, timestep: Tensor, cond: Optional[dict]) -> Tensor:
                new_graph_step()  # the previous step's prediction has been used: its buffer may be reused
                return graphed(x_t, timestep, cond)

            self._graphed_rollout["model"] = denoiser
        return self._graphed_rollout["model"]

    @torch.no_grad()
    def sample_trajectories(self, model: DiffusionModel, cond, uncond, batch_size: int,
                            generator: torch.Generator) -> Trajectory:
        """SDE rollouts of ``model`` in eval mode under ``torch.no_grad``, with this step's
        :meth:`rollout_levels`."""
        noise = torch.randn((batch_size,) + model.sample_shape, generator=generator, device=self.device)
        with eval_mode(model):
            return rollout(self.rollout_denoiser(model), noise, cond, model.schedule, self.grid(),
                           noise_level=self.rollout_levels(), generator=generator,
                           guidance_scale=self.sampling.guidance_scale, uncond=uncond, store_means=False)

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
        scale = self.sampling.guidance_scale if guidance_scale is None else guidance_scale
        prediction = guided_prediction(model, x, grid.timesteps, pick(cond), pick(uncond), scale)
        levels = traj.noise_levels[steps]
        return model.schedule.kernel(prediction.float(), x, grid, levels)

    def training_pairs(self, traj: Trajectory, steps_per_sample: Optional[int], generator: torch.Generator,
                       stochastic_only: bool = True):
        """``(rows, steps)`` LongTensors ``[M]``: for each sample, ``steps_per_sample`` steps drawn
        without replacement (all of them if None) among the :meth:`trained_steps` (stochastic ones, or all), in
        random order (Flow-GRPO's denoising reduction). ``generator`` and the results are on the CPU, so that
        routing and chunking never read device memory back."""
        stochastic = self.trained_steps(stochastic_only)
        k = len(stochastic) if steps_per_sample is None else min(steps_per_sample, len(stochastic))
        batch = traj.latents.shape[0]
        scores = torch.rand(batch, len(stochastic), generator=generator)
        chosen = stochastic[scores.argsort(dim=1)[:, :k]]  # [B, k]
        rows = torch.arange(batch).repeat_interleave(k)
        return rows, chosen.flatten()

    def minibatches(self, num_pairs: int, generator: torch.Generator) -> Iterator[Tensor]:
        """Index chunks (CPU LongTensors) of ``updates.minibatch_size`` pairs: ``updates.inner_epochs`` passes, each
        in a new random order from ``generator``."""
        for _ in range(self.updates.inner_epochs):
            yield from torch.randperm(num_pairs, generator=generator).split(self.updates.minibatch_size)

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
            x = sample(self.model, noise.to(self.device), cond, self.model.schedule, self.sampling.eval_steps,
                       guidance_scale=self.sampling.guidance_scale, uncond=uncond)
            return self.model.decode(x)

    @contextmanager
    def exported_model(self) -> Iterator[DiffusionModel]:
        """The trained model as exported: ``self.model``, or a copy with the LoRA adapters merged."""
        if self.lora_rank > 0:
            merged = copy.deepcopy(self.model)
            merged.net = merge_lora(drop_compiled(merged.net))
            yield merged
        else:
            yield self.model

    def export(self, path) -> Path:
        """Write the trained model as a diffusers-style directory loadable by ``load_model(path)``
        (LoRA merged into a copy) and, when training LoRA, the adapter alone under ``path/lora`` in the
        diffusers format (``pipe.load_lora_weights(path/"lora")``)."""
        path = super().export(path)
        if self.lora_rank > 0:
            save_lora(self.model.net, path / "lora")  # after save_pretrained, which replaces the directory
        return path

    def images_per_batch(self, batch: dict[str, Any]) -> int:
        """Rollouts of one training step: prompts x rollouts per prompt."""
        return len(batch["prompt"]) * self.sampling.rollouts_per_prompt

    def configure_optimizers(self):
        return self.make_optimizer(self.model.net.parameters())
