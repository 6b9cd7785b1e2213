"""``FIDCallback``: Fréchet distance of the module's samples to held-out real data, every N training steps.

Features: ``"inception"`` (torchmetrics' ``FrechetInceptionDistance`` InceptionV3, 2048-d, from a weights file
that must already be on disk: nothing is ever downloaded; logged as ``fid``) or ``"classifier"`` (the project's
digit classifier, logged as ``fid_classifier``: a Fréchet distance in *those* features, not comparable with
published FIDs). Any ``nn.Module`` mapping images ``[B, C, H, W]`` in [-1, 1] to ``[B, F]`` also works
(logged as ``fid_<ClassName>``).

The real statistics are those of the data module's ``reference`` part (``ImageDataModule.reference_dataset``:
images that neither the model, its teacher nor the feature network trained on), computed once and cached under
``cache_dir/fid_stats/`` keyed by data source, resolution, channels, feature kind and number of images. Beside
the samples' distance the callback reports the *floor*: the distance of as many real images of the ``floor``
part (``val_dataset``, disjoint from the reference) to the same statistics, the best any generator can score
with that many samples (logged once as ``<name>_floor``). Samples come from the module's
``generate_eval_samples(n, generator) -> [n, C, H, W]`` in [-1, 1] (``lit_distill.protocols.EvalSampler``, on its
``eval_prompts``; ``generator``: a seeded CPU ``torch.Generator``, the same seed at every evaluation), so every
method works: the many-step models (DiffusionPretrain, TeacherRL, OPDStudent) with their ODE sampler, the
one-step generators in one step. Under DDP every rank makes its share of samples and
the feature statistics are summed over ranks (``FeatureStats.all_reduce``): the value is the same everywhere.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

import lightning as L
import torch
from torch import Tensor, nn

from ..lightning_internals import set_callback_metric
from ..metrics.frechet import FeatureStats
from ..protocols import EvalSampler, GeneratorUpdates
from ..utils import default_cache_dir

FEATURE_KINDS = ("classifier", "inception")


class InceptionFeatures(nn.Module):
    """2048-d pool features of torchmetrics' FID InceptionV3, loaded from ``weights`` (a torch-fidelity
    ``pt_inception-2015-12-05`` state dict on disk). Images in [-1, 1]; grey images are repeated to RGB."""

    def __init__(self, weights: Union[str, Path]):
        super().__init__()
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.net = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights)).inception

    def forward(self, images: Tensor) -> Tensor:
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return self.net(((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))


class ClassifierFeatures(nn.Module):
    """Penultimate features of the digit classifier (``get_digit_classifier(resolution, cache_dir)``)."""

    def __init__(self, resolution: int, cache_dir: Optional[str] = None):
        super().__init__()
        from ..models.classifier import CLASSIFIER_VERSION, get_digit_classifier

        self.net = get_digit_classifier(resolution, cache_dir)
        self.version = CLASSIFIER_VERSION

    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(images.float())


class FIDCallback(L.Callback):
    """Fréchet distance of generated samples to the real data, logged every ``every_n_steps`` global steps.

    Args:
        every_n_steps: evaluate when ``trainer.global_step`` crosses a multiple of this.
        num_samples: generated images per evaluation (over all ranks).
        features: ``"classifier"``, ``"inception"`` or an ``nn.Module`` images -> ``[B, F]``.
        inception_weights: path of the InceptionV3 weights file (required for ``"inception"``).
        cache_dir: where the digit classifier and the real statistics are cached (default: the lit_distill cache).
        batch_size: images per generation / feature batch.
        real_source, resolution, channels: the real data (an ``ImageDataModule`` source); default: the trainer's
            datamodule (its ``reference_dataset``, ``val_dataset``, ``resolution`` and ``channels``).
        max_real: use at most this many reference images (default: the whole reference part).
        seed: seed of the generation noise (rank r uses ``seed + r``).
        eval_at_start, eval_at_end: also evaluate before the first and after the last step.
    ``history``: list of ``{"step", "generator_updates", <name>}`` dicts; ``floor``: the real-data floor (both
    saved with the callback's state).
    """

    def __init__(self, every_n_steps: int = 500, num_samples: int = 1000,
                 features: Union[str, nn.Module] = "classifier",
                 inception_weights: Optional[str] = None, cache_dir: Optional[str] = None, batch_size: int = 250,
                 real_source: Optional[str] = None, resolution: Optional[int] = None, channels: Optional[int] = None,
                 max_real: Optional[int] = None, seed: int = 0, eval_at_start: bool = True, eval_at_end: bool = True):
        super().__init__()
        if isinstance(features, str) and features not in FEATURE_KINDS:
            raise ValueError(f"features={features!r}: choose one of {list(FEATURE_KINDS)} or pass an nn.Module")
        if features == "inception":
            if inception_weights is None:
                raise FileNotFoundError(
                    "features='inception' needs inception_weights: the path of torch-fidelity's InceptionV3 weights "
                    "(pt_inception-2015-12-05-6726825d.pth) on disk; nothing is downloaded. Or use "
                    "features='classifier'.")
            if not Path(inception_weights).expanduser().is_file():
                raise FileNotFoundError(f"inception_weights={inception_weights!r} is not a file: give the path of "
                                        "torch-fidelity's InceptionV3 weights on disk (nothing is downloaded)")
        if every_n_steps < 1 or num_samples < 2 or batch_size < 1:
            raise ValueError(f"every_n_steps={every_n_steps}, num_samples={num_samples}, batch_size={batch_size}: "
                             "need every_n_steps >= 1, num_samples >= 2, batch_size >= 1")
        self.every_n_steps, self.num_samples, self.batch_size = every_n_steps, num_samples, batch_size
        self.features = features
        self.inception_weights = Path(inception_weights).expanduser() if inception_weights else None
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.real_source, self.resolution, self.channels, self.max_real = real_source, resolution, channels, max_real
        self.seed, self.eval_at_start, self.eval_at_end = seed, eval_at_start, eval_at_end
        self.history: list[dict] = []
        self.floor: Optional[float] = None
        self._last_bucket = -1
        self._extractor: Optional[nn.Module] = None
        self._real: Optional[FeatureStats] = None

    @property
    def name(self) -> str:
        if self.features == "inception":
            return "fid"
        if self.features == "classifier":
            return "fid_classifier"
        return f"fid_{type(self.features).__name__}"

    # -- data and features -----------------------------------------------------------------------------
    def _datamodule(self, trainer: "L.Trainer"):
        """The data module of the real images (set up)."""
        if self.real_source is not None:
            from ..data.images import ImageDataModule

            dm = ImageDataModule(source=self.real_source, resolution=self.resolution or 16, channels=self.channels or 1)
        else:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "reference_dataset") or not hasattr(dm, "resolution"):
                raise ValueError("FIDCallback needs held-out real images: train with an ImageDataModule or set "
                                 "real_source (e.g. 'embedded:mnist') and resolution")
        dm.setup("fit")
        return dm

    def _dataset(self, trainer: "L.Trainer"):
        """The reference images' dataset and its (source, resolution, channels)."""
        dm = self._datamodule(trainer)
        return dm.reference_dataset, str(dm.source), int(dm.resolution), int(dm.channels)

    def _feature_net(self, resolution: int, device) -> nn.Module:
        if self._extractor is None:
            with torch.enable_grad():  # the digit classifier is trained on first use
                self._extractor = self._build_feature_net(resolution)
            self._extractor.eval().requires_grad_(False)
        return self._extractor.to(device)

    def _build_feature_net(self, resolution: int) -> nn.Module:
        if self.features == "inception":
            return InceptionFeatures(self.inception_weights)
        if self.features == "classifier":
            return ClassifierFeatures(resolution, str(self.cache_dir))
        return self.features

    def _cache_key(self, source: str, resolution: int, channels: int, count: int) -> str:
        if self.features == "inception":
            kind = f"inception-{self.inception_weights.name}-{self.inception_weights.stat().st_size}"
        elif self.features == "classifier":
            kind = f"classifier-{self._extractor.version}"
        else:
            kind = f"module-{type(self.features).__name__}"
        safe = source.replace("embedded:", "") if source.startswith("embedded:") else \
            "folder-" + hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:12]
        return f"{safe}_reference_r{resolution}_c{channels}_{kind}_n{count}"

    @torch.no_grad()
    def reference_stats(self, trainer: "L.Trainer", device) -> FeatureStats:
        """Feature statistics of the real images (computed over ranks once, then read from the cache)."""
        if self._real is not None:
            return self._real
        dataset, source, resolution, channels = self._dataset(trainer)
        extractor = self._feature_net(resolution, device)
        count = min(len(dataset), self.max_real) if self.max_real else len(dataset)
        path = self.cache_dir / "fid_stats" / f"{self._cache_key(source, resolution, channels, count)}.pt"
        if path.is_file():
            self._real = FeatureStats.load(path, device)
            return self._real
        stats = self._real_stats(trainer, dataset, count, extractor, device)
        if trainer.is_global_zero:
            stats.save(path)
        self._real = stats
        return stats

    def _real_stats(self, trainer, dataset, count: int, extractor: nn.Module, device) -> FeatureStats:
        """Feature statistics of the first ``count`` images of ``dataset``, split over the ranks."""
        stats = FeatureStats()
        indices = list(range(trainer.global_rank, count, trainer.world_size))
        for start in range(0, len(indices), self.batch_size):
            images = torch.stack([dataset[i]["image"] for i in indices[start:start + self.batch_size]])
            stats.update(extractor(images.to(device)))
        stats.all_reduce()
        return stats

    @torch.no_grad()
    def real_floor(self, trainer: "L.Trainer", device) -> float:
        """The distance of ``num_samples`` real images of the ``floor`` part (all of it, if it holds fewer) to
        the reference statistics: what a perfect generator scores with that many samples."""
        reference = self.reference_stats(trainer, device)
        floor = self._datamodule(trainer).val_dataset
        if floor is None or len(floor) < 2:
            raise ValueError("FIDCallback: the data module holds no floor images (val_dataset is empty); set its "
                             "val_fraction > 0")
        stats = self._real_stats(trainer, floor, min(self.num_samples, len(floor)), self._extractor.to(device), device)
        return stats.distance(reference)

    # -- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> float:
        """Generate ``num_samples`` images (split over ranks), return their Fréchet distance to the real set."""
        if not isinstance(pl_module, EvalSampler):
            raise TypeError(f"{type(pl_module).__name__} has no generate_eval_samples(n, generator, prompts) method "
                            "(lit_distill.protocols.EvalSampler), which FIDCallback uses to draw images in [-1, 1]")
        if self.num_samples < trainer.world_size:
            raise ValueError(f"num_samples={self.num_samples} is smaller than the number of ranks {trainer.world_size}")
        real = self.reference_stats(trainer, pl_module.device)
        extractor = self._extractor.to(pl_module.device)
        local = len(range(trainer.global_rank, self.num_samples, trainer.world_size))
        generator = torch.Generator().manual_seed(self.seed + trainer.global_rank)
        stats = FeatureStats()
        for start in range(0, local, self.batch_size):  # generate_eval_samples draws in eval mode
            images = pl_module.generate_eval_samples(min(self.batch_size, local - start), generator)
            stats.update(extractor(images.to(pl_module.device)))
        stats.all_reduce()
        return stats.distance(real)

    def _run(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        value = self.evaluate(trainer, pl_module)
        step = trainer.global_step
        updates = int(pl_module.generator_updates) if isinstance(pl_module, GeneratorUpdates) else step
        self.history.append({"step": step, "generator_updates": updates, self.name: value})
        set_callback_metric(trainer, self.name, torch.tensor(value))
        for logger in trainer.loggers:
            logger.log_metrics({self.name: value, "generator_updates": updates}, step=step)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.floor is None:
            self.floor = self.real_floor(trainer, pl_module.device)
            for logger in trainer.loggers:
                logger.log_metrics({f"{self.name}_floor": self.floor}, step=trainer.global_step)
        bucket = trainer.global_step // self.every_n_steps
        if self.eval_at_start and bucket > self._last_bucket:
            self._run(trainer, pl_module)
        self._last_bucket = max(self._last_bucket, bucket)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bucket = trainer.global_step // self.every_n_steps
        if bucket > self._last_bucket:
            self._last_bucket = bucket
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.eval_at_end and (not self.history or self.history[-1]["step"] != trainer.global_step):
            self._run(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"history": list(self.history), "last_bucket": self._last_bucket, "floor": self.floor}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self.floor = state_dict.get("floor")
        self._last_bucket = int(state_dict.get("last_bucket", -1))
