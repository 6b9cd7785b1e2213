"""lit_distill touches Lightning's private API only in lit_distill/lightning_internals.py, and each use there still
works on the installed Lightning (a new Lightning version fails here, not in a training run)."""
import inspect
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from lit_distill import lightning_internals as internals

PACKAGE = Path(__file__).resolve().parents[1] / "lit_distill"
#: private Lightning names, and writes into Lightning's state, that only lightning_internals.py may use
PRIVATE = re.compile(r"\._trainer\b|\._ddp_kwargs\b|\._setup_model\b|\._(data|tensor)_parallel_size\b|"
                     r"_optimizers_to_device|precision_plugin\.scaler|\"scaler\"|callback_metrics\[|"
                     r"(?<!\\)\.fit_loop\b|\._lightning_optimizers\b|_parse_ckpt_path|_should_skip_saving_checkpoint|"
                     r"_save_last_checkpoint|_monitor_candidates")


def test_only_the_internals_module_touches_lightning_internals():
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path.name != "lightning_internals.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert not offenders, "\n".join(offenders)


def test_version_guard_names_the_supported_versions():
    internals.check_version(L.__version__)  # the installed one is supported (or importing lit_distill failed)
    for version in ("2.4.0", "2.7.0", "3.0.1"):
        with pytest.raises(ImportError, match=r"checked on Lightning 2\.5, 2\.6.*lightning>=2\.5,<2\.7"):
            internals.check_version(version)


def test_trainer_and_grad_scaler_accessors():
    module = L.LightningModule()
    assert internals.attached_trainer(module) is None
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    assert internals.attached_trainer(module) is trainer
    assert internals.grad_scaler(None) is None and internals.grad_scaler(trainer) is None  # fp32: nothing scaled
    from lightning.pytorch.plugins.precision import MixedPrecision

    fp16 = SimpleNamespace(precision_plugin=MixedPrecision("16-mixed", "cpu"))
    assert isinstance(internals.grad_scaler(fp16), torch.amp.GradScaler)
    internals.set_callback_metric(trainer, "fid", torch.tensor(3.0))
    assert float(trainer.callback_metrics["fid"]) == 3.0


def test_strategy_accessors():
    ddp = DDPStrategy()
    assert internals.ddp_find_unused_parameters(ddp) is None
    internals.set_ddp_find_unused_parameters(ddp, True)
    assert internals.ddp_find_unused_parameters(ddp) is True
    mp = ModelParallelStrategy()
    internals.set_model_parallel_sizes(mp, data_parallel=4, tensor_parallel=1)
    assert (mp._data_parallel_size, mp._tensor_parallel_size) == (4, 1)


def test_model_parallel_setup_mirrors_lightnings_own():
    """model_parallel_setup is ModelParallelStrategy.setup minus its configure_model requirement: the steps it
    takes, in the same order, must still be Lightning's."""
    from lightning.fabric.utilities.optimizer import _optimizers_to_device  # noqa: F401 - still importable

    ours = inspect.getsource(internals.model_parallel_setup)
    theirs = inspect.getsource(ModelParallelStrategy.setup)
    steps = ["accelerator.setup(trainer)", "precision_plugin.convert_module(", "model_to_device()", "barrier()",
             "setup_optimizers(trainer)", "setup_precision_plugin()", "_optimizers_to_device("]
    for source in (ours, theirs):
        positions = [source.index(step) for step in steps]
        assert positions == sorted(positions), source


def test_batch_count_and_checkpoint_and_cli_hooks(tmp_path):
    """shift_batch_count moves the fit loop's batch progress; save_last_checkpoint drives ModelCheckpoint's own
    'last' save; ConfigIsTheRun still overrides a method LightningCLI calls."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    progress.ready = progress.started = progress.processed = progress.completed = 3
    internals.shift_batch_count(trainer, 2)
    assert (progress.ready, progress.started, progress.processed, progress.completed) == (5, 5, 5, 5)
    internals.shift_batch_count(trainer, -9)
    assert progress.completed == 0
    for name in ("_should_skip_saving_checkpoint", "_save_last_checkpoint", "_monitor_candidates"):
        assert callable(getattr(ModelCheckpoint, name)), name
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI)  # still called, so still overridden
