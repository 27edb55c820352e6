"""Typed run configuration: dataclasses, YAML presets shipped in the package, dotted overrides.

The bottom layer of the package: it imports nothing from hicmae_dist statically, so every other
layer (models, data, train, cli) can take its own section of the config. The model section's
class is the family's (hicmae_dist/models/<arch>/config.py, imported by name when model.arch is
set; those files import only this one); the presets are found by path in models/*/presets/.
The execution section (attention backend, packing, activation checkpointing, compile) and the
fields marked metadata={"hashed": False} stay out of Config.hash: a resume may change them.
Fields declared with added(default) (new since runs were written) count only when not default.

    cfg = load_config("tiny-cpu", ["model.width=128", "train.steps=50"])

An unknown key, a value of the wrong type or out of its range (NaN and inf included), or a preset
file that is not valid YAML raises ConfigError naming the key or the file (and line).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
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
FAMILY_CONFIG_GLOB = "models/*/config.py"


class ConfigError(ValueError):
    """A config key that does not exist, or a value of the wrong type or range."""


def added(default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A field added after runs were written with this config: it enters Config.hash only when
    set to something else than its default (the behaviour runs had before it existed), so an
    upgrade does not refuse to resume every running job."""
    return field(default=default, metadata={"added": True}, **kwargs)


def _hashed(f: dataclasses.Field, section: Any) -> bool:
    if not f.metadata.get("hashed", True):
        return False
    if not f.metadata.get("added"):
        return True
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return getattr(section, f.name) != default


@dataclass
class ModelConfig:
    """The fields every model family has, with the same meaning (defaults are HiCMAE-S's). Each
    family subclasses it in hicmae_dist/models/<arch>/config.py with its own fields and checks;
    `model.arch` picks the class (see model_config_class)."""

    arch: str = ""  # a family: a sub-package of hicmae_dist.models with a config.py
    width: int = 384  # encoder width C (video, audio and fusion)
    heads: int = 6
    decoder_width: int = 192
    decoder_heads: int = 3
    decoder_depth: int = 4
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    num_frames: int = 16
    image_size: int = 160
    tubelet: int = 2
    patch: int = 16
    audio_frames: int = 256  # fbank frames (time)
    mel_bins: int = 128
    video_mask_ratio: float = 0.9
    audio_mask_ratio: float = 0.8
    contrastive_weight: float = 0.0025
    temperature: float = 0.07
    negatives: str = "local"  # "local" | "global" contrastive negatives
    audio_mask_mode: str = "random"  # random | time | freq | tf (a family may allow fewer)
    symmetric_contrastive: bool | None = None  # None: the family's own

    def validate(self) -> None:
        family = model_config_class(self.arch)
        expect(type(self) is family, "model.arch", f"a {family.__name__} for arch {self.arch!r}", type(self).__name__)
        for key in (
            "width",
            "heads",
            "decoder_width",
            "decoder_heads",
            "num_frames",
            "image_size",
            "tubelet",
            "patch",
            "audio_frames",
            "mel_bins",
        ):
            expect(getattr(self, key) >= 1, f"model.{key}", ">= 1", getattr(self, key))
        expect(self.mlp_ratio > 0, "model.mlp_ratio", "> 0", self.mlp_ratio)
        expect(0.0 <= self.drop_path < 1.0, "model.drop_path", "in [0, 1)", self.drop_path)
        expect(self.temperature > 0, "model.temperature", "> 0 (it divides the similarities)", self.temperature)
        expect(self.contrastive_weight >= 0, "model.contrastive_weight", ">= 0", self.contrastive_weight)
        expect(self.width % self.heads == 0, "model.width", "a multiple of model.heads", self.width)
        expect(
            self.decoder_width % self.decoder_heads == 0,
            "model.decoder_width",
            "a multiple of model.decoder_heads",
            self.decoder_width,
        )
        expect(
            self.audio_mask_mode in ("random", "time", "freq", "tf"),
            "model.audio_mask_mode",
            "one of random, time, freq, tf",
            self.audio_mask_mode,
        )
        expect(self.image_size % self.patch == 0, "model.image_size", "a multiple of model.patch", self.image_size)
        expect(
            self.audio_frames % self.patch == 0 and self.mel_bins % self.patch == 0,
            "model.audio_frames",
            "audio_frames and mel_bins multiples of model.patch",
            (self.audio_frames, self.mel_bins),
        )
        for key in ("video_mask_ratio", "audio_mask_ratio"):  # 0 masks nothing: nothing to reconstruct
            expect(0.0 < getattr(self, key) < 1.0, f"model.{key}", "in (0, 1)", getattr(self, key))
        expect(self.negatives in ("local", "global"), "model.negatives", "'local' or 'global'", self.negatives)
        self.validate_family()

    def validate_family(self) -> None:
        """The family's own checks (its fields, and what it does not support of the shared ones)."""

    def depth_summary(self) -> str:
        """'depth E + F': the family's encoder depths, as `convert` prints them."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its depths")


def model_families() -> list[str]:
    """The model families: the sub-packages of hicmae_dist.models with a config.py."""
    return sorted(p.parent.name for p in Path(__file__).parent.glob(FAMILY_CONFIG_GLOB))


def model_config_class(arch: Any, key: str = "model.arch") -> type[ModelConfig]:
    """hicmae_dist.models.<arch>.config.MODEL_CONFIG, imported by name: this module is the
    bottom layer and imports nothing from the package statically."""
    families = model_families()
    if arch not in families:
        raise ConfigError(f"{key}: expected one of {', '.join(families)}, got {arch!r}")
    return importlib.import_module(f"hicmae_dist.models.{arch}.config").MODEL_CONFIG


def _default_model() -> ModelConfig:
    return model_config_class("hicmae")()


@dataclass
class DataConfig:
    """Shard loader and augmentation (docs/models.md, HiCMAE inputs and CAV-MAE inputs)."""

    shards: str = field(default="", metadata={"hashed": False})  # directory of *.tar shards (set by `pretrain --data`)
    batch_size: int = 8  # per rank
    num_workers: int = field(default=2, metadata={"hashed": False})
    shuffle_buffer: int = 256
    multiscale_crop: bool = True
    gain_augment: bool = True
    roll_augment: bool = False  # the release's roll is a no-op; ours works when enabled
    audio_form: str = added("wave")  # what the shards store: "wave" (int16 PCM) | "fbank" (prepare --audio-form)
    max_bad_fraction: float = 0.01  # stop the run when more samples than this are unreadable
    # where the pretraining loader's JPEGs are decoded: "cpu" (workers) | "cuda" (the trainer's GPU,
    # nvJPEG; the workers only slice bytes). Not hashed: a decoder's rounding (~1 grey level), not
    # the recipe, as num_workers; a run may resume on the other decoder.
    decode_on: str = field(default="cpu", metadata={"hashed": False})

    def validate(self) -> None:
        expect(self.batch_size >= 1, "data.batch_size", ">= 1", self.batch_size)
        expect(self.decode_on in ("cpu", "cuda"), "data.decode_on", "'cpu' or 'cuda'", self.decode_on)
        expect(self.num_workers >= 0, "data.num_workers", ">= 0", self.num_workers)
        expect(self.shuffle_buffer >= 0, "data.shuffle_buffer", ">= 0", self.shuffle_buffer)
        expect(self.audio_form in ("wave", "fbank"), "data.audio_form", "'wave' or 'fbank'", self.audio_form)
        expect(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", "in [0, 1]", self.max_bad_fraction)


@dataclass
class TrainConfig:
    """Optimiser, schedule, DeepSpeed engine and checkpoints (docs/models.md, the pretraining recipes)."""

    steps: int = field(default=300, metadata={"hashed": False})
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
    grad_clip: float = 0.0  # 0 = off, as in the paper
    grad_accum: int = 1
    checkpoint_every: int = field(default=100, metadata={"hashed": False})
    keep_checkpoints: int = field(default=2, metadata={"hashed": False})
    log_every: int = field(default=10, metadata={"hashed": False})
    # skipped non-finite steps in a row before the run stops
    max_nonfinite_in_a_row: int = field(default=5, metadata={"hashed": False})
    seed: int = 0

    def validate(self) -> None:
        expect(self.steps >= 1, "train.steps", ">= 1", self.steps)
        expect(self.base_lr > 0, "train.base_lr", "> 0", self.base_lr)
        expect(0 <= self.min_lr <= self.base_lr, "train.min_lr", "in [0, train.base_lr]", self.min_lr)
        expect(self.lr_gamma > 0, "train.lr_gamma", "> 0", self.lr_gamma)
        expect(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
        expect(self.eps > 0, "train.eps", "> 0", self.eps)
        expect(0 <= self.warmup_steps <= self.steps, "train.warmup_steps", "in [0, train.steps]", self.warmup_steps)
        expect(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", "0, 1, 2 or 3", self.zero_stage)
        expect(self.optimizer in ("adamw", "adam"), "train.optimizer", "'adamw' or 'adam'", self.optimizer)
        expect(self.schedule in ("cosine", "step"), "train.schedule", "'cosine' or 'step'", self.schedule)
        expect(
            self.lr_milestones == sorted(self.lr_milestones),
            "train.lr_milestones",
            "increasing steps",
            self.lr_milestones,
        )
        expect(not (self.bf16 and self.fp16), "train.fp16", "not both train.bf16 and train.fp16", self.fp16)
        expect(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            "two numbers in [0, 1)",
            self.betas,
        )
        expect(all(m >= 1 for m in self.lr_milestones), "train.lr_milestones", "steps >= 1", self.lr_milestones)
        expect(self.grad_clip >= 0, "train.grad_clip", ">= 0", self.grad_clip)
        expect(self.grad_accum >= 1, "train.grad_accum", ">= 1", self.grad_accum)
        expect(self.checkpoint_every >= 1, "train.checkpoint_every", ">= 1", self.checkpoint_every)
        expect(self.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", self.keep_checkpoints)
        expect(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)
        expect(self.max_nonfinite_in_a_row >= 1, "train.max_nonfinite_in_a_row", ">= 1", self.max_nonfinite_in_a_row)


@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only)."""

    enabled: bool = True
    uri: str = ""  # empty: sqlite:///<run_dir>/mlflow.db
    experiment: str = "hicmae-dist"
    run_name: str = ""
    system_metrics_s: float = 10.0  # sampling interval of CPU/GPU/memory metrics; 0 = off

    def validate(self) -> None:
        expect(bool(self.experiment), "tracking.experiment", "a non-empty name", self.experiment)
        expect(self.system_metrics_s >= 0, "tracking.system_metrics_s", ">= 0 (0 = off)", self.system_metrics_s)


@dataclass
class FinetuneConfig:
    """Fine-tuning recipe and protocol (docs/models.md, HiCMAE fine-tuning model and CAV-MAE fine-tuning),
    read by `hicmae-dist finetune` only. The optimiser, LR and batch come from `train` and `data`;
    train.steps and train.warmup_steps are set from the epochs and the training split's size."""

    dataset: str = ""  # a preset of hicmae_dist.eval.datasets; "" = task / num_outputs below
    task: str = "classification"  # "classification" | "multilabel" | "regression" (overridden by the dataset)
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
    # epochs between validation passes (the last epoch is always validated)
    eval_every: int = field(default=1, metadata={"hashed": False})
    # --- CAV-MAE's own downstream (issue #17 items 1, 4): test-time only, the training unchanged ---
    # more test passes, one per CAV-MAE mode (e.g. audio_missing_video); [] = the training mode only
    eval_modes: list[str] = field(default_factory=list, metadata={"hashed": False})
    # [start, end]: the weights of epochs start..end (0-based, inclusive) averaged and tested; [] = off
    weight_average: list[int] = field(default_factory=list, metadata={"hashed": False})
    # --- multi-label sets and the CAV-MAE release's recipes (AudioSet, VGGSound) ---
    # draw each epoch's clips with replacement, clip weight = sum over its labels of
    # 1000 / (label count + 0.01) (the release's --bal and gen_weight_file.py)
    balanced_sampling: bool = added(False)
    # class_labels_indices.csv (index,mid,display_name) of the release's JSON datafiles;
    # "" = the one found in the fold's split directory or in --splits
    label_csv: str = field(default="", metadata={"hashed": False})
    # epochs (0-based) at which train.schedule "step" multiplies the LR by train.lr_gamma;
    # converted to train.lr_milestones (steps) once the epoch's length is known
    lr_milestone_epochs: list[int] = added(default_factory=list)

    def validate(self) -> None:
        expect(
            self.task in ("classification", "multilabel", "regression"),
            "finetune.task",
            "'classification', 'multilabel' or 'regression'",
            self.task,
        )
        expect(
            self.lr_milestone_epochs == sorted(self.lr_milestone_epochs)
            and all(0 < e < self.epochs for e in self.lr_milestone_epochs),
            "finetune.lr_milestone_epochs",
            "increasing epochs in (0, finetune.epochs)",
            self.lr_milestone_epochs,
        )
        expect(self.epochs >= 1, "finetune.epochs", ">= 1", self.epochs)
        expect(
            0 <= self.warmup_epochs <= self.epochs,
            "finetune.warmup_epochs",
            "in [0, finetune.epochs]",
            self.warmup_epochs,
        )
        expect(self.num_outputs >= 0, "finetune.num_outputs", ">= 0 (0 = from the dataset)", self.num_outputs)
        expect(0.0 < self.layer_decay <= 1.0, "finetune.layer_decay", "in (0, 1]", self.layer_decay)
        expect(self.head_lr_scale > 0, "finetune.head_lr_scale", "> 0", self.head_lr_scale)
        expect(self.mode in ("multimodal", "audio", "video"), "finetune.mode", "multimodal, audio or video", self.mode)
        expect(
            self.regression_loss in ("mse", "ccc"), "finetune.regression_loss", "'mse' or 'ccc'", self.regression_loss
        )
        expect(
            self.head_activation in (None, "sigmoid", "tanh", "relu"),
            "finetune.head_activation",
            "null, sigmoid, tanh or relu",
            self.head_activation,
        )
        for key in ("mixup", "cutmix"):
            expect(getattr(self, key) >= 0, f"finetune.{key}", ">= 0 (0 = off)", getattr(self, key))
        for key in ("mix_prob", "switch_prob", "label_smoothing"):
            expect(0.0 <= getattr(self, key) <= 1.0, f"finetune.{key}", "in [0, 1]", getattr(self, key))
        expect(0.0 < self.val_fraction < 1.0, "finetune.val_fraction", "in (0, 1)", self.val_fraction)
        expect(0.0 < self.crop_scale_min <= 1.0, "finetune.crop_scale_min", "in (0, 1]", self.crop_scale_min)
        expect(
            self.test_num_segment >= 1 and self.test_num_crop >= 1,
            "finetune.test_num_segment",
            "test_num_segment and test_num_crop >= 1",
            (self.test_num_segment, self.test_num_crop),
        )
        expect(self.eval_every >= 1, "finetune.eval_every", ">= 1", self.eval_every)
        expect(
            len(set(self.eval_modes)) == len(self.eval_modes), "finetune.eval_modes", "no mode twice", self.eval_modes
        )
        wa = self.weight_average
        expect(
            not wa or (len(wa) == 2 and 0 <= wa[0] <= wa[1] < self.epochs),
            "finetune.weight_average",
            f"[] (off) or [start, end], 0-based epochs, 0 <= start <= end < finetune.epochs ({self.epochs})",
            wa,
        )


# ops.attention's backends (config sits below ops, so the names are repeated here; a test holds
# them equal). Whether an explicit one can run is checked where the device is known, at start-up.
ATTENTION_BACKENDS = ("auto", "triton", "xformers", "sdpa", "reference")


@dataclass
class ExecutionConfig:
    """How a run executes, not what it computes: the same maths with any of these, so they are
    outside the config hash and a resume may change them. The models take them beside their
    ModelConfig: build_model(cfg.model, cfg.execution)."""

    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS; see hicmae_dist.ops.attention
    # HiCMAE fusion: run the two cross-attentions of a fusion layer (video->audio, audio->video)
    # as one packed varlen attention launch, and likewise the two self-attentions. CAV-MAE: run
    # the shared block's three passes (unified [audio, video], audio alone, video alone; same
    # attention / MLP weights, own LayerNorms) as one packed varlen attention launch per shared
    # block in pretraining. Same maths either way (drop path draws come in another order)
    pack_fusion: bool = False
    # wrap every transformer block call in torch.utils.checkpoint (non-reentrant) in training:
    # activations recomputed in the backward instead of stored; same maths, less memory
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the model inside the engine

    def validate(self) -> None:
        expect(
            self.attention_backend in ATTENTION_BACKENDS,
            "execution.attention_backend",
            f"one of {', '.join(ATTENTION_BACKENDS)}",
            self.attention_backend,
        )


@dataclass
class Config:
    preset: str = ""
    model: ModelConfig = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"hashed": False})
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # hashed for fine-tuning runs only
    execution: ExecutionConfig = field(default_factory=ExecutionConfig, metadata={"hashed": False})

    def validate(self) -> Config:
        for name in ("model", "data", "train", "tracking", "finetune", "execution"):
            _check_finite(getattr(self, name), name)  # first: NaN fails every range check below
            getattr(self, name).validate()
        expect(
            not self.finetune.lr_milestone_epochs or self.train.schedule == "step",
            "finetune.lr_milestone_epochs",
            "train.schedule: step (the milestones are the step schedule's)",
            self.train.schedule,
        )
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

    def hash(self, finetune: bool = False) -> str:
        """Hash of everything that changes the maths: every field but those marked
        metadata={"hashed": False} (tracking, execution, the step budget and logistics). The
        finetune section counts for fine-tuning runs only, so a pretraining checkpoint's hash
        does not depend on it."""
        d = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("hashed", True) or (f.name == "finetune" and not finetune):
                continue
            value = getattr(self, f.name)
            d[f.name] = (
                {g.name: getattr(value, g.name) for g in dataclasses.fields(value) if _hashed(g, value)}
                if dataclasses.is_dataclass(value)
                else value
            )
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def expect(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _check_finite(section: Any, prefix: str) -> None:
    """Every float of a section (lists included) is finite: .nan and .inf are YAML floats."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float):
                expect(math.isfinite(v), f"{prefix}.{f.name}", "a finite number", value)


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


def _pick_model_family(cfg: Config, dotted: str, value: Any, where: str) -> None:
    """model.arch picks the model section's class: a new arch rebuilds the section, keeping the
    values of the fields both families have (the new family's own fields start at its defaults)."""
    if dotted == "model.arch":
        arch = value
    elif dotted == "model" and isinstance(value, dict) and "arch" in value:
        arch = value["arch"]
    else:
        return
    family = model_config_class(arch, f"model.arch ({where})")
    if type(cfg.model) is not family:
        names = {f.name for f in dataclasses.fields(family)} - {"arch"}
        cfg.model = family(
            **{f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model) if f.name in names}
        )


def _set(obj: Any, dotted: str, value: Any, where: str, prefix: str = "") -> None:
    if isinstance(obj, Config):
        _pick_model_family(obj, dotted, value, where)
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
        raise ConfigError(
            f"config file {path} does not exist" if not path.exists() else f"config file {path} is not a file"
        )
    if path.resolve() in chain:
        raise ConfigError(
            f"{path}: presets name each other in a cycle: {' -> '.join(str(p) for p in (*chain, path.resolve()))}"
        )
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


# Keys a saved config (a run's config.yaml, a converted weights file) holds from before they
# moved to the execution section; a family's own renames are its config class's RENAMED_KEYS.
_MOVED_TO_EXECUTION = {"model": ("attention_backend", "pack_fusion", "activation_checkpointing"), "train": ("compile",)}


def _saved_model_section(d: dict[str, Any], execution: dict[str, Any]) -> dict[str, Any]:
    d = dict(d)
    for key in _MOVED_TO_EXECUTION["model"]:
        if key in d:
            execution.setdefault(key, d.pop(key))
    renamed = getattr(model_config_class(d.get("arch"), "saved model.arch"), "RENAMED_KEYS", {})
    return {renamed.get(k, k): v for k, v in d.items()}


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config saved with to_dict (checkpoints, MLflow artifacts, run directories)."""
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    execution = d.setdefault("execution", {})
    for key in _MOVED_TO_EXECUTION["train"]:
        if key in d.get("train", {}):
            execution.setdefault(key, d["train"].pop(key))
    if "model" in d:
        d["model"] = _saved_model_section(d["model"], execution)
    cfg = Config()
    for section, values in d.items():
        _set(cfg, section, values, "saved config")
    return cfg.validate()


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Rebuild a model section saved with dataclasses.asdict (converted weights files); any
    execution settings it holds are dropped: they are the run's, not the weights'."""
    cfg = Config()
    _set(cfg, "model", _saved_model_section(d, {}), "saved model config")
    _check_finite(cfg.model, "model")
    cfg.model.validate()
    return cfg.model
