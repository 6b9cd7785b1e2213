"""DiffusionPretrain: train a base denoiser by DSM (VP) or flow matching on an ImageDataModule."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from ..diffusion import sample
from ..losses import denoising_loss
from ..models.diffusion_model import DiffusionModel
from ..models.ema import EMA
from ..utils import eval_mode
from ..utils.images import check_images
from .base import DistillModule, module_args
from .settings import Optim, Runtime, groups
from .checkpoints import load_source


class DiffusionPretrain(DistillModule):
    """Trains ``model`` (text encoder included, when it has one) on image/prompt batches.

    Args:
        model: where the model comes from: ``"embedded"`` (a fresh tiny text-conditional UNet, see
            ``build_embedded_model``), ``"embedded:base"`` (the cached pretrained base) or a local
            diffusers-style directory.
        model_kwargs: builder arguments for ``"embedded"`` (``resolution``, ``family``,
            ``prediction_type``, ``block_channels``...).
        prompt_dropout: probability of training on the empty prompt (enables classifier-free guidance).
        train_text_encoder: also train the prompt encoder (the embedded one starts from random weights).
        ema_decay: EMA of the trained weights; the EMA weights are evaluated and exported.
        eval_steps: ODE steps of ``generate_eval_samples`` (FID and reward callbacks, grids).
        optim, runtime, eval_prompts: see :class:`~lit_distill.methods.base.DistillModule` (no gradient clipping
            unless ``optim.max_grad_norm`` is set).
    Batches: ``{"image": [B, C, H, W] in [-1, 1], "prompt": list[str], ...}`` (``ImageDataModule``). One
    training step is one batch and one optimiser update.
    """

    method = "pretrain"

    def __init__(self, model: "str | DiffusionModel" = "embedded", model_kwargs: Optional[dict] = None, *,
                 prompt_dropout: float = 0.1, train_text_encoder: bool = True, ema_decay: float = 0.999,
                 eval_steps: int = 20, optim: Optim = Optim(lr=1e-3, max_grad_norm=None), runtime: Runtime = Runtime(),
                 eval_prompts: Optional[list[str]] = None):
        optim, runtime = groups(DiffusionPretrain, optim=optim, runtime=runtime)
        super().__init__(optim=optim, runtime=runtime, eval_prompts=eval_prompts)
        self.save_settings(ignore=module_args(model=model))
        self.model = load_source(model, **(model_kwargs or {}))
        self.prepare_network(self.model.net)
        if self.model.vae is not None:
            self.model.vae.requires_grad_(False)
        if self.model.text_encoder is not None:
            self.model.text_encoder.requires_grad_(train_text_encoder)
        self.ema = EMA(self.model, decay=ema_decay)
        self.prompt_dropout, self.eval_steps = prompt_dropout, eval_steps

    def _loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        images = batch["image"]
        if self.model.vae is None:  # pixel-space model: the data must match what the network denoises
            c, h, w = self.model.sample_shape
            check_images(images, channels=c, size=(h, w), name='batch["image"] (set the data module\'s resolution '
                         "and channels to the model's sample_shape)")
        x0 = self.model.encode_images(images) if self.model.vae is not None else images
        prompts = list(batch["prompt"])
        if self.training and self.prompt_dropout > 0:
            drop = torch.rand(len(prompts), generator=self.step_generator("cpu")) < self.prompt_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        cond = self.model.encode_prompts(prompts)
        return denoising_loss(self.model, self.model.schedule, x0.float(), cond, generator=generator)

    def training_step(self, batch: dict, batch_idx: int):
        loss = self._loss(batch, self.step_generator())
        if not self.check_finite("denoising loss", loss):
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update(self.model)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        with self.ema.swap(self.model):
            loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0], sync_dist=True)

    def configure_optimizers(self):
        return self.make_optimizer(self.model.parameters())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """``optim.max_grad_norm`` (the Trainer's ``gradient_clip_val`` when that is not set)."""
        if self.optim.max_grad_norm:
            self.clip_grad_norm(optimizer, self.optim.max_grad_norm)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def images_per_batch(self, batch: dict) -> int:
        """Images trained on per step (pretraining generates none)."""
        return len(batch["image"])

    @torch.no_grad()
    def generate_eval_samples(self, n: int, generator: torch.Generator,
                              prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """``lit_distill.protocols.EvalSampler``: ``n`` images in [-1, 1] from the EMA weights, ODE sampler with
        ``eval_steps`` steps."""
        noise = torch.randn((n,) + self.model.sample_shape, generator=generator, device=generator.device)
        with self.ema.swap(self.model), eval_mode(self.model):
            cond = self.model.encode_prompts(self.eval_prompts_for(n, prompts))
            x = sample(self.model, noise.to(self.device), cond, self.model.schedule, self.eval_steps)
            return self.model.decode(x)

    @contextmanager
    def exported_model(self) -> Iterator[DiffusionModel]:
        """The model with its EMA weights (text encoder included), inside the block."""
        with self.ema.swap(self.model):
            yield self.model
