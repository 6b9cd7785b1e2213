"""Checkpoints for runs that get pre-empted, killed or starved of disk: ``DurableCheckpoint`` and
``AtomicCheckpointIO``.

``DurableCheckpoint`` keeps one file, ``dirpath/last.ckpt``, current: it saves every ``every_n_train_steps``
training steps and/or every ``every_n_minutes`` minutes, at the end of each epoch and of training, and when the
process receives SIGTERM (the signal a scheduler sends before it kills a job). After the SIGTERM save the run exits
with ``requeue_exit_code`` (143 = 128 + SIGTERM by default, non-zero so that a scheduler or a wrapper script
requeues the job instead of marking it done), and the same command with ``--ckpt_path last`` continues exactly
where it stopped. Every checkpoint is written through :class:`AtomicCheckpointIO`: a crash, a kill or a full disk
at any moment leaves the previous ``last.ckpt`` whole (``lit_distill.utils.checkpoint_files``).

See ``docs/durability.md``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from ..lightning_internals import save_last_checkpoint
from ..utils.checkpoint_files import (atomic_save, check_writable, read_checkpoint, resolve_side_files,
                                      temporary_files_of, write_side_files)

REQUEUE_EXIT_CODE = 143  # 128 + SIGTERM: "terminated by the scheduler", what requeue rules and wrappers match on


def is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with :func:`~lit_distill.utils.checkpoint_files.atomic_save` for local
    paths (remote URLs keep Lightning's fsspec writer), side files written next to the checkpoint, and an error
    naming the file when a checkpoint to load is truncated or corrupt."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        atomic_save(write_side_files(checkpoint, path.parent), path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: Optional[bool] = None) -> dict:
        if not is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        path = Path(str(path).removeprefix("file://"))
        # onto the CPU (Lightning moves the restored states to the module's device)
        checkpoint = read_checkpoint(path, "ckpt_path", weights_only=bool(weights_only))
        return resolve_side_files(checkpoint, path.parent)


def install_atomic_io(trainer: L.Trainer) -> None:
    """Use :class:`AtomicCheckpointIO` for ``trainer``'s checkpoints unless a custom CheckpointIO is configured."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class DurableCheckpoint(ModelCheckpoint):
    """Keep ``dirpath/last.ckpt`` current and exit with a requeue code on SIGTERM (see the module docstring).

    Args:
        dirpath: the directory of ``last.ckpt`` (checked writable when fitting starts). ``--ckpt_path last``
            resumes from it; a requeued job can always pass it (with no checkpoint yet, the run starts fresh).
        every_n_train_steps: save when this many training steps (``trainer.global_step``) have passed since the
            last save (None: no step rule).
        every_n_minutes: save when this much wall time has passed since the last save (None: no time rule).
            With both rules, whichever comes first.
        requeue_exit_code: the exit code of a run stopped by SIGTERM after its checkpoint is written.

    Only ``last.ckpt`` is kept (one file, replaced atomically); use Lightning's ``ModelCheckpoint`` next to it to
    keep a history. The SIGTERM decision is taken on every rank together, so all ranks save the same step.
    """

    def __init__(self, dirpath: str, every_n_train_steps: Optional[int] = None, every_n_minutes: Optional[float] = 10.0,
                 requeue_exit_code: int = REQUEUE_EXIT_CODE):
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps={every_n_train_steps}: give a number of steps >= 1, or null")
        if every_n_minutes is not None and not every_n_minutes > 0:
            raise ValueError(f"every_n_minutes={every_n_minutes}: give a positive number of minutes, or null")
        if requeue_exit_code == 0:
            raise ValueError("requeue_exit_code=0 would tell the scheduler that the pre-empted run finished; "
                             f"keep the default {REQUEUE_EXIT_CODE} or another non-zero code")
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)
        self.every_n_steps, self.every_n_minutes = every_n_train_steps, every_n_minutes
        self.requeue_exit_code = requeue_exit_code
        self.preempted = False
        self._steps_at_last_save, self._last_save_time = 0, time.monotonic()

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        install_atomic_io(trainer)
        if stage != "fit" or not trainer.is_global_zero or not is_local(self.dirpath):
            return
        check_writable(self.dirpath, f"DurableCheckpoint dirpath={self.dirpath!r}")
        for stale in temporary_files_of(self.last_path):
            stale.unlink(missing_ok=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps_at_last_save, self._last_save_time = trainer.global_step, time.monotonic()
        if trainer.is_global_zero and trainer.ckpt_path is None and is_local(self.dirpath) and self.last_path.is_file():
            rank_zero_warn(f"{self.last_path} exists from an earlier run and this run does not resume from it: it "
                           "will be overwritten at the first save. To continue that run instead, pass --ckpt_path last.")

    # -- when to save -------------------------------------------------------------------------------
    def _sigterm_received(self, trainer: L.Trainer) -> bool:
        """True on every rank once any rank has received SIGTERM (so that all of them save the same step)."""
        received = bool(getattr(trainer, "received_sigterm", False))
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        return received

    def _due(self, trainer: L.Trainer) -> bool:
        steps = self.every_n_steps is not None and trainer.global_step - self._steps_at_last_save >= self.every_n_steps
        minutes = (self.every_n_minutes is not None
                   and time.monotonic() - self._last_save_time >= 60.0 * self.every_n_minutes)
        return trainer.strategy.broadcast(steps or minutes)  # rank 0's clock decides for all ranks

    def _save_last(self, trainer: L.Trainer) -> None:
        if not save_last_checkpoint(self, trainer):
            return
        self._steps_at_last_save, self._last_save_time = trainer.global_step, time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        if self._sigterm_received(trainer):
            self._save_last(trainer)
            self.preempted = True  # Lightning raises SIGTERMException after this hook: see on_exception
        elif self._due(trainer):
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save_last(trainer)  # also the end of training (max_steps ends the epoch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # saves follow the rules above, not validation

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return  # a crash mid-step leaves no consistent state to save; last.ckpt holds the last good one
        if not self.preempted:  # SIGTERM arrived after this step's check (e.g. during validation)
            self._save_last(trainer)
            self.preempted = True
        # SIGTERMException is a SystemExit with code None (exit status 0, "done"): make the process exit non-zero
        exception.code = self.requeue_exit_code
        saved = f"saved {self.last_path}" if trainer.global_step > 0 else "no step finished, nothing to save"
        rank_zero_info(f"SIGTERM at global step {trainer.global_step}: {saved}; exiting with code "
                       f"{self.requeue_exit_code} so that the job is requeued. Resume with --ckpt_path last.")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "every_n_train_steps": self.every_n_steps, "every_n_minutes": self.every_n_minutes}


__all__ = ["AtomicCheckpointIO", "DurableCheckpoint", "REQUEUE_EXIT_CODE", "install_atomic_io"]
