"""A DataLoader that resumes mid-epoch exactly: its order is a pure function of (seed, epoch) and it
reports how far it got, in samples, so a run resumed from a Lightning checkpoint sees the same samples as an
uninterrupted one, also when the batch size changed in between."""
from __future__ import annotations

from typing import Iterator

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_distill.utils.resume import batches_done


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

    The position is kept in samples: a run resumed with another batch size continues at the same sample (and
    ``batch_count_correction`` tells ``lit_distill.utils.resume.align_batch_count`` how to shift Lightning's
    batch count, which the methods apply when training starts). If the order itself changed (dataset size, seed
    or shuffle), the epoch restarts from its first sample, with a warning.

    Under DDP Lightning re-creates the loader with its distributed sampler (``sampler=``) around ours:
    the order stays a function of (seed, epoch), and a resumed run restarts its epoch from the top."""

    def __init__(self, dataset: Dataset, *, batch_size: int, shuffle: bool = False, seed: int = 0,
                 sampler: Sampler | None = None, **kwargs):
        self.permutation = EpochPermutation(len(dataset), seed, shuffle)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler or self.permutation, **kwargs)
        self.batches_in_epoch = self.samples_in_epoch = 0
        self.batch_count_correction = 0
        self._passes, self._continue_saved_epoch = 0, False

    def __iter__(self):
        # every pass is the next epoch, except the first pass after load_state_dict, which finishes the saved one.
        # (Counted per pass, not per completed pass: Lightning stops at the epoch's last batch without exhausting us.)
        if self._passes and not self._continue_saved_epoch:
            self.permutation.epoch, self.permutation.skip = self.permutation.epoch + 1, 0
        self._passes, self._continue_saved_epoch = self._passes + 1, False
        self.samples_in_epoch = self.permutation.skip
        self.batches_in_epoch = batches_done(len(self.permutation), self.batch_size, self.samples_in_epoch)
        for batch in super().__iter__():
            self.batches_in_epoch += 1
            self.samples_in_epoch = min(self.samples_in_epoch + self.batch_size, len(self.permutation))
            yield batch

    def _order(self) -> dict:
        order = self.permutation
        return {"dataset_size": order.size, "seed": order.seed, "shuffle": order.shuffle}

    def state_dict(self) -> dict:
        return {"epoch": self.permutation.epoch, "samples_in_epoch": self.samples_in_epoch,
                "batches_in_epoch": self.batches_in_epoch, "batch_size": self.batch_size, **self._order()}

    def load_state_dict(self, state: dict) -> None:
        epoch, saved_batches = int(state["epoch"]), int(state["batches_in_epoch"])
        position = int(state.get("samples_in_epoch", saved_batches * self.batch_size))  # older checkpoints: batches
        saved_order = {k: state.get(k, v) for k, v in self._order().items()}
        if self.sampler is not self.permutation:
            position = 0  # a distributed sampler around ours: it cannot skip, the epoch restarts
        elif saved_order != self._order():
            rank_zero_warn(f"the data order changed since the checkpoint ({saved_order} -> {self._order()}): epoch "
                           f"{epoch} restarts from its first sample")
            position = 0
        position = min(position, self.permutation.size)
        self.batch_count_correction = batches_done(self.permutation.size, self.batch_size, position) - saved_batches
        if position == self.permutation.size:  # saved at the end of an epoch: continue with the next one
            epoch, position = epoch + 1, 0
        self.permutation.epoch, self.permutation.skip = epoch, position
        self._continue_saved_epoch = True
