"""Typed config: presets load, dotted overrides apply and are type-checked, errors name the key."""
import pytest

from hicmae_dist.config import Config, ConfigError, config_from_dict, list_presets, load_config


def test_every_shipped_preset_loads():
    assert "tiny-cpu" in list_presets()
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.preset == name


def test_tiny_preset_values_and_overrides():
    cfg = load_config("tiny-cpu", ["model.width=128", "train.steps=50", "train.betas=[0.9, 0.98]",
                                   "model.frame_diff_target=false", "train.base_lr=1"])
    assert cfg.model.width == 128 and cfg.model.heads == 2 and cfg.model.encoder_depth == 4
    assert cfg.train.steps == 50 and cfg.train.betas == [0.9, 0.98]
    assert cfg.model.frame_diff_target is False
    assert cfg.train.base_lr == 1.0 and isinstance(cfg.train.base_lr, float)  # int accepted for float


@pytest.mark.parametrize("override, message", [
    ("model.widht=128", "unknown config key 'model.widht'"),
    ("modle.width=128", "unknown config key 'modle'"),
    ("train.steps=fifty", "train.steps: expected an integer"),
    ("train.steps=1.5", "train.steps: expected an integer"),
    ("model.frame_diff_target=3", "model.frame_diff_target: expected true or false"),
    ("model.intermediate_layers=[1, x]", r"model.intermediate_layers\[1\]: expected an integer"),
    ("model.width=99", "model.width: expected a multiple of model.heads"),
    ("model.intermediate_layers=[0, 1]", "model.intermediate_layers: expected .*last encoder block"),
    ("train.zero_stage=4", "train.zero_stage: expected 0, 1, 2 or 3"),
    ("trainsteps", "expected key=value"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-cpu", [override])


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'.*tiny-cpu"):
        load_config("nope")


def test_bad_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  width: 64\n  heads: 2\n  depth: 3\n")
    with pytest.raises(ConfigError, match=f"unknown config key 'model.depth' \\(preset {path}\\)"):
        load_config(path)


def test_round_trip_and_hash():
    cfg = load_config("tiny-cpu", ["train.steps=70"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and again.hash() == cfg.hash()
    assert load_config("tiny-cpu", ["train.steps=90"]).hash() == cfg.hash()  # the step budget may change
    assert load_config("tiny-cpu", ["model.width=128"]).hash() != cfg.hash()
    execution_only = ["model.attention_backend=reference", "model.pack_fusion=true", "data.num_workers=0",
                      "model.activation_checkpointing=true", "train.compile=true"]
    assert load_config("tiny-cpu", ["train.steps=70", *execution_only]).hash() == cfg.hash()
    assert cfg.flat()["model.width"] == 64 and "train.steps" in cfg.flat()
    assert Config().model.width == 384  # the dataclass defaults are HiCMAE-S
