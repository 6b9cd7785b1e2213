"""Resuming from a Lightning checkpoint continues exactly like an uninterrupted run (CPU, bitwise), and a
checkpoint of another method is refused with a clear message."""
import lightning as L
import pytest
import torch

from lit_distill.callbacks import DurableCheckpoint
from lit_distill.data import ImageDataModule
from lit_distill.methods import DiffusionPretrain, DisBackStudent, OPDStudent, TeacherRL
from lit_distill.methods.base import DistillModule
from lit_distill.methods.settings import Optim, Runtime
from lit_distill.models.builders import build_embedded_model
from lit_distill.utils.checkpoint_files import side_file_state

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
    make = lambda: TeacherRL("embedded", "brightness", {**TINY, "seed": 0},  # noqa: E731
                             sampling={"num_steps": 4, "rollouts_per_prompt": 4, "eval_steps": 4},
                             updates={"minibatch_size": 16}, optim={"lr": 1e-3})
    # 2 prompts x 4 rollouts x 4 steps = 32 pairs: 2 optimiser updates per training step
    assert_resume_is_exact(make, prompt_loader, 2, 4, tmp_path)


def test_opd_resumes_exactly(tmp_path):
    build_embedded_model(**TINY, seed=1).save_pretrained(tmp_path / "teacher")
    make = lambda: OPDStudent("embedded", {"ink": str(tmp_path / "teacher")}, {**TINY, "seed": 0},  # noqa: E731
                              sampling={"num_steps": 4, "rollouts_per_prompt": 2, "eval_steps": 4},
                              updates={"minibatch_size": 8}, optim={"lr": 1e-3})
    assert_resume_is_exact(make, prompt_loader, 1, 2, tmp_path)


def test_pretrain_with_ema_resumes_exactly(tmp_path):
    make = lambda: DiffusionPretrain("embedded", {**TINY, "seed": 0}, optim={"lr": 1e-3})  # noqa: E731
    data = lambda: ImageDataModule("embedded:digits", resolution=8, batch_size=32, val_fraction=0.0)  # noqa: E731
    assert_resume_is_exact(make, data, 3, 6, tmp_path)


def test_checkpoint_of_another_method_is_refused(tmp_path):
    module = DiffusionPretrain("embedded", TINY, optim={"lr": 1e-3})
    fit(module, ImageDataModule("embedded:digits", resolution=8, batch_size=32, val_fraction=0.0), 1,
        save_to=tmp_path / "pretrain.ckpt")
    rl = TeacherRL("embedded", "brightness", TINY, sampling={"num_steps": 4, "rollouts_per_prompt": 4, "eval_steps": 4},
                   updates={"minibatch_size": 16})
    with pytest.raises(ValueError, match="written by method 'pretrain' but this run is 'teacher_rl'"):
        fit(rl, prompt_loader(), 2, ckpt_path=tmp_path / "pretrain.ckpt")


# -- resuming with changed settings: each change is logged and takes effect, or is refused ----------------------
CONFIG = """
seed_everything: 0
trainer:
  max_steps: 2
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  callbacks:
    - class_path: lit_distill.callbacks.DurableCheckpoint
      init_args: {dirpath: ckpts, every_n_train_steps: 1}
model:
  class_path: lit_distill.methods.TeacherRL
  init_args:
    model: embedded
    model_kwargs: {resolution: 8, block_channels: [16, 32], text_hidden: 32}
    reward: {name: brightness, target: 0.6}
    sampling: {num_steps: 4, rollouts_per_prompt: 2, eval_steps: 4}
    updates: {minibatch_size: 64}
    optim: {lr: 0.001}
data:
  class_path: lit_distill.data.PromptDataModule
  init_args: {train: "embedded:digits_multitask", batch_size: 2, repeat: 50}
"""


def test_resume_logs_every_changed_setting_applies_it_or_refuses_it_with_the_fix(tmp_path, monkeypatch):
    from lit_distill.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(CONFIG)
    main(["fit", "--config", "run.yaml"])
    resume = ["fit", "--config", "run.yaml", "--ckpt_path", str(tmp_path / "ckpts/last.ckpt")]
    with pytest.raises(ValueError, match=r"cannot resume TeacherRL from global step 2 with lora_rank=4: the checkpoint "
                                         r"was written with lora_rank=0.*Fix: set lora_rank back to 0"):
        main(resume + ["--model.init_args.lora_rank", "4"])
    with pytest.raises(ValueError, match=r"weights do not fit.*missing \['reference\..*kl_weight: 0.0 -> 0.1"):
        main(resume + ["--model.init_args.policy.kl_weight", "0.1"])  # a reference copy the checkpoint does not have
    with pytest.warns(UserWarning) as warned:
        main(resume + ["--model.init_args.sampling.rollouts_per_prompt", "4", "--model.init_args.optim.lr", "0.0005",
                       "--seed_everything", "1",
                       "--trainer.max_steps", "3", "--data.init_args.batch_size", "1",
                       "--data.init_args.tasks", "[brightness]"])
    messages = " ".join(str(w.message) for w in warned)
    for change in ("sampling.rollouts_per_prompt: 2 -> 4", "optim.lr: 0.001 -> 0.0005", "seed_everything: '0' -> '1'", "max_steps: 2 -> 3",
                   "batch_size: 2 -> 1", "tasks: None -> ['brightness']"):
        assert change in messages, change
    last = torch.load(tmp_path / "ckpts/last.ckpt", weights_only=False)
    assert last["global_step"] == 3 and last["hyper_parameters"]["sampling"]["rollouts_per_prompt"] == 4
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0005  # not the checkpoint's 0.001


class Recorder(DistillModule):
    """Records the prompts of each step; one optimiser step per batch."""

    method = "recorder"

    def __init__(self):
        super().__init__(optim=Optim(lr=0.1, max_grad_norm=None), runtime=Runtime())
        self.automatic_optimization = False
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, list(batch["prompt"])))
        self.apply_update(self.optimizers(), (self.w ** 2).sum(), "loss")

    def configure_optimizers(self):
        return self.make_optimizer([self.w])


def test_a_new_batch_size_keeps_the_data_position_in_samples(tmp_path):
    from lit_distill.data import PromptDataModule
    from lit_distill.data.prompts import write_prompt_file

    prompts = write_prompt_file(tmp_path / "p.jsonl", [{"prompt": f"p{i}", "task": "t"} for i in range(10)])

    def run(batch_size, max_steps, ckpt_path=None, seed=0):  # last.ckpt saved at the end of every batch
        module = Recorder()
        trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[DurableCheckpoint(tmp_path, every_n_train_steps=1)])
        data = PromptDataModule(str(prompts), batch_size=batch_size, val_fraction=0, seed=seed)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module.seen

    first = run(2, 2)  # 4 of the 10 samples of epoch 0
    with pytest.warns(UserWarning, match="batch_size: 2 -> 4"):
        rest = run(4, 5, tmp_path / "last.ckpt")
    order = lambda seed: [f"p{i}" for i in torch.randperm(10, generator=torch.Generator().manual_seed(seed))]  # noqa: E731
    epoch_0, epoch_1 = order(0), order(1)
    # every sample of epoch 0 exactly once (4 + 4 + 2), then epoch 1 from its start, counted as epoch 1
    assert first + rest == [(0, epoch_0[:2]), (0, epoch_0[2:4]), (0, epoch_0[4:8]), (0, epoch_0[8:]), (1, epoch_1[:4])]
    with pytest.warns(UserWarning, match="data order changed.*restarts from its first sample"):
        again = run(4, 6, tmp_path / "last.ckpt", seed=5)
    assert again == [(1, order(5 + 1)[:4])]  # epoch 1 of seed 5, from its start


def test_checkpoint_with_the_flat_settings_of_older_versions_is_migrated(tmp_path):
    """A checkpoint written before the settings were grouped (flat hyper-parameters, no layout mark, a step per
    optimiser update) loads with each setting under its new name and group, and resumes at the right step; a
    setting that no longer exists is refused by name."""
    module = TeacherRL("embedded", "brightness", TINY, sampling={"num_steps": 4, "rollouts_per_prompt": 4, "eval_steps": 4},
                       updates={"minibatch_size": 16, "reduction": "mean"}, policy={"kl_weight": 0.1},
                       optim={"lr": 1e-3}, runtime={"compile": "off"})  # what the flat compile=False reads as
    fit(module, prompt_loader(), 1, save_to=tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    del checkpoint["lit_distill_layout"]
    checkpoint["hyper_parameters"] = dict(  # what TeacherRL wrote with one flat argument per setting
        model="embedded", reward="brightness", model_kwargs=TINY, lora_rank=0, num_steps=4, noise_level=0.7,
        sde_steps=None, guidance_scale=1.0, eval_steps=4, group_size=4, advantage="group", adv_clip=5.0,
        steps_per_sample=None, inner_epochs=1, minibatch_size=16, clip_range=0.2, kl_weight=0.1, reference="copy",
        reference_dtype=None, logprob_reduction="mean", max_grad_norm=1.0, lr=1e-3, weight_decay=0.0,
        nan_policy="raise", compile=False, gradient_checkpointing=False, seed=0)
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = TeacherRL.load_from_checkpoint(tmp_path / "old.ckpt")
    for group in ("sampling", "updates", "policy", "optim", "runtime"):
        assert getattr(loaded, group) == getattr(module, group), group
    assert all(same(a, b) for a, b in zip(state(loaded).values(), state(module).values()))
    checkpoint["hyper_parameters"]["temperature"] = 2.0
    torch.save(checkpoint, tmp_path / "unknown.ckpt")
    with pytest.raises(ValueError, match=r"settings \['temperature'\]"):
        TeacherRL.load_from_checkpoint(tmp_path / "unknown.ckpt")
    # resuming it: its loops counted both optimiser updates of the step as steps; it continues at step 1 of 2
    steps = checkpoint["loops"]["fit_loop"]["epoch_loop.manual_optimization.optim_step_progress"]
    for part in ("total", "current"):
        steps[part]["ready"] = steps[part]["completed"] = 2
    checkpoint["global_step"] = 2
    torch.save(checkpoint, tmp_path / "old_loops.ckpt")
    resumed = TeacherRL("embedded", "brightness", TINY, sampling=module.sampling, updates=module.updates,
                        policy=module.policy, optim=module.optim)
    trainer = fit(resumed, prompt_loader(), 2, ckpt_path=tmp_path / "old_loops.ckpt")
    assert trainer.global_step == 2
    assert not all(same(a, b) for a, b in zip(state(resumed).values(), state(module).values()))  # one more step ran


def test_disback_resumes_exactly_across_a_stage_switch(tmp_path):
    """DisBack fitted in one go, and fitted to a step inside the recording stage, saved and resumed, end with the
    same weights bitwise: the stage and its counters, the recorded path, the real score's target and every random
    draw (a function of seed, step and rank) come back."""
    def make():
        return DisBackStudent("embedded", {**TINY, "seed": 0}, optim={"lr": 1e-3},
                              stages={"num_checkpoints": 2, "degradation_interval": 2, "max_recording_updates": 4,
                                      "iterations_per_stage": 2})

    def data():
        return ImageDataModule("embedded:digits", resolution=8, batch_size=4, val_fraction=0.0)

    half, total = 3, 8  # 4 recording steps (stage 0), then 2 generator updates for each of stages 1 and 2
    torch.manual_seed(0)
    straight = make()
    fit(straight, data(), total)
    first = make()
    fit(first, data(), half, save_to=tmp_path / "half.ckpt")
    assert first.stage_schedule.stage == 0 and straight.stage_schedule.stage == 2
    torch.manual_seed(123)  # a different global RNG state: nothing may depend on it
    resumed = make()
    fit(resumed, data(), total, ckpt_path=tmp_path / "half.ckpt")
    assert resumed.stage_schedule.state_dict() == straight.stage_schedule.state_dict()
    paths = [[side_file_state(entry) for entry in module.path] for module in (resumed, straight)]
    assert all(same(a[k], b[k]) for a, b in zip(*paths) for k in a)
    a, b = state(straight), state(resumed)
    different = [k for k in a if not same(a[k], b[k])]
    assert not different, different[:5]
