"""Resuming with changed settings is never silent.

A run resumed from a checkpoint (``--ckpt_path``) runs with the settings it is given now. Every setting that differs
from the checkpoint's either takes effect and is logged (:func:`log_changes`), or, when the checkpoint makes it
impossible to honour (the trained weights already fix the starting model, the LoRA rank, ...), is refused with the
setting, both values and the fix (:func:`refuse_changes`). The methods compare their own settings, the data modules
theirs, and :func:`run_settings` covers the trainer's (number of steps, seed, devices, ...).
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..lightning_internals import shift_batch_count


def plain(value: Any) -> Any:
    """``value`` with tuples as lists, recursively: a setting read from YAML compares equal to its Python default."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


MISSING = "<not set>"


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{name: (saved value, current value)}`` for every setting that differs (``<not set>`` where one side lacks
    it). Names starting with ``_`` (LightningCLI's bookkeeping) are ignored."""
    names = [k for k in current if not str(k).startswith("_")]
    names += [k for k in saved if not str(k).startswith("_") and k not in current]
    return {k: (saved.get(k, MISSING), current.get(k, MISSING)) for k in names
            if plain(saved.get(k, MISSING)) != plain(current.get(k, MISSING))}


def refuse_changes(changes: Mapping[str, tuple[Any, Any]], fixed: Mapping[str, str], what: str) -> None:
    """Raise a ``ValueError`` for the first changed setting listed in ``fixed`` (``{name: why it cannot change}``)."""
    for name, (old, new) in changes.items():
        if name in fixed:
            raise ValueError(
                f"cannot resume {what} with {name}={new!r}: the checkpoint was written with {name}={old!r}, and "
                f"{fixed[name]}. Fix: set {name} back to {old!r} to resume, or start a new run without --ckpt_path.")


def log_changes(changes: Mapping[str, tuple[Any, Any]], what: str) -> None:
    """Warn (once, on rank zero) that ``what`` resumes with these settings changed, and that they take effect."""
    if changes:
        listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())
        rank_zero_warn(f"resuming {what} with changed settings, which take effect from here on: {listed}")


def run_settings(trainer) -> dict[str, Any]:
    """The trainer-level settings that change what a run trains: number of steps/epochs, the global seed
    (``seed_everything``), the number of processes (the global batch) and gradient accumulation, precision."""
    return {"max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
            "seed_everything": os.environ.get("PL_GLOBAL_SEED"), "world_size": trainer.world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches, "precision": str(trainer.precision)}


def batches_done(dataset_size: int, batch_size: int, position: int) -> int:
    """How many batches an epoch of ``dataset_size`` samples in batches of ``batch_size`` counts as done once the
    first ``position`` samples are: the batches that remain are ``ceil((dataset_size - position) / batch_size)``."""
    return math.ceil(dataset_size / batch_size) - math.ceil((dataset_size - position) / batch_size)


def align_batch_count(trainer) -> None:
    """Make Lightning's count of the batches done in the current epoch match the train loader's position after a
    resume that changed the batches per epoch (``ResumableDataLoader.batch_count_correction``, e.g. a new batch
    size): Lightning ends an epoch by that count, so without this it would end early (skipping the epoch's last
    samples) or late. Call from ``on_train_start`` (after the loader's state is restored, before the epoch starts).
    The count is Lightning-internal (``lightning_internals.shift_batch_count``)."""
    loader = trainer.train_dataloader
    correction = getattr(loader, "batch_count_correction", 0)
    if not correction:
        return
    shift_batch_count(trainer, correction)
    loader.batch_count_correction = 0
