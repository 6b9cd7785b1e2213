"""ExportCallback: write the trained model where the next stage of a pipeline reads it."""
from __future__ import annotations

import lightning as L


class ExportCallback(L.Callback):
    """At the end of training, call ``pl_module.export(dirpath)`` on rank zero: a diffusers-style
    directory that ``model: <dirpath>`` (or ``teachers: {task: <dirpath>}``) of another config loads.
    Every method defines ``export``: the EMA model for DiffusionPretrain, the trained (LoRA-merged)
    model for TeacherRL and OPDStudent, the generator for the one-step methods."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.export(self.dirpath)
