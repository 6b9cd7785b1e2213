"""What the one-step students share: a generator made from the teacher, its EMA, and the pieces of their steps.

:class:`OneStepModule` trains ``generator`` (a :class:`~lit_distill.diffusion.OneStepGenerator` around a copy of
the teacher's network) against an *auxiliary* network that a subclass builds and trains (a fake score for
DisBack / Diff-Instruct, a density-ratio classifier for NoDistillOneStep). Each subclass writes its own
``training_step`` as rollout -> loss -> step, once for the auxiliary network and, every
``optim.aux_updates_per_generator_update``-th auxiliary update, once for the generator (the shape of
Lightning's GAN example); the two optimisers are ``[generator, auxiliary]``.

One training step (``trainer.global_step`` + 1, what ``max_steps`` counts) is one batch; ``generator_updates`` /
``auxiliary_updates`` count each network's updates (logged, checkpointed). Every random number of a step comes
from :meth:`~lit_distill.methods.base.DistillModule.step_generator`, a function of (seed, step, rank), so a
resumed run continues exactly. Multi-GPU runs need DDP with ``find_unused_parameters`` (each backward uses one
network only): ``ddp_find_unused_parameters = True`` tells ``DiffusionDDPStrategy`` so.

Seams for subclasses and users: :meth:`sample_timesteps` (``p(t)`` on ``[t_min, t_max]``), :meth:`weight`
(``w(t)``) and :meth:`generator_turn` (the update schedule).
"""
from __future__ import annotations

import json
from abc import ABCMeta, abstractmethod
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..diffusion import OneStepGenerator, expand_like
from ..losses.score_distillation import score_weight
from ..models.diffusion_model import DiffusionModel
from ..models.ema import EMA
from ..utils import eval_mode
from .base import DistillModule
from .settings import Generator, Noising, OneStepOptim, Runtime


def reinitialize(net: nn.Module, seed: int = 0) -> nn.Module:
    """A randomly initialised network of ``net``'s diffusers class and config (``from_config``), same dtype."""
    if not hasattr(type(net), "from_config"):
        raise ValueError(f"init='random' needs a diffusers model (with from_config); got {type(net).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(net).from_config(net.config)
    dtype = next(net.parameters()).dtype
    return fresh if next(fresh.parameters()).dtype == dtype else fresh.to(dtype=dtype)


def trainable_copy(model: DiffusionModel, init: str = "teacher", seed: int = 0) -> DiffusionModel:
    """A copy of ``model`` whose denoiser is trainable, starting from ``model``'s weights (``init='teacher'``)
    or from random weights of the same architecture (``'random'``). Prompt encoder and VAE stay shared."""
    if init not in ("teacher", "random"):
        raise ValueError(f"init={init!r}: choose 'teacher' or 'random'")
    copy = model.copy_frozen()
    if init == "random":
        copy.net = reinitialize(copy.net, seed)
    copy.net.requires_grad_(True)
    copy.net.train()
    return copy


class OneStepModule(DistillModule, metaclass=ABCMeta):
    """Base of :class:`DisBackStudent` and :class:`NoDistillOneStep`.

    Args:
        teacher: the loaded teacher (the subclasses take its source, resolve it with ``load_source`` and keep the
            source string in their hyper-parameters). Its prompt encoder (and VAE) are frozen and shared by every
            copy.
        generator: :class:`~lit_distill.methods.settings.Generator` (init, t_star, EMA decay).
        noising: :class:`~lit_distill.methods.settings.Noising` (where samples are noised, ``w(t)``).
        optim: :class:`~lit_distill.methods.settings.OneStepOptim` (both networks; ``aux_lr``; update ratio).
        runtime, eval_prompts: see :class:`~lit_distill.methods.base.DistillModule`.
    Batches: ``{"prompt": list[str], ...}`` (``ImageDataModule`` or ``PromptDataModule``); NoDistillOneStep
    also needs ``"image"``.
    """

    method = "one_step"
    ddp_find_unused_parameters = True  # each backward trains one of the two networks

    def __init__(self, teacher: DiffusionModel, *, generator: Generator, noising: Noising, optim: OneStepOptim,
                 runtime: Runtime, eval_prompts: Optional[list[str]]):
        super().__init__(optim=optim, runtime=runtime, eval_prompts=eval_prompts)
        self.automatic_optimization = False
        self.generator_settings, self.noising = generator, noising
        denoiser = trainable_copy(teacher, generator.init, runtime.seed)
        self.prepare_network(denoiser.net)
        self.generator = OneStepGenerator(denoiser, teacher.schedule, generator.t_star)
        self.ema = EMA(self.generator, decay=generator.ema_decay)
        self.generator_updates = 0
        self.auxiliary_updates = 0

    @property
    def model(self) -> DiffusionModel:
        """The generator's :class:`DiffusionModel` (schedule, prompt encoder, decoder, ``save_pretrained``)."""
        return self.generator.denoiser

    @property
    def schedule(self):
        return self.generator.schedule

    # -- pieces of a training step ---------------------------------------------------------------------
    @staticmethod
    def prompts_of(batch: dict) -> list[str]:
        if "prompt" not in batch:
            raise ValueError(f"batch has no 'prompt' field (keys: {sorted(batch)}); use ImageDataModule or "
                             "PromptDataModule")
        return list(batch["prompt"])

    def encode(self, prompts: Sequence[str]) -> Optional[dict]:
        """Prompt conditioning (frozen text encoder, no graph); None for unconditional models."""
        with torch.no_grad():
            return self.model.encode_prompts(list(prompts))

    def latents(self, n: int, generator: Optional[torch.Generator]) -> Tensor:
        """Generator inputs ``z`` ``[n, *sample_shape]`` on the module's device, drawn on ``generator``'s device
        (from the global random state when ``generator`` is None)."""
        shape = (n, *self.model.sample_shape)
        if generator is None:
            return torch.randn(shape, device=self.device)
        return torch.randn(shape, generator=generator, device=generator.device).to(self.device)

    def generate(self, cond: Optional[dict], z: Tensor) -> Tensor:
        """Generator samples x0 ``[B, *sample_shape]`` from latents ``z`` (differentiable; latents if a VAE)."""
        return self.generator(z, cond)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        """Model timesteps ``[n]`` from the schedule's training ``p(t)`` restricted to ``[t_min, t_max]``."""
        return self.schedule.training_timesteps(n, device=self.device, generator=generator,
                                                t_min=self.noising.t_min, t_max=self.noising.t_max)

    def noised(self, x0: Tensor, timesteps: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, alpha [B], sigma [B])`` with ``x_t = alpha x0 + sigma eps`` (differentiable in x0)."""
        alpha, sigma = self.schedule.coefficients(timesteps)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * eps, alpha, sigma

    def weight(self, timesteps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """``w(t)`` ``[B]`` from ``alpha, sigma`` ``[B]`` (default: ``score_weight(alpha, sigma, noising.weighting)``)."""
        return score_weight(alpha, sigma, self.noising.weighting)

    def generator_turn(self) -> bool:
        """Whether the generator is updated in this step: after every ``aux_updates_per_generator_update``-th
        auxiliary update."""
        return self.auxiliary_updates % self.optim.aux_updates_per_generator_update == 0

    @contextmanager
    def updating(self, optimizer) -> Iterator[None]:
        """Inside the block only ``optimizer``'s parameters require grad (the other network's get no gradient
        from its loss); its gradients are freed on exit."""
        with self.toggled_optimizer(optimizer):
            yield
        optimizer.zero_grad(set_to_none=True)

    def generator_updated(self) -> None:
        """After a generator update: its EMA follows, and the count goes up."""
        self.ema.update(self.generator)
        self.generator_updates += 1

    # -- Lightning ---------------------------------------------------------------------------------------
    def configure_optimizers(self):
        generator = self.make_optimizer(self.model.net.parameters())
        auxiliary = self.make_optimizer(self.auxiliary_parameters(), lr=self.optim.aux_lr or self.optim.lr)
        return [generator, auxiliary]

    @abstractmethod
    def auxiliary_parameters(self) -> list[nn.Parameter]:
        """The parameters of the auxiliary network (fake score or classifier), trained by the second optimiser."""

    def log_updates(self, batch_size: int) -> None:
        self.log("generator_updates", float(self.generator_updates), prog_bar=True, batch_size=batch_size)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["one_step_counters"] = {"generator": self.generator_updates, "auxiliary": self.auxiliary_updates}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        counters = checkpoint.get("one_step_counters", {})
        self.generator_updates = int(counters.get("generator", 0))
        self.auxiliary_updates = int(counters.get("auxiliary", 0))

    # -- evaluation and export -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, prompts: Optional[Sequence[str]] = None, generator: torch.Generator | None = None,
               use_ema: bool = True) -> Tensor:
        """Images ``[n, C, H, W]`` in ``[-1, 1]`` from the (EMA) generator in eval mode; ``prompts`` as in
        :meth:`eval_prompts_for`; ``generator`` (on any device) makes the noise reproducible."""
        z = self.latents(n, generator)
        cond = self.encode(self.eval_prompts_for(n, prompts))
        with self.ema.swap(self.generator) if use_ema else nullcontext(), eval_mode(self.generator):
            return self.model.decode(self.generator(z, cond))

    def generate_eval_samples(self, n: int, generator: torch.Generator,
                              prompts: Optional[Sequence[str]] = None) -> Tensor:
        """``lit_distill.protocols.EvalSampler``: ``n`` one-step EMA samples in ``[-1, 1]``."""
        return self.sample(n, prompts, generator)

    def images_per_batch(self, batch: dict) -> int:
        """Generator samples per step for the generator's loss."""
        return len(self.prompts_of(batch))

    @contextmanager
    def exported_model(self) -> Iterator[DiffusionModel]:
        """The generator's model with its EMA weights, inside the block."""
        with self.ema.swap(self.generator):
            yield self.model

    def export(self, path: str | Path) -> Path:
        """Write the EMA generator's model with ``save_pretrained`` plus ``one_step.json`` (its ``t_star``):
        ``load_model(path)`` reads it back; one step is ``OneStepGenerator(model, model.schedule, t_star)``."""
        path = super().export(path)
        (path / "one_step.json").write_text(json.dumps({"t_star": self.generator.t_star, "method": self.method}))
        return path
