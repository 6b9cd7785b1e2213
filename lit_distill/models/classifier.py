"""The digit classifier: judge of digit correctness and feature extractor of the classifier-feature FD.

``get_digit_classifier(R)`` trains it once on the ``train`` part of the embedded digits (under a minute on
a CPU) and caches it under ``default_cache_dir()``. It never sees the ``reference`` or ``floor`` parts, so
Fréchet distances in its features compare held-out statistics.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lit_distill.data.embedded import DEFAULT_SOURCE, load_embedded_digits
from lit_distill.utils import default_cache_dir

#: Bump when the architecture or the training recipe changes: cached files of another version are retrained.
CLASSIFIER_VERSION = "digit-cnn-v2"


class DigitClassifier(nn.Module):
    """A small CNN for grey digit images ``[B, 1, R, R]`` in ``[-1, 1]`` (any R >= 8; trained at one R).

    RGB input ``[B, 3, R, R]`` is turned grey by averaging channels. Three 3x3 conv layers (32, then
    after a 2x max-pool 64 and 64 channels), adaptive average pooling to 4x4, a ``feature_dim``-wide
    hidden layer (the features) and 10 logits.
    """

    def __init__(self, feature_dim: int = 128, resolution: int = 16):
        super().__init__()
        self.resolution = resolution  # the resolution it was trained at (informational)
        self.heldout_accuracy: float | None = None
        self.loaded_from_cache = False

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(1, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, feature_dim), nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, 10)

    @staticmethod
    def _grey(images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected [B, 1 or 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        return images.mean(dim=1, keepdim=True) if images.shape[1] == 3 else images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, feature_dim]`` (non-negative), for Fréchet distances."""
        return self.body(self._grey(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 10]`` over digits 0..9."""
        return self.head(self.dropout(self.features(images)))

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[B, 10]`` (softmax of the logits)."""
        return self(images).softmax(dim=-1)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    b, _, h, w = images.shape
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, 1, h, w + 2 * max_shift)
    out = padded.gather(2, rows.to(images.device))
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, 1, h, w)
    return out.gather(3, cols.to(images.device))


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of ``images`` whose argmax logit equals ``labels`` (model put in eval mode)."""
    model.eval()
    correct = sum(int((model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum())
                  for i in range(0, len(labels), batch_size))
    return correct / max(len(labels), 1)


def train_digit_classifier(
    resolution: int = 16,
    epochs: int | None = None,
    seed: int = 0,
    source: str = DEFAULT_SOURCE,
    batch_size: int = 64,
    lr: float = 3e-3,
    num_threads: int | None = 1,
) -> tuple[DigitClassifier, float]:
    """Train a ``DigitClassifier`` on the ``train`` part of the embedded digits, with random shifts.

    Its held-out accuracy is measured on the ``reference`` part; ``seed`` seeds the weights and the batches.
    ``epochs`` defaults to 12 for ``"digits"`` (1079 training images) and 2 for ``"mnist"`` (50,000).
    AdamW with a one-cycle learning rate, on the CPU, with ``torch.set_num_threads(num_threads)``
    while training (restored after; None leaves it): the batches are tiny, and one thread is faster
    than several, many times so on a busy machine.
    Returns the model (eval mode) and its held-out accuracy in [0, 1].
    """
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(resolution, epochs, seed, source, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(resolution, epochs, seed, source, batch_size, lr) -> tuple[DigitClassifier, float]:
    epochs = epochs if epochs is not None else (12 if source == "digits" else 2)
    train_x, train_y = load_embedded_digits(source, resolution, split="train")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(resolution=resolution)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_y) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    max_shift = max(1, resolution // 8)
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global RNG: keep it seeded, leave it as found
        torch.manual_seed(seed)
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(train_y), generator=gen)
            for i in range(0, len(perm), batch_size):
                idx = perm[i : i + batch_size]
                x = random_shift(train_x[idx], max_shift, gen)
                loss = F.cross_entropy(model(x), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    acc = accuracy(model, *load_embedded_digits(source, resolution, split="reference"))
    model.heldout_accuracy = acc
    return model.eval(), acc


def get_digit_classifier(
    resolution: int = 16, cache_dir: str | os.PathLike | None = None, source: str = DEFAULT_SOURCE
) -> DigitClassifier:
    """The cached digit classifier for ``resolution``, trained (and cached) on first use.

    File: ``{cache_dir}/classifier_{source}_r{R}.pt``,
    holding the state dict, the held-out accuracy and ``CLASSIFIER_VERSION``; a file of another
    version is retrained. ``cache_dir`` defaults to ``default_cache_dir()``. The returned model is in
    eval mode with ``requires_grad_(False)``; ``heldout_accuracy`` and ``loaded_from_cache`` are set.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"classifier_{source}_r{resolution}.pt"
    path = cache / name
    model = DigitClassifier(resolution=resolution)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("version") == CLASSIFIER_VERSION and state.get("resolution") == resolution:
            model.load_state_dict(state["state_dict"])
            model.heldout_accuracy = float(state["heldout_accuracy"])
            model.loaded_from_cache = True
    if not model.loaded_from_cache:
        t0 = time.perf_counter()
        model, acc = train_digit_classifier(resolution, source=source)
        model.heldout_accuracy = acc
        state = {"version": CLASSIFIER_VERSION, "resolution": resolution, "source": source,
                 "heldout_accuracy": acc, "train_seconds": time.perf_counter() - t0, "state_dict": model.state_dict()}
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
            os.replace(tmp, path)  # atomic: concurrent ranks never see a half-written file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return model.eval().requires_grad_(False)
