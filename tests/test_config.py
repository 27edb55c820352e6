"""Typed config: presets load, dotted overrides apply and are type-checked, errors name the key."""

import dataclasses

import pytest

from hicmae_dist import config as config_module
from hicmae_dist.config import Config, ConfigError, added, config_from_dict, list_presets, load_config


def test_every_shipped_preset_loads():
    assert "tiny-cpu" in list_presets()
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.preset == name


def test_tiny_preset_values_and_overrides():
    cfg = load_config(
        "tiny-cpu",
        [
            "model.width=128",
            "train.steps=50",
            "train.betas=[0.9, 0.98]",
            "model.frame_diff_target=false",
            "train.base_lr=1",
        ],
    )
    assert cfg.model.width == 128 and cfg.model.heads == 2 and cfg.model.encoder_depth == 4
    assert cfg.train.steps == 50 and cfg.train.betas == [0.9, 0.98]
    assert cfg.model.frame_diff_target is False
    assert cfg.train.base_lr == 1.0 and isinstance(cfg.train.base_lr, float)  # int accepted for float


@pytest.mark.parametrize(
    "override, message",
    [
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
    ],
)
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
    execution_only = [
        "execution.attention_backend=reference",
        "execution.pack_fusion=true",
        "data.num_workers=0",
        "execution.activation_checkpointing=true",
        "execution.compile=true",
    ]
    assert load_config("tiny-cpu", ["train.steps=70", *execution_only]).hash() == cfg.hash()
    assert cfg.flat()["model.width"] == 64 and "train.steps" in cfg.flat()
    assert Config().model.width == 384  # the dataclass defaults are HiCMAE-S


# Values that cannot be right: each is refused at config time with one message naming the key.
BAD_VALUES = [
    ("train.base_lr=-1", "train.base_lr: expected > 0"),
    ("train.base_lr=0", "train.base_lr: expected > 0"),
    ("train.base_lr=.nan", "train.base_lr: expected a finite number"),
    ("train.base_lr=.inf", "train.base_lr: expected a finite number"),
    ("train.base_lr=1e400", "train.base_lr: expected a finite number"),
    ("train.min_lr=-1e-6", r"train.min_lr: expected in \[0, train.base_lr\]"),
    ("train.min_lr=1.0", r"train.min_lr: expected in \[0, train.base_lr\]"),
    ("train.weight_decay=-0.1", "train.weight_decay: expected >= 0"),
    ("train.eps=0", "train.eps: expected > 0"),
    ("train.betas=[0.9, 1.0]", r"train.betas: expected two numbers in \[0, 1\)"),
    ("train.betas=[0.9, .nan]", "train.betas: expected a finite number"),
    ("train.lr_gamma=0", "train.lr_gamma: expected > 0"),
    ("train.lr_milestones=[0, 5]", "train.lr_milestones: expected steps >= 1"),
    ("train.grad_clip=-1", "train.grad_clip: expected >= 0"),
    ("train.steps=0", "train.steps: expected >= 1"),
    ("train.grad_accum=0", "train.grad_accum: expected >= 1"),
    ("model.temperature=0", "model.temperature: expected > 0"),
    ("model.temperature=-0.07", "model.temperature: expected > 0"),
    ("model.contrastive_weight=-1", "model.contrastive_weight: expected >= 0"),
    ("model.video_mask_ratio=0", r"model.video_mask_ratio: expected in \(0, 1\)"),
    ("model.audio_mask_ratio=1.0", r"model.audio_mask_ratio: expected in \(0, 1\)"),
    ("model.drop_path=1.5", r"model.drop_path: expected in \[0, 1\)"),
    ("model.mlp_ratio=0", "model.mlp_ratio: expected > 0"),
    ("model.heads=0", "model.heads: expected >= 1"),  # before width % heads divides by it
    ("model.patch=0", "model.patch: expected >= 1"),
    ("data.batch_size=0", "data.batch_size: expected >= 1"),
    ("data.batch_size=-4", "data.batch_size: expected >= 1"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer: expected >= 0"),
    ("data.max_bad_fraction=1.5", r"data.max_bad_fraction: expected in \[0, 1\]"),
    ("tracking.system_metrics_s=-1", "tracking.system_metrics_s: expected >= 0"),
    ("tracking.experiment=''", "tracking.experiment: expected a non-empty name"),
    ("finetune.head_lr_scale=0", "finetune.head_lr_scale: expected > 0"),
    ("finetune.num_outputs=-2", "finetune.num_outputs: expected >= 0"),
    ("finetune.label_smoothing=.nan", "finetune.label_smoothing: expected a finite number"),
    ("model.width=[1,", r"override 'model.width=\[1,': the value is not valid YAML \(line 1, column 4"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_values_out_of_range_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=f"^{message}") as err:
        load_config("tiny-cpu", [override])
    assert "\n" not in str(err.value)


def test_every_shipped_preset_is_in_range():
    for name in list_presets():  # validate() ran: the range checks refuse none of them
        assert load_config(name).train.base_lr > 0


def test_exponent_floats_are_numbers():
    """PyYAML (YAML 1.1) reads 3e-4 as a string; YAML 1.2 and every user mean the number."""
    cfg = load_config("tiny-cpu", ["train.base_lr=3e-4", "train.min_lr=1E-6", "train.betas=[0.9, 9.9e-1]"])
    assert (cfg.train.base_lr, cfg.train.min_lr, cfg.train.betas) == (3e-4, 1e-6, [0.9, 0.99])
    with pytest.raises(ConfigError, match="train.steps: expected an integer, got '1e3'"):
        load_config("tiny-cpu", ["train.steps=1e3"])


def test_preset_key_in_a_yaml_file_is_its_base(tmp_path):
    """`preset: tiny-cpu` in a user's YAML loads tiny-cpu first, then the file's keys over it."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("preset: tiny-cpu\nmodel:\n  width: 128\ntrain:\n  steps: 70\n")
    cfg, tiny = load_config(mine), load_config("tiny-cpu")
    assert cfg.preset == "mine" and cfg.model.width == 128 and cfg.train.steps == 70
    assert cfg.model.heads == tiny.model.heads and cfg.model.encoder_depth == tiny.model.encoder_depth
    assert cfg.model.encoder_depth != Config().model.encoder_depth  # not the HiCMAE-S defaults
    assert cfg.data.batch_size == tiny.data.batch_size
    # a path is relative to the file naming it, and chains
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("preset: ../mine.yaml\ntrain:\n  steps: 90\n")
    assert load_config(child, ["train.warmup_steps=1"]).model.width == 128
    assert load_config(child).train.steps == 90
    # a cycle, or a preset that is not a name, is an error naming the file
    (tmp_path / "a.yaml").write_text("preset: b.yaml\n")
    (tmp_path / "b.yaml").write_text("preset: a.yaml\n")
    with pytest.raises(ConfigError, match="presets name each other in a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("preset: [tiny-cpu]\n")
    with pytest.raises(ConfigError, match="c.yaml: preset: expected the name of a base preset"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("preset: nope\n")
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(tmp_path / "d.yaml")


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width: 64\n  heads: [2\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: not valid YAML \(line \d+, column \d+: ") as err:
        load_config(bad)
    assert "\n" not in str(err.value)


def test_execution_section_is_outside_the_hash_and_checked():
    cfg = load_config("tiny-cpu", ["execution.attention_backend=reference"])
    assert cfg.execution.attention_backend == "reference" and cfg.hash() == load_config("tiny-cpu").hash()
    with pytest.raises(
        ConfigError, match="execution.attention_backend: expected one of auto, triton, xformers, sdpa, reference"
    ):
        load_config("tiny-cpu", ["execution.attention_backend=fast"])
    with pytest.raises(ConfigError, match="unknown config key 'model.attention_backend'"):
        load_config("tiny-cpu", ["model.attention_backend=sdpa"])


def test_every_attention_backend_is_selectable_and_checked_at_start_up(monkeypatch):
    """The config takes every backend ops.attention has (triton and xformers were refused once, so
    a GPU run could not pick its kernels); one that cannot run on this device is a ConfigError
    naming the key and why, raised before the engine is built."""
    from hicmae_dist.config import ATTENTION_BACKENDS
    from hicmae_dist.ops import triton as triton_pkg
    from hicmae_dist.ops.attention import BACKENDS
    from hicmae_dist.train.runtime import check_attention_backend

    assert ATTENTION_BACKENDS == BACKENDS.names
    for name in ATTENTION_BACKENDS:
        assert load_config("tiny-cpu", [f"execution.attention_backend={name}"]).execution.attention_backend == name
    for name in ("auto", "sdpa", "reference"):
        check_attention_backend(load_config("tiny-cpu", [f"execution.attention_backend={name}"]).execution)
    monkeypatch.setattr(triton_pkg, "interpreting", lambda: False)  # as on a CPU machine outside the tests
    for name, why in (("triton", "triton kernels need CUDA tensors"), ("xformers", "xformers")):
        with pytest.raises(ConfigError, match=rf"^execution.attention_backend={name} cannot run on cpu: .*{why}"):
            check_attention_backend(load_config("tiny-cpu", [f"execution.attention_backend={name}"]).execution)


# The hashes of the shipped presets when runs were first written (c1a1ba4). A changed hash makes
# every running job refuse to resume after an upgrade: new fields use config.added(default).
RELEASED_HASHES = {  # preset: (pretraining hash, fine-tuning hash)
    "tiny-cpu": ("7b466b8470341b9b", "dec5a8ed3ca953ce"),
    "hicmae-b-vox2": ("d3febaeb1c44cd5a", "ca5575320351a06e"),
    "cavmae-base-vox2": ("422adb925be510fc", "c2511f76443e922d"),
    "finetune-tiny-cpu": ("0829f72d80ac7104", "3a8caa010f01e041"),
    # 2026-12-06: changed on purpose (a CAV-MAE model from scratch, not HiCMAE-S's defaults; the
    # release's mixup: lambda ~ Beta(10, 10) on half the clips), so a fold running on the old
    # preset refuses to resume with it: resume with --allow-config-change or the old values
    "finetune-cavmae": ("0fba9f851274035e", "0680b2c218267cba"),
}


@pytest.mark.parametrize("preset", sorted(RELEASED_HASHES))
def test_an_upgrade_keeps_the_hashes_of_existing_runs(preset):
    cfg = load_config(preset)
    assert (cfg.hash(), cfg.hash(finetune=True)) == RELEASED_HASHES[preset]


def test_an_added_field_counts_only_when_it_leaves_its_default():
    @dataclasses.dataclass
    class Section:
        old: int = 1
        new: str = added("default")

    def hashed(section):
        return {f.name for f in dataclasses.fields(section) if config_module._hashed(f, section)}

    assert hashed(Section()) == {"old"}
    assert hashed(Section(new="other")) == {"old", "new"}
