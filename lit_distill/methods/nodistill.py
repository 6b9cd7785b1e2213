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
from torch import Tensor, nn

from ..losses.density_ratio import DIVERGENCES, classifier_loss, density_ratio_generator_loss
from ..models.diffusion_model import DiffusionModel
from .one_step import OneStepModule, trainable_copy


class _Features(Exception):
    """Raised by the forward hook to stop the backbone once the feature layer has run."""

    def __init__(self, output):
        super().__init__()
        self.output = output


class DensityRatioClassifier(nn.Module):
    """``d(x_t, timestep, cond) -> logit [B]``: a diffusion backbone truncated at ``feature_layer`` plus a head.

    The backbone (a :class:`DiffusionModel` copy, teacher- or randomly initialised) runs up to the named
    submodule of its net (``"mid_block"``: the UNet's encoder path and bottleneck; for a transformer e.g.
    ``"transformer_blocks.11"``); a forward hook captures that output and stops the pass, so the decoder is
    never run. Parameters the truncated pass never touches are frozen (found by one probe pass at build).
    Head for ``[B, C, h, w]`` features: SiLU, 3x3 conv, SiLU, global average pool, linear; for ``[B, N, D]``
    tokens: LayerNorm, mean over tokens, linear, SiLU, linear. Its last layer starts at zero, so ``d = 0``
    (ratio 1: no generator gradient) until the classifier has learned something.
    """

    def __init__(self, backbone: DiffusionModel, feature_layer: str = "mid_block", hidden: int = 128):
        super().__init__()
        self.backbone, self.feature_layer = backbone, feature_layer
        names = dict(backbone.net.named_modules())
        if feature_layer not in names:
            top = [n for n, _ in backbone.net.named_children()]
            raise ValueError(f"feature_layer={feature_layer!r} is not a submodule of {type(backbone.net).__name__}; "
                             f"its children are {top} (use a dotted name for deeper layers)")
        names[feature_layer].register_forward_hook(self._stop)
        features = self._probe()
        if features.ndim == 4:
            c = features.shape[1]
            self.head = nn.Sequential(nn.SiLU(), nn.Conv2d(c, hidden, 3, padding=1), nn.SiLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, 1))
        elif features.ndim == 3:
            d = features.shape[-1]
            self.head = nn.Sequential(nn.LayerNorm(d), _MeanTokens(), nn.Linear(d, hidden), nn.SiLU(),
                                      nn.Linear(hidden, 1))
        else:
            raise ValueError(f"feature_layer={feature_layer!r} gives features of shape {tuple(features.shape)}; "
                             "expected [B, C, h, w] or [B, N, D]")
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @staticmethod
    def _stop(module, inputs, output):
        raise _Features(output[0] if isinstance(output, (tuple, list)) else output)

    def features(self, x_t: Tensor, timestep: Tensor, cond: Optional[dict]) -> Tensor:
        """The backbone's ``feature_layer`` output for ``x_t`` ``[B, C, H, W]`` at model timesteps ``[B]``."""
        try:
            self.backbone(x_t, timestep, cond)
        except _Features as stop:
            return stop.output.float()
        raise RuntimeError(f"feature_layer={self.feature_layer!r} did not run in the backbone's forward")

    def forward(self, x_t: Tensor, timestep: Tensor, cond: Optional[dict] = None) -> Tensor:
        return self.head(self.features(x_t, timestep, cond)).squeeze(-1)

    def _probe(self) -> Tensor:
        """One pass on a dummy input: the feature shape, and which backbone parameters the pass uses."""
        net = self.backbone.net
        params = [p for p in net.parameters() if p.requires_grad]
        x = torch.zeros(1, *self.backbone.sample_shape, device=self.backbone.device)
        t = self.backbone.schedule.training_timesteps(1, device=x.device)
        with torch.enable_grad():
            features = self.features(x, t, self.backbone.null_cond(1))
            used = torch.autograd.grad(features.sum(), params, allow_unused=True)
        for p, g in zip(params, used):
            if g is None:
                p.requires_grad_(False)
        return features.detach()


class _MeanTokens(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


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
