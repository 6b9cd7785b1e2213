"""NoDistillOneStep (arXiv 2502.08005): a one-step generator trained with no teacher score at all.

A classifier ``d(x_t, t, cond)`` learns, with the logistic loss, to tell noised real images from noised generator
samples; its logit estimates ``log p_data,t / p_g,t`` and its x-gradient replaces ``s_real - s_fake`` in the
generator's gradient (reverse-KL form, or the Jensen-Shannon form: ``losses.density_ratio``). The teacher only
lends its *weights*: to the generator and to the classifier's backbone. The paper's finding is that this
initialisation, not the teacher's score, is what one-step training needs; ``generator.init`` and
``classifier.init`` ("teacher" | "random") reproduce its ablations (both from the teacher, either one only,
neither), and ``generator.t_star`` changes the generator's input-output mapping while keeping the teacher's
features.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..losses.density_ratio import DIVERGENCES, classifier_loss, density_ratio_generator_loss
from ..models.density_ratio import DensityRatioClassifier
from ..models.diffusion_model import DiffusionModel
from .base import module_args
from .checkpoints import load_source
from .one_step import OneStepModule, trainable_copy
from .settings import Classifier, Generator, Noising, OneStepOptim, Runtime, groups


class NoDistillOneStep(OneStepModule):
    """One-step generator trained against a density-ratio classifier (no teacher score).

    Args (besides :class:`~lit_distill.methods.one_step.OneStepModule`'s):
        teacher: the source of the teacher's weights (``load_source``); ``teacher_kwargs``: its loader arguments.
        divergence: ``"kl"`` (reverse KL: gradient ``-w grad_x d``) or ``"js"`` (``-w sigmoid(d)/2 grad_x d``).
        classifier: :class:`~lit_distill.methods.settings.Classifier` (backbone init, feature layer, head width).

    ``noising.weighting`` defaults to ``"constant"`` here (w = 1: the plain integral of the divergence over t),
    and ``optim.aux_updates_per_generator_update`` to 4: the generator's gradient is only as good as the
    classifier's ratio estimate, so the classifier gets several updates per generator update (docs/one_step.md
    gives the runs behind this default and behind a larger ``optim.aux_lr``). Batches must hold real ``"image"`` s
    in ``[-1, 1]`` (``ImageDataModule``) besides the prompts. One training step: a classifier update, then, every ``aux_updates_per_generator_update``-th step,
    a generator update.
    """

    method = "nodistill"

    def __init__(self, teacher: "str | DiffusionModel" = "embedded:base", teacher_kwargs: Optional[dict] = None, *,
                 divergence: str = "kl", classifier: Classifier = Classifier(), generator: Generator = Generator(),
                 noising: Noising = Noising(weighting="constant"),
                 optim: OneStepOptim = OneStepOptim(lr=3e-5, betas=(0.0, 0.999), max_grad_norm=10.0,
                                                    aux_updates_per_generator_update=4),
                 runtime: Runtime = Runtime(), eval_prompts: Optional[list[str]] = None):
        classifier, generator, noising, optim, runtime = groups(
            NoDistillOneStep, classifier=classifier, generator=generator, noising=noising, optim=optim, runtime=runtime)
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence={divergence!r}: choose one of {list(DIVERGENCES)}")
        teacher_model = load_source(teacher, **(teacher_kwargs or {})).freeze_()
        super().__init__(teacher_model, generator=generator, noising=noising, optim=optim, runtime=runtime,
                         eval_prompts=eval_prompts)
        self.save_settings(ignore=module_args(teacher=teacher))
        self.divergence = divergence
        backbone = trainable_copy(teacher_model, classifier.init, runtime.seed + 1)  # the teacher is not kept
        self.prepare_network(backbone.net)
        self.classifier = DensityRatioClassifier(backbone, classifier.feature_layer, classifier.head_channels)

    def auxiliary_parameters(self):
        return [p for p in self.classifier.parameters() if p.requires_grad]

    def real_samples(self, batch: dict) -> Tensor:
        """The batch's real images as model samples (VAE latents when the model has a VAE)."""
        if "image" not in batch:
            raise ValueError("NoDistillOneStep needs real images: batches with an 'image' field (ImageDataModule)")
        images = batch["image"].to(self.device).float()
        with torch.no_grad():
            return self.model.encode_images(images) if self.model.vae is not None else images

    def classifier_logits(self, real: Tensor, cond: Optional[dict], generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Logits ``[B]``, ``[B]`` of the noised ``real`` samples and of as many noised (detached) generator
        samples, each at its own time."""
        with torch.no_grad():
            fake = self.generate(cond, self.latents(real.shape[0], generator))
        x0 = torch.cat([real, fake])
        timesteps = self.sample_timesteps(x0.shape[0], generator)
        x_t, _, _ = self.noised(x0, timesteps, generator)
        both = None if cond is None else {k: torch.cat([v, v]) for k, v in cond.items()}
        logit_real, logit_fake = self.classifier(x_t, timesteps, both).chunk(2)
        return logit_real, logit_fake

    def generator_loss(self, cond: Optional[dict], n: int, generator: torch.Generator) -> Tensor:
        """Reverse-KL or JS surrogate: the classifier's logit at ``n`` noised generator samples."""
        x0 = self.generate(cond, self.latents(n, generator))
        timesteps = self.sample_timesteps(n, generator)
        x_t, alpha, sigma = self.noised(x0, timesteps, generator)
        logit = self.classifier(x_t, timesteps, cond)
        return density_ratio_generator_loss(logit, self.divergence, self.weight(timesteps, alpha, sigma))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_generator, opt_classifier = self.optimizers()
        rng = self.step_generator()
        prompts = self.prompts_of(batch)
        cond, n = self.encode(prompts), len(prompts)

        # the classifier: noised real images (label 1) against noised generator samples (label 0)
        with self.updating(opt_classifier):
            logit_real, logit_fake = self.classifier_logits(self.real_samples(batch), cond, rng)
            loss = classifier_loss(logit_real, logit_fake)
            classifier_updated = self.apply_update(opt_classifier, loss, "classifier loss")
        if classifier_updated:
            self.auxiliary_updates += 1
            accuracy = ((logit_real > 0).float().mean() + (logit_fake < 0).float().mean()) / 2
            self.log("train/auxiliary_loss", loss.detach(), prog_bar=True, batch_size=n)
            self.log("nodistill/accuracy", accuracy, batch_size=n)
            self.log("nodistill/logit_gap", (logit_real.mean() - logit_fake.mean()).detach(), batch_size=n)

        # the generator, against the classifier's density-ratio estimate
        if self.generator_turn():
            with self.updating(opt_generator):
                loss = self.generator_loss(cond, n, rng)
                generator_updated = self.apply_update(opt_generator, loss, "generator loss")
            if generator_updated:
                self.generator_updated()
                self.log("train/generator_surrogate", loss.detach(), batch_size=n)
        self.log_updates(n)
