"""``lit-distill``: the command line.

``lit-distill fit --config configs/teacher_rl/brightness.yaml`` (any subcommand of LightningCLI, run by
:class:`~lit_distill.distill_cli.DistillCLI`), ``lit-distill quickstart`` for the whole embedded pipeline and
``lit-distill embedded-base`` to make the embedded base model (``fit`` makes it too, before building a module
that names ``embedded:base``). ``--import MODULE`` (repeatable) imports a module of yours first, e.g. one whose
``@register_reward("my_reward")`` classes a config then names. This module imports nothing heavy, so
``lit-distill --help`` and ``lit-distill quickstart --help`` answer at once; Lightning is imported when a
subcommand runs.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

SUBCOMMANDS = {
    "fit": "train a method from a config: lit-distill fit --config configs/teacher_rl/brightness.yaml",
    "validate": "run a module's validation loop (LightningCLI)",
    "test": "run a module's test loop (LightningCLI)",
    "predict": "run a module's predict loop (LightningCLI)",
    "quickstart": "the whole embedded chain on a CPU: base model -> task teachers -> OPD student -> one-step "
                  "generator",
    "embedded-base": "train and cache the embedded base model (embedded:base) if it is not cached yet",
}
HELP = f"""usage: lit-distill [-h] [--import MODULE] {{{','.join(SUBCOMMANDS)}}} ...

Reward fine-tuning (TeacherRL), multi-teacher on-policy distillation (OPDStudent) and one-step generators
(DisBackStudent, NoDistillOneStep) for diffusion models, on PyTorch Lightning.

subcommands:
{chr(10).join(f"  {name:<11} {text}" for name, text in SUBCOMMANDS.items())}

options:
  --import MODULE  import a module (or a .py file) of yours first, e.g. one registering a reward; repeatable

`lit-distill SUBCOMMAND --help` shows a subcommand's options; `lit-distill fit --help` lists the methods, data
modules and callbacks, `lit-distill fit --model.help TeacherRL` the arguments of one.
Environment: LIT_DISTILL_CACHE (where the base model and classifier are cached, default ~/.cache/lit_distill),
LIT_DISTILL_TINY=1 (every run at smoke-test size: checks that a command runs, its numbers mean nothing)."""


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
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        if not argv:
            raise SystemExit(2)
        return
    if argv[0] == "quickstart":
        from .pipeline import quickstart_main

        quickstart_main(argv[1:])
        return
    if argv and argv[0] == "embedded-base":
        from .pipeline import embedded_base_main

        embedded_base_main(argv[1:])
        return
    argv = import_user_modules(argv)
    check_config_files(argv)
    from .distill_cli import DistillCLI

    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = argv
    DistillCLI(args=None if args is None else argv)


def __getattr__(name: str):  # `from lit_distill.cli import DistillCLI` without importing Lightning up front
    if name == "DistillCLI":
        from .distill_cli import DistillCLI

        return DistillCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
