"""Bad input is named (file, line or field, and the fix) before it costs training time, or handled: NaN rewards
under nan_policy='skip', counts of zero, truncated checkpoints as model / teacher / ckpt_path, prompts longer than
the tokenizer's limit, metadata a reward cannot use, an output directory that cannot be written."""
import lightning as L
import pytest
import torch
from torch import nn

from lit_distill.callbacks import DurableCheckpoint, ExportCallback
from lit_distill.data import PromptDataModule
from lit_distill.data.prompts import write_prompt_file
from lit_distill.methods import NonFiniteLossError, OPDStudent, TeacherRL
from lit_distill.models.builders import build_embedded_model
from lit_distill.rewards import DigitCorrectness, NonFiniteRewardError, Reward

TINY = {"resolution": 8, "block_channels": (16, 32), "text_hidden": 32}


def tiny_rl(reward="brightness", sampling=None, updates=None, **kwargs):
    return TeacherRL("embedded", reward, {**TINY, "seed": 0},
                     sampling={"num_steps": 4, "rollouts_per_prompt": 2, "eval_steps": 4, **(sampling or {})},
                     updates={"minibatch_size": 16, **(updates or {})}, optim={"lr": 1e-3}, **kwargs)


def fit(module, data, max_steps=2, callbacks=(), ckpt_path=None):
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


class NaNForSevens(Reward):
    """Brightness, but NaN for the rows of prompts that name a seven."""

    name = "nan_for_sevens"

    def forward(self, images, prompts, tasks, **metadata):
        scores = images.mean(dim=(1, 2, 3))
        return torch.where(torch.tensor(["seven" in p for p in prompts]), float("nan"), scores)


def alternating_prompts(tmp_path):  # batches alternate: a seven (NaN reward), a one (finite)
    path = write_prompt_file(tmp_path / "p.jsonl", [{"prompt": "a handwritten seven", "task": "ink"},
                                                    {"prompt": "a handwritten one", "task": "ink"}])
    return PromptDataModule(str(path), batch_size=1, shuffle=False, val_fraction=0, repeat=10)


def test_nan_rewards_are_skipped_and_counted_under_skip_and_named_under_raise(tmp_path):
    module = tiny_rl(NaNForSevens(), runtime={"nan_policy": "skip"})
    trainer = fit(module, alternating_prompts(tmp_path), max_steps=2)
    assert trainer.global_step == 2 and module.nonfinite_skipped == 2  # four batches: two skipped, two updates
    assert trainer.callback_metrics["nonfinite_skipped"] == 2
    with pytest.raises(NonFiniteRewardError, match="reward 'nan_for_sevens': returned NaN/inf.*nan_policy='skip'"):
        fit(tiny_rl(NaNForSevens()), alternating_prompts(tmp_path))
    module = tiny_rl(runtime={"nan_policy": "skip"})
    assert module.check_finite("policy loss", torch.tensor(float("nan"))) is False  # losses too (see test_teacher_rl)
    with pytest.raises(NonFiniteLossError):
        tiny_rl().check_finite("policy loss", torch.tensor(float("nan")))


@pytest.mark.parametrize("group, name", [("sampling", "rollouts_per_prompt"), ("updates", "minibatch_size"),
                                         ("updates", "inner_epochs"), ("sampling", "num_steps")])
def test_counts_of_zero_are_refused_by_name(group, name):
    with pytest.raises(ValueError, match=f"{name}=0 must be an integer >= 1"):
        tiny_rl(policy={"advantage": "running"}, **{group: {name: 0}})


def test_zero_rollouts_per_prompt_is_refused(tmp_path):
    build_embedded_model(**TINY).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match="rollouts_per_prompt=0 must be an integer >= 1"):
        OPDStudent("embedded", {"ink": str(tmp_path / "teacher")}, TINY, sampling={"rollouts_per_prompt": 0})


def test_truncated_checkpoints_are_named_as_model_teacher_and_ckpt_path(tmp_path):
    truncated = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(10_000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:20_000])  # a save cut off by a full disk
    with pytest.raises(ValueError, match=r"model='.*cut\.ckpt' cannot be read as a checkpoint \(20000 bytes; .*trunc"):
        TeacherRL(str(truncated), "brightness")
    with pytest.raises(ValueError, match=r"teachers\['ink'\]: model='.*cut\.ckpt' cannot be read"):
        OPDStudent("embedded", {"ink": str(truncated)}, TINY)
    with pytest.raises(ValueError, match=r"ckpt_path='.*cut\.ckpt' cannot be read as a checkpoint"):
        fit(tiny_rl(), alternating_prompts(tmp_path), callbacks=[DurableCheckpoint(tmp_path / "ckpts")],
            ckpt_path=truncated)


def test_a_prompt_longer_than_the_tokenizer_reads_is_named_in_a_warning():
    model = build_embedded_model(**TINY)
    long = "a " + "very " * 20 + "bold handwritten seven"
    with pytest.warns(UserWarning, match=r"prompt 'a very very .* is 26 tokens long, but the text encoder reads 16: "
                                         r"the rest \('(very ){7}bold handwritten seven'\) is cut off"):
        model.encode_prompts(["a handwritten one", long])


def test_a_digit_given_as_a_string_is_named_before_any_rollout(tmp_path, monkeypatch):
    rows = [{"prompt": f"a handwritten {w}", "task": "correctness", "digit": str(d)}
            for d, w in enumerate(["zero", "one", "two"])]
    data = PromptDataModule(str(write_prompt_file(tmp_path / "p.jsonl", rows)), batch_size=2, val_fraction=0)
    reward = DigitCorrectness(classifier=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), resolution=8)
    module = tiny_rl(reward)
    monkeypatch.setattr(module, "sample_trajectories", lambda *a, **k: pytest.fail("a rollout ran"))
    with pytest.raises(ValueError, match=r"reward 'digit_correctness' cannot score the prompts of '.*p\.jsonl' \(checked "
                                         r"before any rollout.*digit: metadata digits must be integers 0..9, got '0' "
                                         r"\(str\); in a prompt file write \"digit\": 7, not \"7\""):
        fit(module, data)


def test_an_unwritable_export_directory_fails_when_fitting_starts(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    module = tiny_rl()
    monkeypatch.setattr(module, "training_step", lambda *a: pytest.fail("training started"))
    with pytest.raises(ValueError, match=r"ExportCallback dirpath='.*a_file/model': cannot write in '.*a_file'"):
        fit(module, alternating_prompts(tmp_path), callbacks=[ExportCallback(str(tmp_path / "a_file" / "model"))])
    with pytest.raises(ValueError, match=r"DurableCheckpoint dirpath='.*a_file/ckpts': cannot write in"):
        fit(module, alternating_prompts(tmp_path), callbacks=[DurableCheckpoint(str(tmp_path / "a_file" / "ckpts"))])
