"""What a fold trains: the task (from the dataset preset or finetune.*), the model and its
optimiser groups, the pretrained encoder weights, and the task's loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hicmae_dist.config import Config, ConfigError, ModelConfig
from hicmae_dist.data.downstream import DEFAULT_SUBJECT
from hicmae_dist.eval.datasets import DatasetPreset, get_dataset
from hicmae_dist.models import build_finetune_model, get_spec
from hicmae_dist.models.convert import Converted


@dataclass(frozen=True)
class Task:
    kind: str  # "classification" | "multilabel" | "regression"
    num_outputs: int
    names: tuple[str, ...]  # class names or regression dimensions
    select_metric: str  # validation metric that picks the epoch (higher is better)
    report: tuple[str, ...]  # metrics of the results table
    subject: str | None  # subject-id pattern for carving validation
    paper: dict[str, float]
    paper_model: str = ""  # whose figures `paper` holds

    @property
    def regression(self) -> bool:
        return self.kind == "regression"

    @property
    def multilabel(self) -> bool:
        return self.kind == "multilabel"


_DEFAULT_REPORT = {
    "classification": ("uar", "war", "weighted_f1"),
    "multilabel": ("map", "auc"),
    "regression": ("ccc", "pcc"),
}


def resolve_task(cfg: Config, class_names: Sequence[str] = ()) -> Task:
    """From the dataset preset (finetune.dataset) or finetune.task / num_outputs. class_names:
    from the split's class_labels_indices.csv, for presets that ship only the class count."""
    ft = cfg.finetune
    preset: DatasetPreset | None = get_dataset(ft.dataset) if ft.dataset else None
    kind = preset.task if preset else ft.task
    names = tuple(class_names) or ((preset.dimensions if kind == "regression" else preset.classes) if preset else ())
    if class_names and preset and len(class_names) != preset.num_outputs:
        raise ConfigError(f"the class csv has {len(class_names)} classes, dataset {ft.dataset} {preset.num_outputs}")
    expected = len(names) or (preset.num_outputs if preset else 0)  # what the dataset or csv says
    num = ft.num_outputs or expected
    if num < 1:
        raise ConfigError(
            "finetune.num_outputs: expected the number of classes (or regression dimensions) "
            "when finetune.dataset is not set"
        )
    if expected and num != expected:
        raise ConfigError(f"finetune.num_outputs: {num}, but dataset {ft.dataset or '(class csv)'} has {expected}")
    names = names or tuple(f"d{i}" if kind == "regression" else str(i) for i in range(num))
    report = preset.metrics if preset else _DEFAULT_REPORT[kind]
    select = ft.select_metric or report[0]
    return Task(
        kind,
        num,
        tuple(names),
        select,
        tuple(report),
        preset.subject if preset else DEFAULT_SUBJECT,
        dict(preset.paper) if preset else {},
        preset.paper_model if preset else "",
    )


def finetune_model_config(cfg: Config, pretrained: Converted | None) -> ModelConfig:
    """The architecture of the pretrained weights (or cfg.model from scratch) with this run's
    drop path (the execution settings are the run's: cfg.execution)."""
    if pretrained is None:
        return cfg.model
    return dataclasses.replace(pretrained.cfg, drop_path=cfg.model.drop_path)


# Fine-tune tensors the pretraining model does not have: initialised here, never loaded.
_FRESH = ("head.", "head_norm.", "video_layer_weights", "audio_layer_weights")


def load_encoder_weights(model: torch.nn.Module, pretrained: Converted) -> dict[str, int]:
    """Copy every tensor of `pretrained` the fine-tuning model has (same name and shape); the
    decoders are dropped, the head is left to its init. A head of another class count (from a
    fine-tuned checkpoint) is re-initialised. Raises if any backbone tensor stays unloaded."""
    own = model.state_dict()
    take = {k: v for k, v in pretrained.state_dict.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in take]
    backbone_missing = [k for k in missing if not k.startswith(_FRESH)]
    if backbone_missing:
        raise ValueError(
            f"the pretrained weights ({pretrained.arch} {pretrained.kind}) lack {len(backbone_missing)} "
            f"backbone tensors of the fine-tuning model, e.g. {backbone_missing[:5]}: "
            f"another architecture or size?"
        )
    model.load_state_dict(take, strict=False)
    return {"loaded": len(take), "initialised": len(missing), "dropped": len(pretrained.state_dict) - len(take)}


def build_finetune(cfg: Config, task: Task, pretrained: Converted | None) -> tuple[torch.nn.Module, list[dict], dict]:
    """(model, optimiser groups, load report)."""
    mcfg = finetune_model_config(cfg, pretrained)
    spec = get_spec(mcfg.arch)
    model = build_finetune_model(mcfg, task.num_outputs, cfg.execution, **spec.finetune_kwargs(cfg.finetune))
    report = load_encoder_weights(model, pretrained) if pretrained is not None else {"loaded": 0}
    groups = spec.finetune_param_groups(model, cfg.train.weight_decay, cfg.finetune)
    return model, [g for g in groups if g["params"]], report


# --- losses ---------------------------------------------------------------------------------------------


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - Lin's CCC (population moments), averaged over the dimensions; (B, D) inputs."""
    pm, tm = pred.mean(0), target.mean(0)
    cov = ((pred - pm) * (target - tm)).mean(0)
    ccc = 2 * cov / (pred.var(0, unbiased=False) + target.var(0, unbiased=False) + (pm - tm) ** 2 + 1e-8)
    return 1.0 - ccc.mean()


def task_loss(output: torch.Tensor, target: torch.Tensor, task: Task, ft) -> torch.Tensor:
    """Classification: cross-entropy against soft targets (B, K); multi-label: binary
    cross-entropy with logits against soft multi-hot targets (B, K), the mean over B x K (the
    release's BCEWithLogitsLoss); regression: MSE or 1 - CCC."""
    if task.multilabel:
        return F.binary_cross_entropy_with_logits(output.float(), target)
    if not task.regression:
        return torch.sum(-target * F.log_softmax(output.float(), dim=-1), dim=-1).mean()
    if ft.regression_loss == "ccc":
        return ccc_loss(output.float(), target)
    return F.mse_loss(output.float(), target)
