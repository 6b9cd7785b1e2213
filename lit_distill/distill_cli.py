"""``DistillCLI``: the LightningCLI behind ``lit-distill fit`` (and validate / test / predict).

Importing this module registers the methods, data modules and callbacks (configs and the command line may name
them by class name: ``--model TeacherRL``, ``--model.help TeacherRL``). ``lit_distill.cli`` imports it only when a
subcommand runs, because importing Lightning takes seconds.
"""
from __future__ import annotations

import importlib
import time
from typing import Optional

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from . import callbacks, data, methods  # noqa: F401 - registers the classes under their short names
from .lightning_internals import ConfigIsTheRun
from .quiet import quiet_third_party
from .run_report import fit_report
from .utils import tiny_run

#: ``LIT_DISTILL_TINY=1``: the most optimiser steps, FID samples and evaluation prompts of any run.
SMOKE_TEST = {"max_steps": 6, "num_samples": 64, "num_prompts": 12}


class DistillCLI(ConfigIsTheRun, LightningCLI):
    """LightningCLI with subclass mode for modules and data, so configs name ``class_path``es (or class names), and
    OmegaConf interpolation inside each config file: a value written once under the top-level ``shared:`` mapping
    (or anywhere else in the file) is referred to as ``${shared.NAME}``. Interpolations are resolved as the file is
    read, so a command-line override changes the key it names, not the values copied from ``shared``.

    The given config is the run (:class:`~lit_distill.lightning_internals.ConfigIsTheRun`): a ``--ckpt_path``
    does not replace its settings by the checkpoint's; the methods compare them on resume and log each change or
    refuse it (``DistillModule.on_load_checkpoint``). Quiets the third-party messages every run would repeat, and
    prints where the results went after ``fit``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        interpolation = {"parser_mode": "omegaconf"}
        kwargs.setdefault("parser_kwargs", {**interpolation, **{name: interpolation for name in self.subcommands()}})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--shared", type=Optional[dict], default=None,
                            help="Values a config writes once and refers to as ${shared.NAME} (OmegaConf "
                                 "interpolation), e.g. the task or the reward map shared by several sections.")

    def instantiate_classes(self) -> None:
        """Raise a class's own error (it names the field and the fix) instead of jsonargparse's "Does not validate
        against any of the Union subtypes" wrapper, which buries it in a dump of every argument."""
        try:
            super().instantiate_classes()
        except ValueError as e:
            cause = e.__cause__
            while isinstance(cause, ValueError) and "Union subtypes" in str(cause) and cause.__cause__ is not None:
                cause = cause.__cause__
            if "Union subtypes" not in str(e) or cause is None:
                raise
            raise cause from cause.__cause__

    def before_instantiate_classes(self) -> None:
        """Quiet third-party messages, shrink a ``LIT_DISTILL_TINY`` run, make the embedded base model first when
        the module's arguments name ``embedded:base``, and show training progress in steps (``StepProgressBar``)
        unless the config names another progress bar."""
        from .pipeline import ensure_embedded_bases

        quiet_third_party()
        config = self.config[self.subcommand] if self.subcommand else self.config
        if tiny_run():
            shrink_to_smoke_test(config)
        model = config.get("model")
        init_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        if init_args is not None:
            ensure_embedded_bases(init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args))
        if config.get("trainer") is not None:
            add_step_progress_bar(config["trainer"])

    def before_fit(self) -> None:
        self._fit_started = time.time()

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(fit_report(self.trainer, time.time() - self._fit_started), flush=True)


def add_step_progress_bar(trainer: Namespace) -> None:
    """Append ``StepProgressBar`` to a parsed trainer config's callbacks, unless the bar is off or the config
    names a progress bar of its own."""
    if trainer.get("enable_progress_bar") is False:
        return
    configured = list(trainer.get("callbacks") or [])
    for callback in configured:
        path = callback.get("class_path", "") if isinstance(callback, Namespace) else ""
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None) if module else type(callback)
        if isinstance(cls, type) and issubclass(cls, ProgressBar):
            return
    trainer["callbacks"] = configured + [Namespace(class_path="lit_distill.callbacks.StepProgressBar",
                                                   init_args=Namespace())]


def shrink_to_smoke_test(config) -> None:
    """Cap a parsed ``fit`` config at the :data:`SMOKE_TEST` sizes (``max_steps``; FID ``num_samples``; reward
    evaluation ``num_prompts``, one sample each); ``"embedded:base"`` becomes the tiny base recipe by itself
    (``default_base_recipe``). Nothing else changes, so a config that fails at its own settings still fails."""
    trainer = config["trainer"]
    steps = trainer.get("max_steps")
    trainer["max_steps"] = SMOKE_TEST["max_steps"] if steps is None or steps < 0 else min(steps, SMOKE_TEST["max_steps"])
    for callback in trainer.get("callbacks") or []:
        args = callback.get("init_args") if hasattr(callback, "get") else None
        if args is None:
            continue
        if "num_samples" in args:
            args["num_samples"] = min(args["num_samples"], SMOKE_TEST["num_samples"])
        if "num_prompts" in args:
            args["num_prompts"] = min(args["num_prompts"] or SMOKE_TEST["num_prompts"], SMOKE_TEST["num_prompts"])
            args["samples_per_prompt"] = 1
