"""``lit-distill``: the LightningCLI entry point.

``lit-distill fit --config configs/teacher_rl/brightness.yaml`` (any subcommand of LightningCLI),
``lit-distill quickstart`` for the whole embedded pipeline and ``lit-distill embedded-base`` to make the
embedded base model (``fit`` makes it too, before building a module that names ``embedded:base``).
``--import MODULE`` (repeatable) imports a module of yours first, e.g. one whose ``@register_reward("my_reward")``
classes a config then names.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Optional

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from .lightning_internals import ConfigIsTheRun


class DistillCLI(ConfigIsTheRun, LightningCLI):
    """LightningCLI with subclass mode for modules and data, so configs name ``class_path``es, and OmegaConf
    interpolation inside each config file: a value written once under the top-level ``shared:`` mapping (or
    anywhere else in the file) is referred to as ``${shared.NAME}``. Interpolations are resolved as the file is
    read, so a command-line override changes the key it names, not the values copied from ``shared``.

    The given config is the run (:class:`~lit_distill.lightning_internals.ConfigIsTheRun`): a ``--ckpt_path``
    does not replace its settings by the checkpoint's; the methods compare them on resume and log each change or
    refuse it (``DistillModule.on_load_checkpoint``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        interpolation = {"parser_mode": "omegaconf"}
        kwargs.setdefault("parser_kwargs", {**interpolation, **{name: interpolation for name in self.subcommands()}})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

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
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--shared", type=Optional[dict], default=None,
                            help="Values a config writes once and refers to as ${shared.NAME} (OmegaConf "
                                 "interpolation), e.g. the task or the reward map shared by several sections.")

    def before_instantiate_classes(self) -> None:
        """Make the embedded base model first when the module's arguments name ``embedded:base``, and show
        training progress in steps (``StepProgressBar``) unless the config names another progress bar."""
        from .pipeline import ensure_embedded_bases

        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model = config.get("model")
        init_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        if init_args is not None:
            ensure_embedded_bases(init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args))
        if config.get("trainer") is not None:
            add_step_progress_bar(config["trainer"])


def add_step_progress_bar(trainer: Namespace) -> None:
    """Append ``StepProgressBar`` to a parsed trainer config's callbacks, unless the bar is off or the config
    names a progress bar of its own."""
    if trainer.get("enable_progress_bar") is False:
        return
    callbacks = list(trainer.get("callbacks") or [])
    for callback in callbacks:
        path = callback.get("class_path", "") if isinstance(callback, Namespace) else ""
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None) if module else type(callback)
        if isinstance(cls, type) and issubclass(cls, ProgressBar):
            return
    trainer["callbacks"] = callbacks + [Namespace(class_path="lit_distill.callbacks.StepProgressBar",
                                                  init_args=Namespace())]


def usage_error(message: str) -> None:
    sys.stderr.write(f"lit-distill: error: {message}\n")
    raise SystemExit(2)


def import_user_modules(argv: list[str]) -> list[str]:
    """Import the modules named by ``--import MODULE`` / ``--import path/to/file.py`` (the current directory is
    on the import path, as for ``python -m``); returns ``argv`` without those options."""
    rest, names = [], []
    it = iter(argv)
    for arg in it:
        if arg == "--import":
            names.append(next(it, None) or usage_error("--import needs a module name, e.g. --import my_rewards"))
        elif arg.startswith("--import="):
            names.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    if names and "" not in sys.path:
        sys.path.insert(0, "")
    for name in names:
        if name.endswith(".py"):
            path = Path(name)
            if not path.is_file():
                usage_error(f"--import {name}: no such file")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[path.stem] = module
            spec.loader.exec_module(module)
            continue
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name and not name.startswith(f"{e.name}."):
                raise  # the module exists but imports something missing: show where
            usage_error(f"--import {name}: no module named {e.name!r}; run lit-distill from the directory that holds "
                        "it, add its directory to PYTHONPATH, pip install it, or give the path of the .py file")
    return rest


def check_config_files(argv: list[str]) -> None:
    """Name the file and line of an empty or unparsable ``--config`` YAML, and point at a tab, before
    LightningCLI reports it without the file name."""
    import yaml

    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in ("--config", "-c") and i + 1 < len(argv) else \
            arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if value is None or not Path(value).is_file():
            continue  # not a config option, or inline YAML / a missing file: LightningCLI reports those
        text = Path(value).read_text(encoding="utf-8-sig")
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            where = f"{value}:{line}:{mark.column + 1}" if mark is not None else value
            tab = "\t" in text.splitlines()[line - 1] if line else "\t" in text
            hint = (" YAML does not allow tab characters for indentation: replace the tab with spaces" if tab
                    else " fix the syntax at that line")
            usage_error(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e});{hint}")
        if content is None:
            usage_error(f"--config {value}: the file is empty (or only comments); give a config with trainer:, "
                        "model: and data: sections, e.g. one of configs/")
        if not isinstance(content, dict):
            usage_error(f"--config {value}: expected a mapping of settings (trainer:, model:, data:), got a "
                        f"{type(content).__name__}")


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "quickstart":
        from .pipeline import quickstart_main

        quickstart_main(argv[1:])
        return
    if argv and argv[0] == "embedded-base":
        from .pipeline import embedded_base_main

        embedded_base_main(argv[1:])
        return
    argv = import_user_modules(argv)
    check_config_files(argv)
    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = argv
    DistillCLI(args=None if args is None else argv)


if __name__ == "__main__":
    main()
