"""Every config file loads, validates and locks; misspelt keys and bad values are named."""
import glob
import importlib.util
import os

import pytest

from launch.config import ConfigError, load_config
from train import preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
               if not p.endswith(("__init__.py", "meshes.py")) and "recipes" not in p and "sweeps" not in p)
# recipes: kiln pipeline's (below); sweeps: kiln sweep's (tests/test_sweep.py); meshes.py: mesh presets
# (tests/test_launchers.py)
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "recipes", "*.py")))


def variants(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [""] + sorted(getattr(module, "VARIANTS", {}))


CASES = [(os.path.relpath(p, ROOT), v) for p in FILES for v in variants(p)]


@pytest.mark.parametrize("path,variant", CASES, ids=[f"{p}:{v}" for p, v in CASES])
def test_config_loads_and_validates(path, variant):
    config = load_config(os.path.join(ROOT, path) + (f":{variant}" if variant else ""))
    assert config.is_locked
    other = {"eval.py": "kiln eval", "rejection_sampling.py": "kiln generate"}.get(os.path.basename(path))
    if other:  # a config of another command: kiln train points there
        with pytest.raises(ValueError, match=f"is not trained: use `{other}"):
            preflight.stage_kind(config)
    elif os.path.basename(path) != "base.py":
        assert config.stage and config.run_dir
        # A runnable stage whose loss is registered for that stage's batches: no config presents
        # itself as runnable before the step that implements it lands.
        preflight.stage_kind(config)
    if variant == "smoke":
        assert config.data.batch_size % 8 == 0, "smoke batches must also run on 8 devices"


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipes_load_with_every_variant(path):
    from launch import pipeline
    for variant in variants(path):
        recipe, stages = pipeline.load_recipe(path + (f":{variant}" if variant else ""), [])
        assert recipe.run_dir and stages
        for stage in stages:  # every stage config loads with the recipe's overrides (references stand in)
            load_config(os.path.join(ROOT, stage["config"]),
                        [f"--config.{o.replace('@', '/tmp/')}" for o in stage.get("overrides", ())])


def test_every_stage_has_a_smoke_variant():
    stages = [p for p in FILES if os.path.dirname(p) == os.path.join(ROOT, "configs") and not p.endswith("base.py")]
    for path in stages:
        assert "smoke" in variants(path), f"{path} has no smoke variant"


def test_misspelt_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        load_config(os.path.join(ROOT, "configs/pretrain.py:smoke"), ["--config.optim.lrr=1"])


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="'optim.schedule' = 'cosin'"):
        load_config(os.path.join(ROOT, "configs/pretrain.py"), ["--config.optim.schedule=cosin"])
    with pytest.raises(ConfigError, match="bad value 'x' for config key 'data.seq_len'"):
        load_config(os.path.join(ROOT, "configs/pretrain.py"), ["--config.data.seq_len=x"])
    with pytest.raises(ConfigError, match="unknown config variant 'smok'"):
        load_config(os.path.join(ROOT, "configs/pretrain.py:smok"))


def test_overrides_are_typed():
    c = load_config(os.path.join(ROOT, "configs/pretrain.py"),
                    ["--config.optim.lr=2e-3", "--config.checkpoint.async=false", "--config.model.d_model=96",
                     "--config.data.sources.train.weight=0.5"])
    assert c.optim.lr == 2e-3 and c.checkpoint["async"] is False and c.model.d_model == 96
    assert c.data.sources.train.weight == 0.5
