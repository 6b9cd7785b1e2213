"""The contracts between the LightningModules and the code that drives them.

Callbacks, strategies and the pipeline read a module (or a data module) through these protocols, never
through its class, its method name or its hyper-parameters. Every lit_distill method implements
:class:`EvalSampler`, :class:`Exportable`, :class:`ImageCounter` and :class:`DistributedHints`; a module of
your own works with the callbacks as soon as it implements the protocol they need. A leaf module: it imports
nothing from lit_distill.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, ContextManager, Optional, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class EvalSampler(Protocol):
    """Draws evaluation images (``FIDCallback``, ``RewardCallback`` and their grids)."""

    def generate_eval_samples(self, n: int, generator: torch.Generator,
                              prompts: Optional[Sequence[str]] = None) -> Tensor:
        """``n`` images ``[n, C, H, W]`` in ``[-1, 1]`` on the module's device, drawn in eval mode from the
        weights being evaluated (the EMA weights where the method keeps an EMA), with the module's evaluation
        sampler. ``prompts``: one per image (``len(prompts) == n``); ``None``: the module's ``eval_prompts``
        cycled to ``n`` (the empty prompt when it has none). Every random number comes from ``generator``
        (drawn on ``generator.device``, then moved), so the same generator state gives the same images."""


@runtime_checkable
class Exportable(Protocol):
    """Writes the trained model where the next stage reads it (``ExportCallback``)."""

    def export(self, path: str | Path) -> Path:
        """Write the trained model as a diffusers-style directory at ``path`` (returned)."""

    def exported_model(self) -> ContextManager[nn.Module]:
        """The model :meth:`export` writes, valid inside the ``with`` block."""


@runtime_checkable
class ImageCounter(Protocol):
    """How many images one training batch generates (the unit of images/s)."""

    def images_per_batch(self, batch: dict[str, Any]) -> int:
        """Images the method generates for ``batch`` in one training step (for DiffusionPretrain, which
        generates none: the images it trains on)."""


@runtime_checkable
class DistributedHints(Protocol):
    """What a DDP strategy must know about a method, as class attributes."""

    #: True when a backward pass may leave trained parameters without a gradient (the one-step methods update
    #: two networks in turn): DDP must then search for unused parameters.
    ddp_find_unused_parameters: ClassVar[bool]


@runtime_checkable
class HasReward(Protocol):
    """A module trained on a reward of its own (TeacherRL), which ``RewardCallback`` evaluates by default."""

    reward: Any  # a lit_distill.rewards.Reward: (images [B, C, H, W], prompts, tasks, **metadata) -> [B]


@runtime_checkable
class GeneratorUpdates(Protocol):
    """A module that counts generator updates apart from training steps (the one-step methods)."""

    generator_updates: int


@runtime_checkable
class PromptSource(Protocol):
    """A data module whose prompt rows are known before training (``PromptDataModule``, once set up)."""

    train: Any  # where the training prompts come from (a file, an ``embedded:NAME`` set): named in errors
    train_rows: Optional[list[dict]]  # the training rows ``{"prompt", "task", **metadata}``

    @property
    def tasks_present(self) -> list[str]:
        """Sorted task names of the training prompts."""
