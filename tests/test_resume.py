"""Resuming from a Lightning checkpoint continues exactly like an uninterrupted run (CPU, bitwise), and a
checkpoint of another method is refused with a clear message."""
import lightning as L
import pytest
import torch

from lit_distill.data import ImageDataModule
from lit_distill.methods import DiffusionPretrain, OPDStudent, TeacherRL
from lit_distill.models.builders import build_embedded_model

TINY = {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32}
PROMPTS = {"prompt": ["a handwritten seven", "a handwritten one"], "task": ["ink", "ink"], "digit": torch.tensor([7, 1])}


def prompt_loader():
    return torch.utils.data.DataLoader(list(range(64)), batch_size=2, collate_fn=lambda _: PROMPTS)


def fit(module, data, max_steps, ckpt_path=None, save_to=None):
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, deterministic=True)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    if save_to:
        trainer.save_checkpoint(save_to)
    return trainer


def state(module):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}


def same(a, b):
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def assert_resume_is_exact(make, data, half, total, tmp_path):
    torch.manual_seed(0)
    straight = make()
    fit(straight, data(), total)
    torch.manual_seed(0)
    first = make()
    fit(first, data(), half, save_to=tmp_path / "half.ckpt")
    torch.manual_seed(123)  # a different global RNG state: nothing may depend on it
    resumed = make()
    trainer = fit(resumed, data(), total, ckpt_path=tmp_path / "half.ckpt")
    assert trainer.global_step == total
    a, b = state(straight), state(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not same(a[k], b[k])]
    assert not different, different[:5]


def test_teacher_rl_resumes_exactly(tmp_path):
    make = lambda: TeacherRL("embedded", "brightness", {**TINY, "seed": 0}, num_steps=4, group_size=4,  # noqa: E731
                             minibatch_size=16, eval_steps=4, lr=1e-3)
    # 2 prompts x 4 rollouts x 4 steps = 32 pairs: 2 optimiser steps per batch
    assert_resume_is_exact(make, prompt_loader, 4, 8, tmp_path)


def test_opd_resumes_exactly(tmp_path):
    build_embedded_model(**TINY, seed=1).save_pretrained(tmp_path / "teacher")
    make = lambda: OPDStudent("embedded", {"ink": str(tmp_path / "teacher")}, {**TINY, "seed": 0}, num_steps=4,  # noqa: E731
                              minibatch_size=8, rollouts_per_prompt=2, eval_steps=4, lr=1e-3)
    assert_resume_is_exact(make, prompt_loader, 2, 4, tmp_path)


def test_pretrain_with_ema_resumes_exactly(tmp_path):
    make = lambda: DiffusionPretrain("embedded", {**TINY, "seed": 0}, lr=1e-3)  # noqa: E731
    data = lambda: ImageDataModule("embedded:digits", resolution=8, batch_size=32, val_fraction=0.0)  # noqa: E731
    assert_resume_is_exact(make, data, 3, 6, tmp_path)


def test_checkpoint_of_another_method_is_refused(tmp_path):
    module = DiffusionPretrain("embedded", TINY, lr=1e-3)
    fit(module, ImageDataModule("embedded:digits", resolution=8, batch_size=32, val_fraction=0.0), 1,
        save_to=tmp_path / "pretrain.ckpt")
    rl = TeacherRL("embedded", "brightness", TINY, num_steps=4, group_size=4, minibatch_size=16, eval_steps=4)
    with pytest.raises(ValueError, match="written by method 'pretrain' but this run is 'teacher_rl'"):
        fit(rl, prompt_loader(), 2, ckpt_path=tmp_path / "pretrain.ckpt")
