"""A training step is one batch for every method, whatever its number of optimiser updates: ``max_steps`` runs that
many, and the progress bar counts them up to ``max_steps``."""
import lightning as L
import pytest
import torch

from lit_distill.callbacks import StepProgressBar
from lit_distill.data import ImageDataModule
from lit_distill.methods import NoDistillOneStep, TeacherRL

TINY = {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32}
PROMPTS = {"prompt": ["a handwritten seven", "a handwritten one"], "task": ["ink", "ink"], "digit": torch.tensor([7, 1])}


class Counts(L.Callback):
    """Training steps (batches) and optimiser updates that actually ran."""

    def __init__(self):
        self.batches, self.updates = 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.updates += 1


def fit(module, data, max_steps, **kwargs):
    counts = Counts()
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0, **kwargs)
    trainer.callbacks.append(counts)
    trainer.fit(module, data)
    return trainer, counts


@pytest.mark.parametrize("method", ["teacher_rl", "nodistill"])
def test_max_steps_counts_training_steps_not_optimiser_updates(method):
    torch.manual_seed(0)
    if method == "teacher_rl":  # 2 prompts x 4 rollouts x 4 steps = 32 pairs in minibatches of 8: 4 updates a step
        module = TeacherRL("embedded", "brightness", TINY, sampling={"num_steps": 4, "rollouts_per_prompt": 4},
                           updates={"minibatch_size": 8})
        data, per_step = torch.utils.data.DataLoader(range(64), batch_size=2, collate_fn=lambda _: PROMPTS), 4
    else:  # a classifier update every step, a generator update with it
        module = NoDistillOneStep("embedded", TINY, optim={"aux_updates_per_generator_update": 1})
        data, per_step = ImageDataModule(resolution=8, batch_size=4, val_fraction=0.0), 2
    trainer, counts = fit(module, data, 3, enable_progress_bar=False)
    assert trainer.global_step == 3 and counts.batches == 3
    assert counts.updates == 3 * per_step


def test_progress_bar_counts_steps_up_to_max_steps():
    torch.manual_seed(0)
    module = TeacherRL("embedded", "brightness", TINY, sampling={"num_steps": 4, "rollouts_per_prompt": 4},
                       updates={"minibatch_size": 8})
    bar = StepProgressBar()
    data = torch.utils.data.DataLoader(range(4), batch_size=2, collate_fn=lambda _: PROMPTS)  # 2 batches an epoch
    trainer, _ = fit(module, data, 3, callbacks=[bar])
    tqdm = bar.train_progress_bar
    assert (tqdm.n, tqdm.total) == (3, 3)  # across the epoch boundary, in steps
    assert tqdm.desc.startswith("TeacherRL steps")
