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
from .checkpoints import load_source


class DiffusionPretrain(DistillModule):
    """Trains ``model`` (text encoder included, when it has one) on image/caption batches.

    Args:
        model: where the model comes from: ``"embedded"`` (a fresh tiny text-conditional UNet, see
            ``build_embedded_model``), ``"embedded:base"`` (the cached pretrained base) or a local
            diffusers-style directory.
        model_kwargs: builder arguments for ``"embedded"`` (``resolution``, ``family``,
            ``prediction_type``, ``block_channels``...).
        caption_dropout: probability of training on the empty prompt (enables classifier-free guidance).
        train_text_encoder: also train the prompt encoder (the embedded one starts from random weights).
        ema_decay: EMA of the trained weights; the EMA weights are evaluated and exported.
        eval_steps: ODE steps of ``generate_eval_samples`` (FID and reward callbacks, grids).
        eval_prompts: prompts cycled by ``generate_eval_samples`` when the caller gives none.
    Batches: ``{"image": [B, C, H, W] in [-1, 1], "caption": list[str], ...}`` (``ImageDataModule``).
    """

    method = "pretrain"

    def __init__(self, model: str = "embedded", model_kwargs: Optional[dict] = None, *, lr: float = 1e-3,
                 weight_decay: float = 0.0, caption_dropout: float = 0.1, train_text_encoder: bool = True,
                 ema_decay: float = 0.999, nan_policy: str = "raise",
                 compile: bool = False, gradient_checkpointing: bool = False, seed: int = 0, eval_steps: int = 20,
                 eval_prompts: Optional[list[str]] = None):
        super().__init__(lr=lr, weight_decay=weight_decay, nan_policy=nan_policy, compile=compile,
                         gradient_checkpointing=gradient_checkpointing)
        self.save_hyperparameters(ignore=module_args(model=model))
        self.model = load_source(model, **(model_kwargs or {}))
        self.prepare_network(self.model.net)
        if self.model.vae is not None:
            self.model.vae.requires_grad_(False)
        if self.model.text_encoder is not None:
            self.model.text_encoder.requires_grad_(train_text_encoder)
        self.ema = EMA(self.model, decay=ema_decay)
        self.caption_dropout = caption_dropout
        self.seed, self.eval_steps, self.eval_prompts = seed, eval_steps, eval_prompts

    def setup(self, stage: str) -> None:
        self.maybe_compile(self.model.net)

    def _loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        images = batch["image"]
        if self.model.vae is None:  # pixel-space model: the data must match what the network denoises
            c, h, w = self.model.sample_shape
            check_images(images, channels=c, size=(h, w), name='batch["image"] (set the data module\'s resolution '
                         "and channels to the model's sample_shape)")
        x0 = self.model.encode_images(images) if self.model.vae is not None else images
        captions = list(batch["caption"])
        if self.training and self.caption_dropout > 0:
            drop = torch.rand(len(captions), generator=self.step_generator("cpu")) < self.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        cond = self.model.encode_prompts(captions)
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
