"""A DataLoader that resumes mid-epoch exactly: its order is a pure function of (seed, epoch) and it
reports how far it got, so a run resumed from a Lightning checkpoint sees the same batches as an
uninterrupted one."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochPermutation(Sampler[int]):
    """Indices of epoch ``e`` in the order ``randperm(n, seed + e)`` (or ``0..n-1`` without shuffling),
    starting after the first ``skip`` indices (set when resuming mid-epoch)."""

    def __init__(self, size: int, seed: int, shuffle: bool):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        start, self.skip = self.skip, 0
        yield from order[start:].tolist()


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with ``state_dict`` / ``load_state_dict`` (Lightning saves and restores them with the
    checkpoint). Batches are not dropped: the last batch of an epoch may be smaller.

    Under DDP Lightning re-creates the loader with its distributed sampler (``sampler=``) around ours:
    the order stays a function of (seed, epoch), and a resumed run restarts its epoch from the top."""

    def __init__(self, dataset: Dataset, *, batch_size: int, shuffle: bool = False, seed: int = 0,
                 sampler: Sampler | None = None, **kwargs):
        self.permutation = EpochPermutation(len(dataset), seed, shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler or self.permutation, **kwargs)
        self.batches_in_epoch = 0

    def __iter__(self):
        self.batches_in_epoch = self.permutation.skip // self.batch_size
        for batch in super().__iter__():
            self.batches_in_epoch += 1
            yield batch
        self.permutation.epoch += 1
        self.batches_in_epoch = 0

    def state_dict(self) -> dict:
        return {"epoch": self.permutation.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.permutation.epoch = int(state["epoch"])
        self.permutation.skip = int(state["batches_in_epoch"]) * self.batch_size
