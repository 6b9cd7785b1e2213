"""StepProgressBar: a training progress bar in the unit ``max_steps`` counts.

Every lit_distill method makes one training step per batch, whatever the number of optimiser updates in it
(TeacherRL and OPDStudent: all the minibatch updates on one rollout batch; the one-step methods: an auxiliary
update and maybe a generator update), so ``trainer.global_step`` and ``max_steps`` count the same thing. This
bar shows ``global_step / max_steps`` for the whole run (across epochs and from where a resumed run starts),
named after the module, instead of Lightning's per-epoch batch count ("Epoch 0/-2 ... 30/150").
``lit-distill fit`` and the pipeline use it unless a config names its own progress bar.
"""
from __future__ import annotations

from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training bar counts ``trainer.global_step`` up to ``max_steps`` (or to the batches
    of all epochs when only ``max_epochs`` is set), labelled "<Module> steps", with the logged progress-bar
    metrics beside it."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.train_progress_bar.reset(total=self.total_steps(trainer))
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(f"{type(pl_module).__name__} steps")
        self._show(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        """One bar for the whole run: nothing restarts with an epoch."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.is_enabled and (step % self.refresh_rate == 0 or step == self.train_progress_bar.total):
            self._show(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._show(trainer, pl_module)

    def _show(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    @staticmethod
    def total_steps(trainer: L.Trainer) -> Optional[int]:
        """``max_steps`` when set, else the batches of all epochs (None when unbounded)."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        batches, epochs = trainer.num_training_batches, trainer.max_epochs
        if epochs is None or epochs < 0 or batches == float("inf"):
            return None
        return int(batches) * int(epochs)
