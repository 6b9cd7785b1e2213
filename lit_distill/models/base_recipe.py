"""The recipe of the embedded base model, and the cache folder it names.

``"embedded:base"`` (configs, notebooks, the quickstart) means the model that :class:`BaseRecipe` trains.
Its cache folder is named by the recipe (a readable prefix and a hash of every field), so two recipes
never share a folder: a changed recipe trains a new base instead of silently reusing an older one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..utils import default_cache_dir, tiny_run

#: The model source that names the base model of :func:`default_base_recipe` (``model: embedded:base``)
EMBEDDED_BASE = "embedded:base"


@dataclass(frozen=True)
class BaseRecipe:
    """Everything that decides which embedded base model is trained: the data, the network and the
    optimisation of ``DiffusionPretrain``. Any field that changes the trained weights belongs here; the cache
    folder (:attr:`name`) is derived from all of them.

    Args:
        data: the ``ImageDataModule`` source (captions come from ``lit_distill.data.caption_for``).
        resolution, family, block_channels, text_hidden: ``build_embedded_model`` arguments.
        max_steps, batch_size, lr, prompt_dropout, ema_decay, seed: ``DiffusionPretrain`` training.
    """

    data: str = "embedded:mnist"
    resolution: int = 16
    family: str = "flow"
    block_channels: tuple[int, ...] = (16, 32, 64)
    text_hidden: int = 64
    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "block_channels", tuple(int(c) for c in self.block_channels))

    @property
    def model_kwargs(self) -> dict:
        """The ``build_embedded_model`` arguments of the network."""
        return {"resolution": self.resolution, "family": self.family, "block_channels": self.block_channels,
                "text_hidden": self.text_hidden}

    @property
    def name(self) -> str:
        """The cache folder's name: ``base_mnist_r16_flow_<hash of every field>``."""
        fields = json.dumps(dataclasses.asdict(self), sort_keys=True)
        digest = hashlib.sha256(fields.encode()).hexdigest()[:10]
        return f"base_{self.data.split(':')[-1]}_r{self.resolution}_{self.family}_{digest}"

    def directory(self, cache_dir: Optional[str | os.PathLike] = None) -> Path:
        """Where this recipe's model is cached: ``cache_dir`` (default ``$LIT_DISTILL_CACHE``) / :attr:`name`."""
        return Path(cache_dir or default_cache_dir()).expanduser() / self.name

    def replace(self, **changes) -> "BaseRecipe":
        """A copy with ``changes`` (a field name that does not exist raises a ``TypeError`` naming it)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"BaseRecipe has no field(s) {unknown}; fields: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)


#: The base that ``$LIT_DISTILL_TINY`` runs use: a smaller network trained for a few steps (it draws noise).
TINY_BASE_RECIPE = BaseRecipe(block_channels=(16, 32), text_hidden=32, max_steps=20, batch_size=32)


def default_base_recipe() -> BaseRecipe:
    """The recipe behind ``"embedded:base"``: :class:`BaseRecipe` defaults, or the tiny one under ``$LIT_DISTILL_TINY``."""
    return TINY_BASE_RECIPE if tiny_run() else BaseRecipe()
