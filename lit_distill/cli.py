"""``lit-distill``: the LightningCLI entry point.

``lit-distill fit --config configs/teacher_rl/brightness.yaml`` (any subcommand of LightningCLI), and
``lit-distill quickstart`` for the whole embedded pipeline.
"""
from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI


class DistillCLI(LightningCLI):
    """LightningCLI with subclass mode for modules and data, so configs name ``class_path``es."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "quickstart":
        from .pipeline import quickstart_main

        quickstart_main(argv[1:])
        return
    DistillCLI(args=args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
