"""Each method improves its own objective on a tiny real task (CPU-sized)."""
import lightning as L
import pytest
import torch

from lit_distill.data import ImageDataModule
from lit_distill.losses import per_step_kl
from lit_distill.methods import DiffusionPretrain, OPDStudent, TeacherRL
from lit_distill.models.builders import build_embedded_model

TINY = {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32}
PROMPTS = {"prompt": ["a handwritten seven", "a handwritten one"], "task": ["ink", "ink"], "digit": torch.tensor([7, 1])}


def fit(module, loader, steps):
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(module, loader)


def prompt_loader():
    return torch.utils.data.DataLoader(list(range(64)), batch_size=2, collate_fn=lambda _: PROMPTS)


def test_pretraining_lowers_the_denoising_loss():
    torch.manual_seed(0)
    module = DiffusionPretrain("embedded", TINY, optim={"lr": 2e-3})
    data = ImageDataModule("embedded:digits", resolution=8, batch_size=64)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    torch.manual_seed(1)
    before = float(module._loss(batch))
    fit(module, data, 60)
    torch.manual_seed(1)
    after = float(module._loss(batch))
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("window", [None, {"size": 2}], ids=["every_step", "sde_window"])
def test_teacher_rl_raises_its_reward(window):
    """Also with the fast setting: only a random window of 2 of the 4 steps stochastic and trained."""
    torch.manual_seed(0)
    module = TeacherRL("embedded", {"name": "brightness", "target": 1.0}, TINY,
                       sampling={"num_steps": 4, "rollouts_per_prompt": 4, "eval_steps": 4, "sde_window": window},
                       updates={"minibatch_size": 32 if window is None else 16}, optim={"lr": 3e-4})

    def reward():
        images = module.generate_eval_samples(8, torch.Generator().manual_seed(0), PROMPTS["prompt"] * 4)
        return float(module.reward(images, PROMPTS["prompt"] * 4, ["ink"] * 8).mean())

    before = reward()
    fit(module, prompt_loader(), 30)
    after = reward()
    assert after > before + 0.05, (before, after)


def test_opd_lowers_the_per_step_kl_to_its_teacher(tmp_path):
    torch.manual_seed(0)
    build_embedded_model(**TINY, seed=1).save_pretrained(tmp_path / "teacher")
    module = OPDStudent("embedded", {"ink": str(tmp_path / "teacher")}, {**TINY, "seed": 0},
                        sampling={"num_steps": 4, "rollouts_per_prompt": 2, "eval_steps": 4},
                        updates={"minibatch_size": 16}, optim={"lr": 1e-3})
    cond, uncond = module.encode(PROMPTS["prompt"] * 4)
    traj = module.sample_trajectories(module.model, cond, uncond, 8, torch.Generator().manual_seed(0))
    rows, steps = module.training_pairs(traj, None, torch.Generator().manual_seed(0), stochastic_only=False)
    target = module.teacher_means(traj, rows, steps, PROMPTS["prompt"] * 4, ["ink"] * 8)

    def kl():
        with torch.no_grad():
            mean, std = module.kernel(module.model, traj, rows, steps, cond, uncond)
            return float(per_step_kl(mean, target, std).mean())

    before = kl()
    fit(module, prompt_loader(), 30)
    after = kl()
    assert after < 0.5 * before, (before, after)


def test_pretrain_refuses_images_of_the_wrong_size_or_channels():
    import pytest

    module = DiffusionPretrain("embedded", TINY)
    for images in (torch.zeros(2, 1, 16, 16), torch.zeros(2, 3, 8, 8)):
        with pytest.raises(ValueError, match=r"batch\["):
            module._loss({"image": images, "prompt": ["a", "b"]})
