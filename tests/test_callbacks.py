"""Every callback on every method (tiny models, two steps): the callbacks read the modules only through
``lit_distill.protocols``, so FID works on a reward-tuned model and reward evaluation on a one-step generator;
a Lightning checkpoint loaded as a model source gives the weights the method's export writes."""
import math

import lightning as L
import pytest
import torch
from torch import nn

from lit_distill.callbacks import ExportCallback, FIDCallback, RewardCallback, TrainingClock
from lit_distill.data import ImageDataModule
from lit_distill.methods import (
    DiffusionPretrain, DisBackStudent, NoDistillOneStep, OPDStudent, TeacherRL, load_source)
from lit_distill.models import DiffusionModel
from lit_distill.models.builders import build_embedded_model
from lit_distill.protocols import DistributedHints, EvalSampler, Exportable, ImageCounter

TINY = {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32}
ROWS = [{"prompt": "a handwritten seven", "task": "bright", "digit": 7},
        {"prompt": "a handwritten one", "task": "dark", "digit": 1}]
REWARD = {"name": "per_task", "rewards": {"bright": {"name": "brightness", "target": 1.0},
                                          "dark": {"name": "brightness", "target": 0.0}}}
METHODS = ["pretrain", "teacher_rl", "opd", "disback", "nodistill"]


class Pooled(nn.Module):
    """Cheap fixed features for the tests: 4x4 average pooling of 8x8 images -> 4 features."""

    def forward(self, images):
        return nn.functional.avg_pool2d(images, 4).flatten(1)


def prompt_loader():
    batch = {"prompt": [r["prompt"] for r in ROWS], "task": [r["task"] for r in ROWS], "digit": torch.tensor([7, 1])}
    return torch.utils.data.DataLoader(list(range(8)), batch_size=2, collate_fn=lambda _: batch)


def build(method: str, tmp_path):
    """(module, data) of ``method`` at the tiny size."""
    images = ImageDataModule(resolution=8, batch_size=4, val_fraction=0.0)
    if method == "pretrain":
        return DiffusionPretrain("embedded", TINY, eval_steps=2), images
    if method == "teacher_rl":
        sampling = {"num_steps": 2, "rollouts_per_prompt": 2, "eval_steps": 2}
        return TeacherRL("embedded", "brightness", TINY, sampling=sampling), prompt_loader()
    if method == "opd":
        build_embedded_model(**TINY, seed=1).save_pretrained(tmp_path / "teacher")
        teachers = {"bright": str(tmp_path / "teacher"), "dark": str(tmp_path / "teacher")}
        return OPDStudent("embedded", teachers, TINY, sampling={"num_steps": 2, "eval_steps": 2}), prompt_loader()
    if method == "disback":
        return DisBackStudent("embedded", TINY, backtracking=False), images
    return NoDistillOneStep("embedded", TINY, optim={"aux_updates_per_generator_update": 1}), images


def net_state(model: DiffusionModel) -> dict:
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
def test_every_callback_runs_on_every_method(method, tmp_path):
    torch.manual_seed(0)
    module, data = build(method, tmp_path)
    assert all(isinstance(module, p) for p in (EvalSampler, Exportable, ImageCounter, DistributedHints))
    fid = FIDCallback(every_n_steps=1, num_samples=8, features=Pooled(), cache_dir=str(tmp_path / "cache"),
                      batch_size=8, real_source="embedded:digits", resolution=8, max_real=64)
    reward = RewardCallback(ROWS, reward=REWARD, num_prompts=None, every_n_steps=1, output_dir=str(tmp_path / "eval"),
                            save_best=False)
    export = ExportCallback(str(tmp_path / "export"))
    clock = TrainingClock()
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[clock, fid, reward, export])
    trainer.fit(module, data)

    batch = next(iter(data.train_dataloader() if isinstance(data, ImageDataModule) else data))
    assert clock.images == 2 * module.images_per_batch(batch) > 0
    assert list(clock.seconds_at_step) == [0, 1, 2] and clock.seconds == clock.seconds_at_step[2] > 0

    assert len(fid.history) >= 2 and all(math.isfinite(h["fid_Pooled"]) for h in fid.history)
    assert len(reward.history) >= 2 and all(math.isfinite(h["reward"]) for h in reward.history)
    grids = sorted((tmp_path / "eval").glob("step_*.png"))  # one sample grid per evaluation
    assert len(grids) == len(reward.history)
    exported = DiffusionModel.from_pretrained(tmp_path / "export")
    with module.exported_model() as model:
        expected = net_state(model)
    assert all(torch.equal(exported.net.state_dict()[k], v) for k, v in expected.items())
    # a checkpoint of the run, loaded as a model source, is the exported model
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    from_checkpoint = net_state(load_source(str(tmp_path / "run.ckpt")))
    assert all(torch.equal(from_checkpoint[k], v) for k, v in expected.items())


def test_training_clock_stops_a_run_at_its_budget(tmp_path):
    module, data = build("pretrain", tmp_path)
    clock = TrainingClock(budget_s=0.0)  # spent by the first step
    trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[clock])
    trainer.fit(module, data)
    assert trainer.global_step == 1 and list(clock.seconds_at_step) == [0, 1]
    assert clock.images_per_s == clock.images / clock.seconds


def test_a_one_step_method_without_an_auxiliary_network_cannot_be_built():
    from lit_distill.methods.one_step import OneStepModule

    class NoAuxiliary(OneStepModule):
        pass

    with pytest.raises(TypeError, match="auxiliary_parameters"):
        NoAuxiliary()
