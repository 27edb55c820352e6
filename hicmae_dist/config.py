"""Typed run configuration: dataclasses, YAML presets shipped in the package, dotted overrides.

The bottom layer of the package: it imports nothing from hicmae_dist, so every other layer
(models, data, train, cli) can take its own section of the config.

    cfg = load_config("tiny-cpu", ["model.width=128", "train.steps=50"])

An unknown key, a value of the wrong type or out of its range (NaN and inf included), or a preset
file that is not valid YAML raises ConfigError naming the key or the file (and line).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Each model family ships its presets in hicmae_dist/models/<family>/presets/ (found by path:
# this module imports nothing from the package); a preset name is unique across families.
PRESET_GLOB = "models/*/presets/*.yaml"


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type or range."""


@dataclass
class ModelConfig:
    """Architecture and pretraining objective (SPEC.md section 1; defaults are HiCMAE-S).

    arch "cavmae" (SPEC.md section 2) reads the same fields: encoder_depth = modality-specific
    blocks per modality (11), fusion_depth = shared blocks (1), decoder_* = the joint decoder,
    num_frames = 1, image_size 224, audio_frames 1024; the preset cavmae-base-vox2 holds them.
    """

    arch: str = "hicmae"  # "hicmae" | "cavmae"
    width: int = 384  # encoder width C (video, audio and fusion)
    heads: int = 6
    encoder_depth: int = 10  # blocks per modality encoder
    fusion_depth: int = 2  # bidirectional cross+self layers
    decoder_width: int = 192
    decoder_heads: int = 3
    decoder_depth: int = 4  # 1 plain block + one CSBlock per intermediate layer
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    num_frames: int = 16
    image_size: int = 160
    tubelet: int = 2
    patch: int = 16
    audio_frames: int = 256  # fbank frames (time)
    mel_bins: int = 128
    video_mask_ratio: float = 0.9  # tube masking
    audio_mask_ratio: float = 0.8  # random masking
    intermediate_layers: list[int] = field(default_factory=lambda: [3, 6, 9])  # 0-based blocks
    contrastive_weight: float = 0.0025
    temperature: float = 0.07
    frame_diff_target: bool = True
    attention_backend: str = "auto"  # see hicmae_dist.ops.attention
    # HiCMAE fusion: run the two cross-attentions of a fusion layer (video->audio, audio->video)
    # as one packed varlen attention launch, and likewise the two self-attentions. CAV-MAE: run
    # the shared block's three passes (unified [audio, video], audio alone, video alone; same
    # attention / MLP weights, own LayerNorms) as one packed varlen attention launch per shared
    # block in pretraining. Same maths either way (drop path draws come in another order)
    pack_fusion: bool = False
    # wrap every transformer block call in torch.utils.checkpoint (non-reentrant) in training:
    # activations recomputed in the backward instead of stored; same maths, less memory
    activation_checkpointing: bool = False
    negatives: str = "local"  # "local" | "global" contrastive negatives
    audio_mask_mode: str = "random"  # CAV-MAE audio masking: random | time | freq | tf (HiCMAE: random)
    symmetric_contrastive: bool | None = None  # None: the arch's own (HiCMAE symmetric, CAV-MAE one direction)

    def validate(self) -> None:
        _check(self.arch in ("hicmae", "cavmae"), "model.arch", "'hicmae' or 'cavmae'", self.arch)
        for key in ("width", "heads", "decoder_width", "decoder_heads", "num_frames", "image_size", "tubelet",
                    "patch", "audio_frames", "mel_bins"):
            _check(getattr(self, key) >= 1, f"model.{key}", ">= 1", getattr(self, key))
        _check(self.fusion_depth >= 0, "model.fusion_depth", ">= 0", self.fusion_depth)
        _check(self.mlp_ratio > 0, "model.mlp_ratio", "> 0", self.mlp_ratio)
        _check(0.0 <= self.drop_path < 1.0, "model.drop_path", "in [0, 1)", self.drop_path)
        _check(self.temperature > 0, "model.temperature", "> 0 (it divides the similarities)", self.temperature)
        _check(self.contrastive_weight >= 0, "model.contrastive_weight", ">= 0", self.contrastive_weight)
        _check(self.width % self.heads == 0, "model.width", "a multiple of model.heads", self.width)
        _check(self.decoder_width % self.decoder_heads == 0, "model.decoder_width",
               "a multiple of model.decoder_heads", self.decoder_width)
        _check(self.audio_mask_mode in ("random", "time", "freq", "tf"), "model.audio_mask_mode",
               "one of random, time, freq, tf", self.audio_mask_mode)
        _check(self.image_size % self.patch == 0, "model.image_size", "a multiple of model.patch",
               self.image_size)
        _check(self.audio_frames % self.patch == 0 and self.mel_bins % self.patch == 0,
               "model.audio_frames", "audio_frames and mel_bins multiples of model.patch",
               (self.audio_frames, self.mel_bins))
        for key in ("video_mask_ratio", "audio_mask_ratio"):  # 0 masks nothing: nothing to reconstruct
            _check(0.0 < getattr(self, key) < 1.0, f"model.{key}", "in (0, 1)", getattr(self, key))
        _check(self.attention_backend in ("auto", "sdpa", "reference"), "model.attention_backend",
               "one of auto, sdpa, reference", self.attention_backend)
        _check(self.negatives in ("local", "global"), "model.negatives", "'local' or 'global'",
               self.negatives)
        if self.arch == "cavmae":
            self._validate_cavmae()
        else:
            self._validate_hicmae()

    def _validate_cavmae(self) -> None:
        _check(self.num_frames == 1, "model.num_frames", "1 for arch cavmae (one RGB frame)", self.num_frames)
        _check(self.encoder_depth >= 1, "model.encoder_depth", ">= 1 modality-specific blocks",
               self.encoder_depth)
        _check(self.fusion_depth >= 1, "model.fusion_depth", ">= 1 shared blocks", self.fusion_depth)
        _check(self.decoder_depth >= 1, "model.decoder_depth", ">= 1", self.decoder_depth)
        # 2-D sin-cos positions: half the channels per axis, sin and cos halves of each
        for key in ("width", "decoder_width"):
            _check(getattr(self, key) % 4 == 0, f"model.{key}", "a multiple of 4 (2-D sin-cos positions)",
                   getattr(self, key))

    def _validate_hicmae(self) -> None:
        _check(self.audio_mask_mode == "random", "model.audio_mask_mode", "'random' for arch hicmae",
               self.audio_mask_mode)
        _check(self.symmetric_contrastive in (None, True), "model.symmetric_contrastive",
               "null or true for arch hicmae (its contrastive loss is symmetric)", self.symmetric_contrastive)
        layers = self.intermediate_layers
        _check(len(layers) > 0 and all(0 <= i < self.encoder_depth for i in layers)
               and layers == sorted(set(layers)), "model.intermediate_layers",
               f"increasing block indices in [0, {self.encoder_depth})", layers)
        _check(layers[-1] == self.encoder_depth - 1, "model.intermediate_layers",
               "to end with the last encoder block", layers)
        _check(self.decoder_depth == len(layers) + 1, "model.decoder_depth",
               f"len(model.intermediate_layers) + 1 = {len(layers) + 1}", self.decoder_depth)
        _check(self.num_frames % self.tubelet == 0, "model.num_frames",
               "a multiple of model.tubelet", self.num_frames)


@dataclass
class DataConfig:
    """Shard loader and augmentation (SPEC.md 'Inputs')."""

    shards: str = ""  # directory of *.tar shards (set by `pretrain --data`)
    batch_size: int = 8  # per rank
    num_workers: int = 2
    shuffle_buffer: int = 256
    multiscale_crop: bool = True
    gain_augment: bool = True
    roll_augment: bool = False  # the release's roll is a no-op; ours works when enabled
    max_bad_fraction: float = 0.01  # stop the run when more samples than this are unreadable

    def validate(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", ">= 1", self.batch_size)
        _check(self.num_workers >= 0, "data.num_workers", ">= 0", self.num_workers)
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", ">= 0", self.shuffle_buffer)
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", "in [0, 1]",
               self.max_bad_fraction)


@dataclass
class TrainConfig:
    """Optimiser, schedule, DeepSpeed engine and checkpoints (SPEC.md 'Pretraining recipe')."""

    steps: int = 300
    optimizer: str = "adamw"  # "adamw" (HiCMAE) | "adam" (CAV-MAE: L2 decay inside Adam)
    schedule: str = "cosine"  # "cosine": warm-up then cosine to min_lr | "step": x lr_gamma at each milestone
    base_lr: float = 3e-4  # scaled by global batch / 256 when scale_lr
    min_lr: float = 1e-5  # cosine floor, scaled like base_lr
    scale_lr: bool = True
    lr_milestones: list[int] = field(default_factory=list)  # steps, for schedule "step"
    lr_gamma: float = 0.5
    warmup_steps: int = 30
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    zero_stage: int = 2
    bf16: bool = False
    fp16: bool = False  # GPUs without bf16: dynamic loss scaling (DeepSpeed skips overflowing steps)
    compile: bool = False  # torch.compile the model inside the engine
    grad_clip: float = 0.0  # 0 = off, as in the paper
    grad_accum: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    max_nonfinite_in_a_row: int = 5  # skipped non-finite steps in a row before the run stops
    seed: int = 0

    def validate(self) -> None:
        _check(self.steps >= 1, "train.steps", ">= 1", self.steps)
        _check(self.base_lr > 0, "train.base_lr", "> 0", self.base_lr)
        _check(0 <= self.min_lr <= self.base_lr, "train.min_lr", "in [0, train.base_lr]", self.min_lr)
        _check(self.lr_gamma > 0, "train.lr_gamma", "> 0", self.lr_gamma)
        _check(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
        _check(self.eps > 0, "train.eps", "> 0", self.eps)
        _check(0 <= self.warmup_steps <= self.steps, "train.warmup_steps", "in [0, train.steps]",
               self.warmup_steps)
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", "0, 1, 2 or 3", self.zero_stage)
        _check(self.optimizer in ("adamw", "adam"), "train.optimizer", "'adamw' or 'adam'", self.optimizer)
        _check(self.schedule in ("cosine", "step"), "train.schedule", "'cosine' or 'step'", self.schedule)
        _check(self.lr_milestones == sorted(self.lr_milestones), "train.lr_milestones", "increasing steps",
               self.lr_milestones)
        _check(not (self.bf16 and self.fp16), "train.fp16", "not both train.bf16 and train.fp16", self.fp16)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
               "two numbers in [0, 1)", self.betas)
        _check(all(m >= 1 for m in self.lr_milestones), "train.lr_milestones", "steps >= 1", self.lr_milestones)
        _check(self.grad_clip >= 0, "train.grad_clip", ">= 0", self.grad_clip)
        _check(self.grad_accum >= 1, "train.grad_accum", ">= 1", self.grad_accum)
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", ">= 1", self.checkpoint_every)
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", self.keep_checkpoints)
        _check(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)
        _check(self.max_nonfinite_in_a_row >= 1, "train.max_nonfinite_in_a_row", ">= 1",
               self.max_nonfinite_in_a_row)


@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only)."""

    enabled: bool = True
    uri: str = ""  # empty: sqlite:///<run_dir>/mlflow.db
    experiment: str = "hicmae-dist"
    run_name: str = ""
    system_metrics_s: float = 10.0  # sampling interval of CPU/GPU/memory metrics; 0 = off

    def validate(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", "a non-empty name", self.experiment)
        _check(self.system_metrics_s >= 0, "tracking.system_metrics_s", ">= 0 (0 = off)", self.system_metrics_s)


@dataclass
class FinetuneConfig:
    """Fine-tuning recipe and protocol (SPEC.md 1 'Fine-tuning model', SPEC.md 2 'Fine-tune'),
    read by `hicmae-dist finetune` only. The optimiser, LR and batch come from `train` and `data`;
    train.steps and train.warmup_steps are set from the epochs and the training split's size."""

    dataset: str = ""  # a preset of hicmae_dist.eval.datasets; "" = task / num_outputs below
    task: str = "classification"  # "classification" | "regression" (overridden by the dataset)
    num_outputs: int = 0  # classes or regression dimensions; 0 = from the dataset preset
    epochs: int = 50
    warmup_epochs: int = 5
    layer_decay: float = 0.75  # HiCMAE: LR x layer_decay^(top - layer id); 1.0 = off
    head_lr_scale: float = 1.0  # CAV-MAE: the head's LR multiple (10-100 in the release)
    mode: str = "multimodal"  # CAV-MAE: multimodal | audio | video
    mixup: float = 0.8  # Beta(alpha, alpha) of mixup; 0 = off
    cutmix: float = 1.0  # Beta(alpha, alpha) of cutmix; 0 = off
    mix_prob: float = 1.0  # chance a batch is mixed at all
    switch_prob: float = 0.5  # chance a mixed batch takes cutmix instead of mixup (both on)
    mix_video_only: bool = False  # the release's mixing: video mixed, audio left alone
    label_smoothing: float = 0.1
    regression_loss: str = "mse"  # "mse" | "ccc" (1 - CCC, averaged over the dimensions)
    head_activation: str | None = None  # regression: sigmoid | tanh | relu on the head
    crop_scale_min: float = 0.08  # HiCMAE training crops: RandomResizedCrop area fraction in [min, 1]
    test_num_segment: int = 2  # test views: temporal chunks x spatial crops, probabilities averaged
    test_num_crop: int = 2
    val_fraction: float = 0.15  # subjects (or clips) carved from training when a fold has no val.csv
    select_metric: str = ""  # validation metric that picks the epoch; "" = the dataset's first
    eval_every: int = 1  # epochs between validation passes (the last epoch is always validated)

    def validate(self) -> None:
        _check(self.task in ("classification", "regression"), "finetune.task", "'classification' or 'regression'",
               self.task)
        _check(self.epochs >= 1, "finetune.epochs", ">= 1", self.epochs)
        _check(0 <= self.warmup_epochs <= self.epochs, "finetune.warmup_epochs", "in [0, finetune.epochs]",
               self.warmup_epochs)
        _check(self.num_outputs >= 0, "finetune.num_outputs", ">= 0 (0 = from the dataset)", self.num_outputs)
        _check(0.0 < self.layer_decay <= 1.0, "finetune.layer_decay", "in (0, 1]", self.layer_decay)
        _check(self.head_lr_scale > 0, "finetune.head_lr_scale", "> 0", self.head_lr_scale)
        _check(self.mode in ("multimodal", "audio", "video"), "finetune.mode", "multimodal, audio or video", self.mode)
        _check(self.regression_loss in ("mse", "ccc"), "finetune.regression_loss", "'mse' or 'ccc'",
               self.regression_loss)
        _check(self.head_activation in (None, "sigmoid", "tanh", "relu"), "finetune.head_activation",
               "null, sigmoid, tanh or relu", self.head_activation)
        for key in ("mixup", "cutmix"):
            _check(getattr(self, key) >= 0, f"finetune.{key}", ">= 0 (0 = off)", getattr(self, key))
        for key in ("mix_prob", "switch_prob", "label_smoothing"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"finetune.{key}", "in [0, 1]", getattr(self, key))
        _check(0.0 < self.val_fraction < 1.0, "finetune.val_fraction", "in (0, 1)", self.val_fraction)
        _check(0.0 < self.crop_scale_min <= 1.0, "finetune.crop_scale_min", "in (0, 1]", self.crop_scale_min)
        _check(self.test_num_segment >= 1 and self.test_num_crop >= 1, "finetune.test_num_segment",
               "test_num_segment and test_num_crop >= 1", (self.test_num_segment, self.test_num_crop))
        _check(self.eval_every >= 1, "finetune.eval_every", ">= 1", self.eval_every)


@dataclass
class Config:
    preset: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> "Config":
        for name in ("model", "data", "train", "tracking", "finetune"):
            _check_finite(getattr(self, name), name)  # first: NaN fails every range check below
            getattr(self, name).validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{'model.width': 384, ...}: the MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}{k}.", v)
            else:
                out[prefix[:-1]] = value

        walk("", self.to_dict())
        return out

    # Settings that change how a run executes, not what it computes: a resume may change them.
    NOT_HASHED = {
        "model": ("attention_backend", "pack_fusion", "activation_checkpointing"),
        "data": ("shards", "num_workers"),
        "train": ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "max_nonfinite_in_a_row",
                  "compile"),
        "finetune": ("eval_every",),
    }

    def hash(self, finetune: bool = False) -> str:
        """Hash of everything that changes the maths (tracking, step budget and execution
        settings excluded: NOT_HASHED). The finetune section counts for fine-tuning runs only,
        so a pretraining checkpoint's hash does not depend on it."""
        d = self.to_dict()
        d.pop("tracking")
        if not finetune:
            d.pop("finetune")
        for section, keys in self.NOT_HASHED.items():
            if section in d:
                d[section] = {k: v for k, v in d[section].items() if k not in keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _check_finite(section: Any, prefix: str) -> None:
    """Every float of a section (lists included) is finite: .nan and .inf are YAML floats."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float):
                _check(math.isfinite(v), f"{prefix}.{f.name}", "a finite number", value)


def _preset_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(Path(__file__).parent.glob(PRESET_GLOB))}


def list_presets() -> list[str]:
    return sorted(_preset_paths())


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)  # 3e-4: a float in YAML 1.2, a string to PyYAML's YAML 1.1
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: expected a finite number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _set(obj: Any, dotted: str, value: Any, where: str, prefix: str = "") -> None:
    parts = dotted.split(".")
    for i, name in enumerate(parts):
        key = prefix + ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
            known = ", ".join(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else ""
            raise ConfigError(f"unknown config key '{key}' ({where}); known here: {known}")
        if i == len(parts) - 1:
            hints = typing.get_type_hints(type(obj))
            if dataclasses.is_dataclass(getattr(obj, name)):
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: expected a mapping ({where}), got {value!r}")
                for k, v in value.items():
                    _set(getattr(obj, name), str(k), v, where, prefix=f"{key}.")
            else:
                setattr(obj, name, _coerce(key, hints[name], value))
        else:
            obj = getattr(obj, name)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings; values are parsed as YAML (`[1, 2]`, `true`, `3e-4`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. model.width=128")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
        _set(cfg, key.strip(), value, f"override {item!r}")
    return cfg


def load_config(preset: str | Path, overrides: list[str] | None = None) -> Config:
    """A preset name (see list_presets) or a YAML path, then overrides; validated.

    A YAML file may name a base with a top-level `preset: NAME` (a shipped preset, or a path
    relative to the file): the base loads first and the file's sections override it key by key.
    """
    cfg = _load_preset(preset, None, ())
    apply_overrides(cfg, overrides or [])
    return cfg.validate()


def _load_preset(preset: str | Path, relative_to: Path | None, chain: tuple[Path, ...]) -> Config:
    path = Path(preset)
    if not path.suffix:
        path = _preset_paths().get(str(preset))
        if path is None:
            raise ConfigError(f"unknown preset {str(preset)!r}; shipped presets: {', '.join(list_presets())}")
    elif relative_to is not None and not path.is_absolute():
        path = relative_to / path
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" if not path.exists() else
                          f"config file {path} is not a file")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: presets name each other in a cycle: "
                          f"{' -> '.join(str(p) for p in (*chain, path.resolve()))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(err)})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("preset", None)
    if base is None:
        cfg = Config()
    elif isinstance(base, str) and base:
        cfg = _load_preset(base, path.parent, (*chain, path.resolve()))
    else:
        raise ConfigError(f"{path}: preset: expected the name of a base preset or a YAML path, got {base!r}")
    for section, values in raw.items():
        _set(cfg, str(section), values, f"preset {path}")
    cfg.preset = path.stem
    return cfg


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line 3, column 5: could not find expected ':'' from a PyYAML error."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved with to_dict (checkpoints, MLflow artifacts)."""
    cfg = Config()
    for section, values in d.items():
        _set(cfg, section, values, "saved config")
    return cfg.validate()
