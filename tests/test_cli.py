"""Configs are parsed and run by LightningCLI, as a user runs them."""
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
    "multi_reward_rl.yaml": "teacher_rl/correctness.yaml", "cascade_1.yaml": "teacher_rl/correctness.yaml",
    "cascade_2.yaml": "teacher_rl/brightness.yaml", "cascade_3.yaml": "teacher_rl/compress.yaml",
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
