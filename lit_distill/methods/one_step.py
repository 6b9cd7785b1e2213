"""What the one-step students share: a generator made from the teacher, an auxiliary network, two optimisers.

:class:`OneStepModule` trains ``generator`` (a :class:`~lit_distill.diffusion.OneStepGenerator` around a copy of
the teacher's network) against an *auxiliary* network that a subclass builds (a fake score for DisBack /
Diff-Instruct, a density-ratio classifier for NoDistillOneStep). One training step (one batch) is:

1. ``auxiliary_loss`` -> one update of the auxiliary network (skipped when ``train_auxiliary_now()`` is False);
2. every ``aux_updates_per_generator_update``-th auxiliary update, ``generator_loss`` -> one generator update,
   then the generator's EMA.

Manual optimisation: ``trainer.global_step`` counts the optimiser steps of *both* networks (so
``max_steps`` too); ``generator_updates`` / ``auxiliary_updates`` count each (logged, checkpointed).
Multi-GPU runs need DDP with ``find_unused_parameters`` (each backward uses one network only):
``lit_distill.distributed.DiffusionDDPStrategy`` turns it on for these methods.

Seams for subclasses and users: :meth:`sample_timesteps` (``p(t)`` on ``[t_min, t_max]``), :meth:`weight`
(``w(t)``), :meth:`train_auxiliary_now` / :meth:`train_generator_now` (the update schedule).
"""
from __future__ import annotations

import abc
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..diffusion import OneStepGenerator, expand_like
from ..losses.score_distillation import WEIGHTINGS, score_weight
from ..models.diffusion_model import DiffusionModel
from ..models.ema import EMA
from ..utils import eval_mode
from .base import DistillModule, check_positive, module_args
from .settings import Optim, Runtime
from .checkpoints import load_source

INITS = ("teacher", "random")


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
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose one of {list(INITS)}")
    copy = model.copy_frozen()
    if init == "random":
        copy.net = reinitialize(copy.net, seed)
    copy.net.requires_grad_(True)
    copy.net.train()
    return copy


class OneStepModule(DistillModule, abc.ABC):
    """Base of :class:`DisBackStudent` and :class:`NoDistillOneStep`. Subclasses implement
    :meth:`auxiliary_loss`, :meth:`generator_loss` and :meth:`auxiliary_parameters`.

    Args:
        teacher: where the teacher comes from (``load_model``): ``"embedded:base"``, ``"embedded"``, a
            diffusers-style directory, or a ``DiffusionModel`` (kept out of ``hparams``). Its prompt encoder
            (and VAE) are frozen and shared by every copy.
        teacher_kwargs: keyword arguments of ``load_model`` (e.g. ``resolution`` for ``"embedded"``).
        generator_init: ``"teacher"`` (the generator starts as a copy of the teacher's net) or ``"random"``.
        t_star: the model timestep the generator runs at (default: the noisiest training timestep).
        lr / aux_lr: AdamW learning rates of the generator / auxiliary network (``aux_lr`` defaults to ``lr``).
        betas: AdamW betas of both networks. ``beta1 = 0`` (no momentum) by default, as in GAN training: the
            generator chases an auxiliary network that moves with it, and with ``beta1 = 0.9`` our Diff-Instruct
            runs oscillated (fid_classifier 40 -> 122 -> 74 over 150 updates on CPU) where ``beta1 = 0`` decreased
            steadily (136 -> 9.6).
        aux_updates_per_generator_update: auxiliary updates per generator update (DMD2's "dfake_gen_update_ratio").
        t_min, t_max: the fraction of the time range where the generator's samples are noised (1 = noise).
        weighting: ``w(t)``, one of ``losses.score_distillation.WEIGHTINGS`` (see :meth:`weight`).
        max_grad_norm: clip each network's gradient norm (None: no clipping).
        ema_decay: EMA of the generator; evaluation, ``sample`` and ``export_generator`` use the EMA weights.
        eval_prompts: prompts cycled by ``generate_eval_samples`` when the caller gives none (default: the empty
            prompt).
        seed: seed of random initialisations.
    Batches: ``{"caption": list[str], ...}`` (``ImageDataModule``) or ``{"prompt": list[str], ...}``
    (``PromptDataModule``); NoDistillOneStep also needs ``"image"``.
    """

    method = "one_step"
    ddp_find_unused_parameters = True  # each backward trains one of the two networks

    def __init__(self, teacher: str | DiffusionModel = "embedded:base", teacher_kwargs: Optional[dict] = None, *,
                 generator_init: str = "teacher", t_star: Optional[float] = None, lr: float = 3e-5,
                 aux_lr: Optional[float] = None, weight_decay: float = 0.0, betas: tuple[float, float] = (0.0, 0.999),
                 aux_updates_per_generator_update: int = 1,
                 t_min: float = 0.02, t_max: float = 0.98, weighting: str = "x0", max_grad_norm: Optional[float] = 10.0,
                 ema_decay: float = 0.99, eval_prompts: Optional[list[str]] = None, seed: int = 0,
                 nan_policy: str = "raise", compile: bool = False, gradient_checkpointing: bool = False):
        super().__init__(optim=Optim(lr=lr, betas=betas, weight_decay=weight_decay, max_grad_norm=max_grad_norm),
                         runtime=Runtime(seed=seed, nan_policy=nan_policy, compile=compile,
                                         gradient_checkpointing=gradient_checkpointing), eval_prompts=eval_prompts)
        self.save_hyperparameters(ignore=module_args(teacher=teacher))
        self.automatic_optimization = False
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"t_min={t_min}, t_max={t_max}: need 0 <= t_min < t_max <= 1")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}: choose one of {list(WEIGHTINGS)}")
        if int(aux_updates_per_generator_update) < 1:
            raise ValueError(f"aux_updates_per_generator_update={aux_updates_per_generator_update} must be >= 1")
        check_positive(lr=lr, **({} if aux_lr is None else {"aux_lr": aux_lr}))
        self.aux_lr, self.ratio = aux_lr or lr, int(aux_updates_per_generator_update)
        self.t_min, self.t_max, self.weighting = t_min, t_max, weighting

        teacher_model = load_source(teacher, **(teacher_kwargs or {})).freeze_()
        denoiser = trainable_copy(teacher_model, generator_init, seed)
        self.prepare_network(denoiser.net)
        self.generator = OneStepGenerator(denoiser, teacher_model.schedule, t_star)
        self.ema = EMA(self.generator, decay=ema_decay)
        self._loaded_teacher = (teacher_model,)  # a tuple: not a submodule unless a subclass keeps it
        self.generator_updates = 0
        self.auxiliary_updates = 0

    # -- building blocks --------------------------------------------------------------------------
    def take_teacher(self) -> DiffusionModel:
        """The frozen teacher loaded by ``__init__``, handed over once to the subclass (which keeps it as a
        submodule only if it uses its score: NoDistillOneStep only copies its weights)."""
        if not self._loaded_teacher:
            raise RuntimeError("take_teacher() was already called")
        (teacher,), self._loaded_teacher = self._loaded_teacher, ()
        return teacher

    @property
    def model(self) -> DiffusionModel:
        """The generator's :class:`DiffusionModel` (schedule, prompt encoder, decoder, ``save_pretrained``)."""
        return self.generator.denoiser

    @property
    def schedule(self):
        return self.generator.schedule

    def setup(self, stage: str) -> None:
        self.maybe_compile(self.model.net)

    @staticmethod
    def captions_of(batch: dict) -> list[str]:
        if "prompt" not in batch:
            raise ValueError(f"batch has no 'prompt' field (keys: {sorted(batch)}); use ImageDataModule or "
                             "PromptDataModule")
        return list(batch["prompt"])

    def encode(self, captions: Sequence[str]) -> Optional[dict]:
        """Prompt conditioning (frozen text encoder, no graph); None for unconditional models."""
        with torch.no_grad():
            return self.model.encode_prompts(list(captions))

    def latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Generator inputs ``z`` ``[n, *sample_shape]`` (drawn on the CPU when a ``generator`` is given)."""
        shape = (n, *self.model.sample_shape)
        if generator is not None:
            return torch.randn(shape, generator=generator, device=generator.device).to(self.device)
        return torch.randn(shape, device=self.device)

    def generate(self, captions: Sequence[str], z: Tensor | None = None, cond: Optional[dict] = None) -> Tensor:
        """Generator samples x0 ``[B, *sample_shape]`` for ``captions`` (differentiable; latents if a VAE)."""
        z = self.latents(len(captions)) if z is None else z
        return self.generator(z, self.encode(captions) if cond is None else cond)

    # -- seams -------------------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int) -> Tensor:
        """Model timesteps ``[B]`` from the schedule's training ``p(t)`` restricted to ``[t_min, t_max]``."""
        return self.schedule.training_timesteps(batch_size, device=self.device, t_min=self.t_min, t_max=self.t_max)

    def weight(self, timesteps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """``w(t)`` ``[B]`` from ``alpha, sigma`` ``[B]`` (default: ``score_weight(alpha, sigma, weighting)``)."""
        return score_weight(alpha, sigma, self.weighting)

    def noised(self, x0: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x_t, alpha [B], sigma [B])`` with ``x_t = alpha x0 + sigma eps`` (differentiable in x0)."""
        alpha, sigma = self.schedule.coefficients(timesteps)
        eps = torch.randn_like(x0)
        return expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * eps, alpha, sigma

    def train_auxiliary_now(self) -> bool:
        return True

    def train_generator_now(self) -> bool:
        """After every ``aux_updates_per_generator_update``-th auxiliary update."""
        return self.auxiliary_updates % self.ratio == 0

    # -- to implement ------------------------------------------------------------------------------
    @abc.abstractmethod
    def auxiliary_parameters(self) -> list[nn.Parameter]:
        """The parameters of the auxiliary network (fake score or classifier), trained by its optimiser."""

    @abc.abstractmethod
    def auxiliary_loss(self, batch: dict, captions: list[str], cond: Optional[dict]) -> Tensor:
        """The auxiliary network's loss on this batch (scalar)."""

    @abc.abstractmethod
    def generator_loss(self, batch: dict, captions: list[str], cond: Optional[dict]) -> Tensor:
        """The generator's (surrogate) loss on this batch (scalar)."""

    def on_auxiliary_update(self, loss: Tensor) -> None:
        """Called after each successful auxiliary update, with its (detached) loss."""

    def on_generator_update(self) -> None:
        """Called after each successful generator update (and its EMA update)."""

    def after_training_step(self) -> None:
        """Called at the end of every training step (DisBack's stage bookkeeping)."""

    # -- Lightning ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        generator = self.make_optimizer(self.model.net.parameters())
        auxiliary = self.make_optimizer(self.auxiliary_parameters(), lr=self.aux_lr)
        return [generator, auxiliary]

    def _update(self, optimizer, loss_fn, name: str) -> Optional[Tensor]:
        """Compute ``loss_fn()`` with only ``optimizer``'s parameters requiring grad, then step it."""
        with self.toggled_optimizer(optimizer):
            loss = loss_fn()
            if not self.apply_update(optimizer, loss, name):
                return None
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_generator, opt_auxiliary = self.optimizers()
        captions = self.captions_of(batch)
        cond = self.encode(captions)
        size = len(captions)
        if self.train_auxiliary_now():
            loss = self._update(opt_auxiliary, lambda: self.auxiliary_loss(batch, captions, cond), "auxiliary loss")
            if loss is not None:
                self.auxiliary_updates += 1
                self.on_auxiliary_update(loss)
                self.log("train/auxiliary_loss", loss, prog_bar=True, batch_size=size)
        if self.train_generator_now():
            loss = self._update(opt_generator, lambda: self.generator_loss(batch, captions, cond), "generator loss")
            if loss is not None:
                self.ema.update(self.generator)
                self.generator_updates += 1
                self.on_generator_update()
                self.log("train/generator_surrogate", loss, batch_size=size)
        self.log("generator_updates", float(self.generator_updates), prog_bar=True, batch_size=size)
        self.after_training_step()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["one_step_counters"] = {"generator": self.generator_updates, "auxiliary": self.auxiliary_updates}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        counters = checkpoint.get("one_step_counters", {})
        self.generator_updates = int(counters.get("generator", 0))
        self.auxiliary_updates = int(counters.get("auxiliary", 0))

    # -- evaluation and export ---------------------------------------------------------------------
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
        return len(self.captions_of(batch))

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
