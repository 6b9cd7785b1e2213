"""ExportCallback: write the trained model where the next stage of a pipeline reads it."""
from __future__ import annotations

from pathlib import Path

import lightning as L

from ..protocols import Exportable
from ..utils.checkpoint_files import check_writable


class ExportCallback(L.Callback):
    """At the end of training, call ``pl_module.export(dirpath)`` on rank zero: a diffusers-style
    directory that ``model: <dirpath>`` (or ``teachers: {task: <dirpath>}``) of another config loads.
    The module must be ``lit_distill.protocols.Exportable``, as every method is: the EMA model for
    DiffusionPretrain, the trained (LoRA-merged) model for TeacherRL and OPDStudent, the EMA generator for the
    one-step methods. ``dirpath`` is checked writable when fitting starts, so that a bad path fails before the
    training, not after it."""

    def __init__(self, dirpath: str):
        self.dirpath = dirpath

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not isinstance(pl_module, Exportable):
            raise TypeError(f"ExportCallback: {type(pl_module).__name__} has no export(path) / exported_model() "
                            "(lit_distill.protocols.Exportable)")
        if stage == "fit" and trainer.is_global_zero:
            # save_pretrained writes next to dirpath, then swaps it in: its parent must be writable
            check_writable(Path(self.dirpath).expanduser().absolute().parent, f"ExportCallback dirpath={self.dirpath!r}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.export(self.dirpath)
