"""One recipe, one cache folder: the embedded base model is named by everything that makes it."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from lit_distill.models.base_recipe import TINY_BASE_RECIPE, BaseRecipe, default_base_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_of_the_recipe_names_its_folder():
    base = BaseRecipe()
    assert base.name == BaseRecipe().name and base.name.startswith("base_mnist_r16_flow_")
    changes = {"data": "embedded:digits", "resolution": 8, "family": "vp", "block_channels": (16, 32),
               "text_hidden": 32, "max_steps": 800, "batch_size": 32, "lr": 1e-3, "prompt_dropout": 0.0,
               "ema_decay": 0.99, "seed": 1}
    assert set(changes) == {f.name for f in dataclasses.fields(BaseRecipe)}
    names = {base.replace(**{key: value}).name for key, value in changes.items()}
    assert len(names) == len(changes) and base.name not in names
    assert base.directory("/cache") == Path("/cache") / base.name
    with pytest.raises(TypeError, match="steps"):
        base.replace(steps=10)


def test_tiny_runs_use_the_tiny_recipe(monkeypatch):
    monkeypatch.delenv("LIT_DISTILL_TINY", raising=False)
    assert default_base_recipe() == BaseRecipe()
    monkeypatch.setenv("LIT_DISTILL_TINY", "1")
    assert default_base_recipe() == TINY_BASE_RECIPE != BaseRecipe()


def test_the_pretrain_config_trains_the_base_recipe():
    from omegaconf import OmegaConf

    raw = yaml.safe_load((ROOT / "configs/pretrain/digits.yaml").read_text())
    config = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)  # ${shared.NAME} as the CLI reads it
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    recipe = BaseRecipe()
    assert config["seed_everything"] == recipe.seed and config["trainer"]["max_steps"] == recipe.max_steps
    assert model["model"] == "embedded"
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in model["model_kwargs"].items()} == recipe.model_kwargs
    assert (model["optim"]["lr"], model["prompt_dropout"], model["ema_decay"]) == (recipe.lr, recipe.prompt_dropout,
                                                                                 recipe.ema_decay)
    assert (data["source"], data["resolution"], data["batch_size"]) == (recipe.data, recipe.resolution,
                                                                        recipe.batch_size)


def test_embedded_base_is_trained_once_into_its_recipe_folder(tmp_path, monkeypatch):
    from lit_distill.models.sources import load_model
    from lit_distill.pipeline import ensure_embedded_base

    monkeypatch.setenv("LIT_DISTILL_CACHE", str(tmp_path))
    monkeypatch.setenv("LIT_DISTILL_TINY", "1")
    changes = {"max_steps": 2, "data": "embedded:digits"}  # scikit-learn's digits: nothing to fetch
    recipe = TINY_BASE_RECIPE.replace(**changes)
    path = ensure_embedded_base(recipe, progress=False)
    assert path == tmp_path / recipe.name and json.loads((path / "recipe.json").read_text())["max_steps"] == 2
    stamp = (path / "model_index.json").stat().st_mtime_ns
    assert ensure_embedded_base(progress=False, **changes) == path  # the default (tiny) recipe, changed alike
    assert (path / "model_index.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("base_")) == [path.name, path.name + ".logs"]
    assert load_model("embedded:base", **changes).sample_shape == (1, 16, 16)
