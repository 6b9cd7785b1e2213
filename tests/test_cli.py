"""Configs are parsed and run by LightningCLI, as a user runs them; the command line's help."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_distill.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = '{resolution: 8, block_channels: [16, 32], text_hidden: 32}'


def test_pretrain_config_runs_two_steps_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's checkpoints go to runs/ under the working directory
    out = tmp_path / "model"
    main(["fit", "--config", str(ROOT / "configs/pretrain/digits.yaml"), "--trainer.max_steps", "2",
          "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "1", "--trainer.logger", "false",
          f"--trainer.default_root_dir={tmp_path}", f"--model.model_kwargs={TINY}", "--data.resolution", "8",
          f"--trainer.callbacks.dirpath={out}"])
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir()
    assert (tmp_path / "runs/pretrain_digits/checkpoints/last.ckpt").is_file()


OVERLAYS = {  # configs applied on top of another one (a second --config)
    "multi_reward_rl.yaml": "teacher_rl/brightness.yaml", "cascade_1.yaml": "teacher_rl/brightness.yaml",
    "cascade_2.yaml": "teacher_rl/compress.yaml", "cascade_3.yaml": "teacher_rl/slant.yaml",
}


def test_every_config_parses(capsys):
    for config in sorted((ROOT / "configs").rglob("*.yaml")):
        if "strategies" in config.parts:
            continue
        configs = ["--config", str(config)]
        if config.name in OVERLAYS:
            configs = ["--config", str(ROOT / "configs" / OVERLAYS[config.name])] + configs
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *configs, "--print_config"])
        assert exit_info.value.code == 0, config
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["class_path"].startswith("lit_distill."), config


def test_unknown_config_key_names_the_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/pretrain/digits.yaml"), "--model.init_args.learning_rate", "1"])
    assert exit_info.value.code != 0
    assert "learning_rate" in capsys.readouterr().err


def test_type_error_in_config_value_names_the_field(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/pretrain/digits.yaml"), "--model.init_args.lr", "fast"])
    assert exit_info.value.code != 0
    assert "lr" in capsys.readouterr().err


def test_empty_yaml_and_a_tab_in_yaml_name_the_file(tmp_path, capsys):
    empty, tabbed = tmp_path / "empty.yaml", tmp_path / "tabbed.yaml"
    empty.write_text("# nothing yet\n")
    tabbed.write_text("trainer:\n  max_steps: 2\n\tdevices: 1\n")
    for config, message in [(empty, f"--config {empty}: the file is empty"),
                            (tabbed, f"{tabbed}:3:1: not valid YAML .*tab characters for indentation")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(config)])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), message


RUN = """
trainer: {max_steps: 1, accelerator: cpu, logger: false, enable_checkpointing: false, enable_progress_bar: false,
          enable_model_summary: false, limit_val_batches: 0}
model:
  class_path: lit_distill.methods.TeacherRL
  init_args: {model: embedded, model_kwargs: {resolution: 8, block_channels: [16, 32], text_hidden: 32},
              sampling: {num_steps: 2, rollouts_per_prompt: 2, eval_steps: 2}, updates: {minibatch_size: 64}}
data:
  class_path: lit_distill.data.PromptDataModule
  init_args: {train: "embedded:digits_brightness", batch_size: 1}
"""

MY_REWARD = """
import torch
from lit_distill.rewards import Reward, register_reward

@register_reward("{name}")
class Darkness(Reward):
    calls = 0

    def forward(self, images, prompts, tasks, **metadata):
        type(self).calls += 1
        return -images.mean(dim=(1, 2, 3))
"""


def test_import_registers_a_users_reward_for_the_cli(tmp_path, monkeypatch):
    module, name = f"rewards_{tmp_path.name}", f"darkness_{tmp_path.name}"  # unique: the registry is global
    (tmp_path / f"{module}.py").write_text(MY_REWARD.replace("{name}", name))
    (tmp_path / "run.yaml").write_text(RUN)
    monkeypatch.chdir(tmp_path)
    run = ["fit", "--config", "run.yaml", "--model.init_args.reward", name]
    with pytest.raises(ValueError, match=f"unknown reward name '{name}'.*--import your_module"):
        main(run)  # named, not buried in jsonargparse's "Union subtypes" dump
    main(["--import", module, *run])
    assert sys.modules[module].Darkness.calls >= 2  # the check before the first rollout, then training
    with pytest.raises(SystemExit) as exit_info:
        main(["--import", "no_such_module_here", *run])
    assert exit_info.value.code == 2


def test_truncated_checkpoint_as_model_is_named_through_the_cli(tmp_path):
    (tmp_path / "run.yaml").write_text(RUN)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ValueError, match=r"^model='.*cut\.ckpt' cannot be read as a checkpoint"):
        main(["fit", "--config", str(tmp_path / "run.yaml"), "--model.init_args.model", str(cut)])


def test_loading_embedded_base_never_trains_and_names_the_command_that_makes_it(tmp_path):
    from lit_distill.models import EmbeddedBaseMissing, embedded_base_dir, load_model
    from lit_distill.models.builders import build_embedded_model

    with pytest.raises(EmbeddedBaseMissing, match="lit-distill embedded-base"):
        load_model("embedded:base", resolution=8, cache_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
    build_embedded_model(resolution=8, block_channels=(16, 32), text_hidden=32).save_pretrained(
        embedded_base_dir(8, "flow", str(tmp_path)))
    assert load_model("embedded:base", resolution=8, cache_dir=str(tmp_path)).sample_shape == (1, 8, 8)


class MadeBase(Exception):
    pass


def test_fit_makes_the_embedded_bases_a_config_names_before_building_the_module(monkeypatch):
    from lit_distill import pipeline

    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        return Path("unused")

    monkeypatch.setattr(pipeline, "ensure_embedded_base", record)
    pipeline.ensure_embedded_bases({"model": "embedded:base", "model_kwargs": {"resolution": 8, "seed": 1},
                                    "teachers": {"a": "embedded:base", "b": "some/dir"}, "reward": "brightness"})
    assert calls == [{"resolution": 8}, {}]

    def stop(**kwargs):
        raise MadeBase(kwargs)

    monkeypatch.setattr(pipeline, "ensure_embedded_base", stop)
    with pytest.raises(MadeBase):
        main(["fit", "--config", str(ROOT / "configs/teacher_rl/brightness.yaml")])


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_top_level_help_lists_quickstart_without_importing_torch():
    result = run_python("import sys; from lit_distill.cli import main; main(['--help']); "
                        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert "quickstart" in result.stdout and "fit" in result.stdout
    assert result.stdout.strip().endswith("[]")  # nothing heavy imported: help answers at once


HEAVY_AT_EXIT = "import atexit, sys; atexit.register(lambda: print('heavy:', sorted(m for m in ('torch', 'lightning') if m in sys.modules)))"


@pytest.mark.parametrize("command", ["quickstart", "embedded-base"])
def test_subcommand_help_answers_without_importing_torch(command):
    result = run_python(f"{HEAVY_AT_EXIT}; from lit_distill.cli import main; main([{command!r}, '--help'])")
    assert result.returncode == 0, result.stderr
    assert "--cache-dir" in result.stdout
    assert result.stdout.strip().endswith("heavy: []")  # argparse alone: help answers at once


def test_quickstart_help_shows_every_option_with_its_default_and_meaning():
    result = run_python("import sys; from lit_distill.cli import main; main(['quickstart', '--help'])")
    assert result.returncode == 0, result.stderr
    for option in ("--teacher-steps", "--opd-steps", "--one-step-steps", "--pretrain-steps", "--out-dir"):
        assert option in result.stdout
    assert "(default: 30)" in result.stdout and "training steps of the OPD student" in result.stdout
    from lit_distill.models.base_recipe import BaseRecipe

    assert f"default: {BaseRecipe.max_steps}, the base recipe's" in " ".join(result.stdout.split())


def test_import_lit_distill_is_light_and_exports_methods_lazily():
    result = run_python("import sys, lit_distill; heavy = 'torch' in sys.modules; "
                        "from lit_distill import TeacherRL, OPDStudent, DisBackStudent, NoDistillOneStep, "
                        "DiffusionPretrain, PromptDataModule, ImageDataModule, RewardCallback, FIDCallback, "
                        "ExportCallback; from lit_distill.methods import TeacherRL as T; print(heavy, TeacherRL is T)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


def test_model_help_takes_a_short_class_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "TeacherRL"])
    assert exit_info.value.code == 0
    assert "--model.sampling.rollouts_per_prompt" in capsys.readouterr().out


def test_fit_help_lists_the_methods_and_data_modules(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("TeacherRL", "OPDStudent", "DisBackStudent", "NoDistillOneStep", "DiffusionPretrain",
                 "PromptDataModule", "ImageDataModule"):
        assert f"lit_distill.{name}" in text, name


def test_smoke_test_size_caps_steps_and_evaluations_only():
    from jsonargparse import Namespace

    from lit_distill.distill_cli import SMOKE_TEST, shrink_to_smoke_test

    config = Namespace(trainer=Namespace(max_steps=400, val_check_interval=500, callbacks=[
        Namespace(class_path="lit_distill.callbacks.RewardCallback",
                  init_args=Namespace(num_prompts=None, samples_per_prompt=2, every_n_steps=100)),
        Namespace(class_path="lit_distill.callbacks.FIDCallback", init_args=Namespace(num_samples=1000))]))
    shrink_to_smoke_test(config)
    assert config.trainer.max_steps == SMOKE_TEST["max_steps"] and config.trainer.val_check_interval == 500
    reward, fid = (c.init_args for c in config.trainer.callbacks)
    assert reward.num_prompts == SMOKE_TEST["num_prompts"] and reward.samples_per_prompt == 1
    assert reward.every_n_steps == 100 and fid.num_samples == SMOKE_TEST["num_samples"]
