"""The model-family registry: every sub-package of hicmae_dist.models with a SPEC, and the
config side of a family (its class picked by model.arch, its presets found by path)."""

import pytest

from hicmae_dist.config import ConfigError, config_from_dict, list_presets, load_config, model_config_from_dict
from hicmae_dist.models import build_finetune_model, build_model, get_spec, model_specs
from hicmae_dist.models.cavmae.config import CAVMAEConfig
from hicmae_dist.models.hicmae.config import HiCMAEConfig


def test_families_are_found_and_own_their_presets():
    assert list(model_specs()) == ["cavmae", "hicmae"]
    for name, spec in model_specs().items():
        presets = sorted(p.stem for p in spec.presets_dir.glob("*.yaml"))
        assert presets and set(presets) <= set(list_presets()), name
    assert {p.stem for s in model_specs().values() for p in s.presets_dir.glob("*.yaml")} == set(list_presets())
    assert type(load_config("cavmae-base-vox2").model) is CAVMAEConfig
    assert type(load_config("hicmae-b-vox2").model) is HiCMAEConfig
    with pytest.raises(ValueError, match="model.arch 'nope': expected one of cavmae, hicmae"):
        get_spec("nope")


def test_build_goes_through_the_spec():
    cfg = load_config("tiny-cpu")
    assert type(build_model(cfg.model, cfg.execution)) is get_spec("hicmae").pretrain_class
    assert type(build_finetune_model(cfg.model, 3, cfg.execution)) is get_spec("hicmae").finetune_class


def test_arch_picks_the_config_class_and_keeps_the_shared_fields():
    cfg = load_config("tiny-cpu", ["model.arch=cavmae", "model.num_frames=1", "model.modality_depth=2"])
    assert type(cfg.model) is CAVMAEConfig and cfg.model.width == 64 and cfg.model.modality_depth == 2
    assert cfg.model.shared_depth == CAVMAEConfig().shared_depth  # the family's own field: its default
    with pytest.raises(ConfigError, match="unknown config key 'model.encoder_depth'"):
        load_config("cavmae-base-vox2", ["model.encoder_depth=3"])
    with pytest.raises(ConfigError, match=r"model.arch \(override 'model.arch=x'\): expected one of cavmae, hicmae"):
        load_config("tiny-cpu", ["model.arch=x"])


def test_configs_saved_before_the_execution_section_still_load():
    cfg = load_config("tiny-cpu")
    old = cfg.to_dict()
    old.pop("execution")
    old["model"].update(attention_backend="reference", pack_fusion=True, activation_checkpointing=True)
    old["train"]["compile"] = True
    again = config_from_dict(old)
    assert (again.execution.attention_backend, again.execution.pack_fusion, again.execution.compile) == (
        "reference",
        True,
        True,
    )
    assert again.hash() == cfg.hash() and again.model == cfg.model
    cav = load_config("cavmae-base-vox2").model
    saved = {
        **{k: v for k, v in cav.__dict__.items() if k not in ("modality_depth", "shared_depth")},
        "encoder_depth": 11,
        "fusion_depth": 1,
        "attention_backend": "auto",
    }
    assert model_config_from_dict(saved) == cav
