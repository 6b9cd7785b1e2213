"""Every use of Lightning's private API in lit_distill, in one module, for the Lightning versions it was written
against (:data:`TESTED`). Each function says what it needs that Lightning has no public API for;
``tests/test_lightning_internals.py`` checks each against the installed Lightning, and importing this module
under an untested version raises an error that names the supported range. A leaf: it imports nothing of
lit_distill.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import lightning
import torch

#: ``(major, minor)`` versions of Lightning whose internals this module was checked against
TESTED = ((2, 5), (2, 6))


def check_version(version: str = lightning.__version__) -> None:
    """Raise ``ImportError`` unless ``version``'s major.minor is in :data:`TESTED`."""
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    if major_minor not in TESTED:
        supported = ", ".join(f"{a}.{b}" for a, b in TESTED)
        raise ImportError(f"lit_distill uses Lightning internals checked on Lightning {supported}, but Lightning "
                          f"{version} is installed: install lightning>=2.5,<2.7 (pip install 'lightning>=2.5,<2.7')")


check_version()


def attached_trainer(module: "lightning.LightningModule") -> Optional["lightning.Trainer"]:
    """The trainer ``module`` is attached to, or None (``module.trainer`` raises when there is none)."""
    return module._trainer


def grad_scaler(trainer: Optional["lightning.Trainer"]) -> Optional[torch.amp.GradScaler]:
    """The fp16 loss scaler of the trainer's precision plugin, or None (bf16, fp32, no trainer): manual clipping
    and fused optimisers depend on it, and the plugin does not expose it publicly."""
    if trainer is None:
        return None
    return getattr(trainer.precision_plugin, "scaler", None)


def set_callback_metric(trainer: "lightning.Trainer", name: str, value: torch.Tensor) -> None:
    """Put ``value`` into ``trainer.callback_metrics`` (what ModelCheckpoint monitors) from a callback hook in
    which ``LightningModule.log`` is not allowed (``on_train_end``)."""
    trainer.callback_metrics[name] = value


def shift_batch_count(trainer: "lightning.Trainer", correction: int) -> None:
    """Add ``correction`` to the fit loop's count of the batches done in the current epoch (all four progress
    fields, floored at 0): Lightning ends an epoch by that count and has no public way to set it."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    for field in ("ready", "started", "processed", "completed"):
        setattr(progress, field, max(getattr(progress, field) + correction, 0))


def save_last_checkpoint(callback: Any, trainer: "lightning.Trainer") -> bool:
    """Have a ``ModelCheckpoint`` write its ``last`` checkpoint now, from any hook, unless Lightning would skip
    saving at this point (sanity check, fast_dev_run, same step already saved); returns whether it saved.
    ``ModelCheckpoint`` saves only on its own schedule publicly."""
    if callback._should_skip_saving_checkpoint(trainer):
        return False
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
    return True


class ConfigIsTheRun:
    """Mixin for a ``LightningCLI`` subclass: a ``--ckpt_path`` file does not replace the model's settings by the
    checkpoint's (LightningCLI's default, in its private ``_parse_ckpt_path``, silently undid changed settings);
    the given config is the run, and the module compares the settings on resume."""

    def _parse_ckpt_path(self) -> None:
        pass


def set_ddp_find_unused_parameters(strategy: Any, value: bool) -> None:
    """Set the ``find_unused_parameters`` that a ``DDPStrategy`` passes to ``DistributedDataParallel``: Lightning
    takes it only as a constructor argument, before the module it depends on is known."""
    strategy._ddp_kwargs["find_unused_parameters"] = bool(value)


def ddp_find_unused_parameters(strategy: Any) -> Optional[bool]:
    """The ``find_unused_parameters`` a ``DDPStrategy`` passes to ``DistributedDataParallel`` (None: unset)."""
    return strategy._ddp_kwargs.get("find_unused_parameters")


def set_model_parallel_sizes(strategy: Any, data_parallel: int, tensor_parallel: int) -> None:
    """Fix a ``ModelParallelStrategy``'s mesh sizes before its ``setup_environment`` builds the device mesh
    (its constructor takes them before the number of processes is known)."""
    strategy._data_parallel_size, strategy._tensor_parallel_size = data_parallel, tensor_parallel


def model_parallel_setup(strategy: Any, trainer: "lightning.Trainer", parallelize: Callable[[], None]) -> None:
    """``ModelParallelStrategy.setup`` without its requirement of a ``configure_model`` hook: the accelerator, the
    precision plugin's conversion, the model on its device, then ``parallelize()`` (the caller shards the
    networks), a barrier, and when fitting the optimisers, whose state is moved to the device."""
    from lightning.fabric.utilities.optimizer import _optimizers_to_device
    from lightning.pytorch.trainer.states import TrainerFn

    strategy.accelerator.setup(trainer)
    strategy.model = strategy.precision_plugin.convert_module(strategy.model)
    strategy.model_to_device()
    parallelize()
    strategy.barrier()
    fitting = trainer.state.fn == TrainerFn.FITTING
    if fitting:
        strategy.setup_optimizers(trainer)
    strategy.setup_precision_plugin()
    if fitting:
        _optimizers_to_device(strategy.optimizers, strategy.root_device)


def count_one_step_per_batch(trainer: "lightning.Trainer") -> None:
    """Under manual optimisation make ``trainer.global_step`` (so ``max_steps``, the progress bar, checkpoint and
    ``every_n_steps`` periods) count training steps, one per ``training_step`` that makes an optimiser update, as
    under automatic optimisation, instead of every ``optimizer.step()`` (TeacherRL makes several per batch).
    Lightning's manual loop reads the two hooks around each ``optimizer.step()`` from these attributes at the start
    of every batch; the replacements count only the first step of each batch. Idempotent."""
    epoch_loop = trainer.fit_loop.epoch_loop
    manual = epoch_loop.manual_optimization
    if getattr(manual, "_counts_one_step_per_batch", False):
        return
    progress, counted = manual.optim_step_progress, {"ready": None, "completed": None}

    def first_of_batch(event: str) -> bool:
        batch = epoch_loop.batch_progress.total.ready
        first, counted[event] = counted[event] != batch, batch
        return first

    def before_step() -> None:
        if first_of_batch("ready"):
            progress.increment_ready()
        trainer.profiler.start("optimizer_step")

    def after_step() -> None:
        trainer.profiler.stop("optimizer_step")
        if first_of_batch("completed"):
            progress.increment_completed()

    manual._on_before_step, manual._on_after_step = before_step, after_step
    manual._counts_one_step_per_batch = True


def count_checkpoint_steps_per_batch(checkpoint: dict) -> None:
    """Rewrite the step count of a manual-optimisation checkpoint written when every ``optimizer.step()`` was a
    step (lit_distill checkpoint layout 1) to one step per batch, before Lightning restores its loops from it."""
    loops = checkpoint.get("loops", {}).get("fit_loop")
    if not loops:
        return
    batches = int(loops["epoch_loop.batch_progress"]["total"]["completed"])
    steps = loops["epoch_loop.manual_optimization.optim_step_progress"]
    for part in ("total", "current"):
        steps[part]["ready"] = steps[part]["completed"] = batches
    checkpoint["global_step"] = batches
