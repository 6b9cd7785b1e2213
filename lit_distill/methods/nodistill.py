"""NoDistillOneStep (arXiv 2502.08005): a one-step generator trained with no teacher score at all.

A classifier ``d(x_t, t, cond)`` learns, with the logistic loss, to tell noised real images from noised generator
samples; its logit estimates ``log p_data,t / p_g,t`` and its x-gradient replaces ``s_real - s_fake`` in the
generator's gradient (reverse-KL form, or the Jensen-Shannon form: ``losses.density_ratio``). The teacher only
lends its *weights*: to the generator and to the classifier's backbone. The paper's finding is that this
initialisation, not the teacher's score, is what one-step training needs; ``generator_init`` and
``classifier_init`` ("teacher" | "random") reproduce its ablations (both from the teacher, either one only,
neither), and ``t_star`` changes the generator's input-output mapping while keeping the teacher's features.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..losses.density_ratio import DIVERGENCES, classifier_loss, density_ratio_generator_loss
from ..models.density_ratio import DensityRatioClassifier
from ..models.diffusion_model import DiffusionModel
from .one_step import OneStepModule, trainable_copy


class NoDistillOneStep(OneStepModule):
    """One-step generator trained against a density-ratio classifier (no teacher score).

    Args (besides :class:`~lit_distill.methods.one_step.OneStepModule`'s; ``generator_init`` is there):
        divergence: ``"kl"`` (reverse KL: gradient ``-w grad_x d``) or ``"js"`` (``-w sigmoid(d)/2 grad_x d``).
        classifier_init: the classifier backbone starts from the teacher's weights or from random ones.
        feature_layer: the backbone submodule whose output feeds the head (see :class:`DensityRatioClassifier`).
        head_channels: width of the classifier head.
    ``weighting`` defaults to ``"constant"`` here (w = 1: the plain integral of the divergence over t), and
    ``aux_updates_per_generator_update`` to 4: the generator's gradient is only as good as the classifier's
    ratio estimate, and with one classifier update per generator update the generator diverged in our runs.
    For the same reason a classifier learning rate above the generator's helps: on the embedded digits
    ``aux_lr=1e-4`` (with ``lr=3e-5``) reached fid_classifier 4.66 in 600 generator updates against 7.22 with
    ``aux_lr = lr`` (the default; ``configs/nodistill/quickstart.yaml`` sets 1e-4).
    Batches must hold real ``"image"`` s in ``[-1, 1]`` (``ImageDataModule``) besides the captions.
    """

    method = "nodistill"

    def __init__(self, teacher: str | DiffusionModel = "embedded:base", teacher_kwargs: Optional[dict] = None, *,
                 divergence: str = "kl", classifier_init: str = "teacher", feature_layer: str = "mid_block",
                 head_channels: int = 128, weighting: str = "constant", aux_updates_per_generator_update: int = 4,
                 **kwargs):
        super().__init__(teacher, teacher_kwargs, weighting=weighting,
                         aux_updates_per_generator_update=aux_updates_per_generator_update, **kwargs)
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence={divergence!r}: choose one of {list(DIVERGENCES)}")
        self.divergence = divergence
        backbone = trainable_copy(self.take_teacher(), classifier_init, self.seed + 1)
        self.prepare_network(backbone.net)
        self.classifier = DensityRatioClassifier(backbone, feature_layer, head_channels)

    def auxiliary_parameters(self):
        return [p for p in self.classifier.parameters() if p.requires_grad]

    def real_samples(self, batch: dict) -> Tensor:
        """The batch's real images as model samples (VAE latents when the model has a VAE)."""
        if "image" not in batch:
            raise ValueError("NoDistillOneStep needs real images: batches with an 'image' field (ImageDataModule)")
        images = batch["image"].to(self.device).float()
        with torch.no_grad():
            return self.model.encode_images(images) if self.model.vae is not None else images

    def auxiliary_loss(self, batch: dict, captions: list[str], cond) -> Tensor:
        """Logistic loss on noised real images (label 1) and noised generator samples (label 0)."""
        real = self.real_samples(batch)
        with torch.no_grad():
            fake = self.generate(captions, cond=cond)
        x0 = torch.cat([real, fake])
        timesteps = self.sample_timesteps(x0.shape[0])
        x_t, _, _ = self.noised(x0, timesteps)
        both = None if cond is None else {k: torch.cat([v, v]) for k, v in cond.items()}
        logit_real, logit_fake = self.classifier(x_t, timesteps, both).chunk(2)
        size = real.shape[0]
        self.log("nodistill/accuracy", ((logit_real > 0).float().mean() + (logit_fake < 0).float().mean()) / 2,
                 batch_size=size)
        self.log("nodistill/logit_gap", (logit_real.mean() - logit_fake.mean()).detach(), batch_size=size)
        return classifier_loss(logit_real, logit_fake)

    def generator_loss(self, batch: dict, captions: list[str], cond) -> Tensor:
        """Reverse-KL or JS surrogate: the classifier's logit at the generator's noised samples."""
        x0 = self.generate(captions, cond=cond)
        timesteps = self.sample_timesteps(x0.shape[0])
        x_t, alpha, sigma = self.noised(x0, timesteps)
        logit = self.classifier(x_t, timesteps, cond)
        return density_ratio_generator_loss(logit, self.divergence, self.weight(timesteps, alpha, sigma))
