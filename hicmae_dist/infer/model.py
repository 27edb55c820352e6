"""hicmae_dist.load(path): a model for embed / predict, from a fine-tuning run (one fold's
validation-selected weights), a pretraining run (its latest checkpoint), our weights file or the
authors' checkpoint. Pretraining weights become the fine-tuning model's backbone (features only)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hicmae_dist.config import ConfigError, ModelConfig, config_from_dict
from hicmae_dist.data.video import FPS
from hicmae_dist.eval.datasets import get_dataset
from hicmae_dist.infer.sources import TensorClip
from hicmae_dist.infer.windows import Recipe, plan_windows, window_inputs
from hicmae_dist.models import build_finetune_model, get_spec
from hicmae_dist.models.convert import ConversionError, Converted
from hicmae_dist.train.finetune.evaluate import predict as eval_predict
from hicmae_dist.train.finetune.task import Task, load_encoder_weights, resolve_task
from hicmae_dist.train.rundir import RunDir

log = logging.getLogger(__name__)
FEATURES = ("fusion", "encoders")  # the fine-tuning feature (before the head) | each encoder's pooled output


@dataclass
class Loaded:
    net: torch.nn.Module  # a fine-tuning model (features, retrieval_features, forward)
    cfg: ModelConfig
    task: Task | None  # None: pretraining weights, no head to predict with
    source: str


def load_model(path: str | Path, *, fold: int | None = None, dataset: str | None = None) -> Loaded:
    """The weights at `path` (module docstring). fold: which fold of a fine-tuning run (default:
    the first with weights); dataset: a preset naming the classes of a fine-tuned weights file."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        if not run.best_weights.exists() and sorted(path.glob("fold[0-9][0-9]")):
            run = _fold_of(run, fold)
        if run.best_weights.exists():
            return _load_fold(run)
        from hicmae_dist.train.export import run_weights

        return _from_converted(run_weights(path), str(path), dataset)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such weights file or run directory")
    from hicmae_dist.models.convert import load_weights

    return _from_converted(load_weights(path), str(path), dataset)


def _fold_of(run: RunDir, fold: int | None) -> RunDir:
    folds = [RunDir(p) for p in sorted(run.path.glob("fold[0-9][0-9]")) if RunDir(p).best_weights.exists()]
    if fold is not None:
        folds = [f for f in folds if f.name == f"fold{fold:02d}"]
    if not folds:
        raise FileNotFoundError(
            f"{run.path}: no fold{'' if fold is None else f'{fold:02d}'} with fine-tuned weights (foldNN/best.pth)"
        )
    return folds[0]


def _load_fold(run: RunDir) -> Loaded:
    """A fold's best.pth with the model and task of its config.yaml."""
    import yaml

    cfg = config_from_dict(yaml.safe_load(run.config.read_text()))
    task = resolve_task(cfg)
    state = torch.load(run.best_weights, map_location="cpu", weights_only=True)
    mcfg = _fold_model_config(cfg.model, state, run)
    net = build_finetune_model(mcfg, task.num_outputs, **get_spec(mcfg.arch).finetune_kwargs(cfg.finetune))
    net.load_state_dict(state)
    log.info(
        "loaded %s: %s fine-tuned, %s with %d outputs (%s)",
        run.best_weights,
        mcfg.arch,
        task.kind,
        task.num_outputs,
        ", ".join(task.names),
    )
    return Loaded(net, mcfg, task, str(run.best_weights))


def _fold_model_config(saved: ModelConfig, state: dict[str, torch.Tensor], run: RunDir) -> ModelConfig:
    """The fold's model: config.yaml's model section, which holds the preset's model even when
    the weights fine-tuned were of another size; then each field the weights' shapes decide
    (width, depths ...) read from best.pth, said in the log. Heads show in no shape: kept (unless
    that config is not valid: then the converter's own inference, heads at head_dim 64)."""
    from hicmae_dist.models.convert import expected_shapes, rename_key

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    head = shapes.get("head.weight", (0,))[0]

    def fits(cfg: ModelConfig) -> dict:
        return expected_shapes(cfg.arch, "finetune", cfg, head)

    if shapes == fits(saved):
        return saved
    theirs = {rename_key(k, saved.arch, "upstream"): v for k, v in state.items()}
    try:
        inferred = get_spec(saved.arch).upstream.infer_config(theirs, "finetune")
        changed = {
            f.name: getattr(inferred, f.name)
            for f in dataclasses.fields(saved)
            if getattr(inferred, f.name) != getattr(saved, f.name)
            and fits(dataclasses.replace(saved, **{f.name: getattr(inferred, f.name)})) != fits(saved)
        }
        merged = dataclasses.replace(saved, **changed)
        try:
            merged.validate()
        except ValueError:  # e.g. the preset's intermediate_layers for another depth: the converter's whole guess
            merged, changed = inferred, {"all": "as the converter infers it (heads at head_dim 64)"}
            merged.validate()
    except (ConversionError, ValueError, KeyError) as err:
        raise ConversionError(
            f"{run.best_weights} does not fit the model section of {run.config}, and its size "
            f"cannot be read from its shapes: {err}"
        ) from None
    if fits(merged) != shapes:
        raise ConversionError(
            f"{run.best_weights} does not fit the model section of {run.config} (read from the weights: {changed})"
        )
    log.warning(
        "%s: the model section of %s does not fit its weights; read from them: %s",
        run.best_weights,
        run.config,
        changed,
    )
    return merged


def _from_converted(weights: Converted, source: str, dataset: str | None) -> Loaded:
    if weights.kind == "finetune":
        net = weights.load_model()
        preset = get_dataset(dataset) if dataset else None
        kind = preset.task if preset else "classification"
        names = (preset.classes or preset.dimensions) if preset else tuple(map(str, range(weights.num_classes)))
        if len(names) != weights.num_classes:
            raise ConfigError(
                f"dataset {dataset} has {len(names)} outputs, the weights in {source} {weights.num_classes}"
            )
        task = Task(kind, weights.num_classes, tuple(names), "", (), None, {})
    else:
        net = build_finetune_model(weights.cfg, get_spec(weights.arch).default_classes)
        load_encoder_weights(net, weights)  # the backbone; the (unused) head keeps its init
        task = None
    log.info("loaded %s: %s %s weights", source, weights.arch, weights.kind)
    return Loaded(net, weights.cfg, task, source)


class InferenceModel:
    """What `hicmae_dist.load` returns: embed / predict on files, preprocess for your own tensors."""

    def __init__(self, loaded: Loaded, device: str | torch.device | None = None, batch_size: int = 8):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = loaded.net.to(self.device).eval()
        self.cfg, self.task, self.source = loaded.cfg, loaded.task, loaded.source
        self.recipe = Recipe.of(loaded.cfg)
        self.batch_size = batch_size
        log.info("inference on %s (fp32)", self.device)

    @property
    def names(self) -> tuple[str, ...]:
        return self.task.names if self.task else ()

    def preprocess(
        self, frames, wave, *, hop_s: float | None = None, segments: int | None = None, crops: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Your own (T, H, W, 3) uint8 frames at 25 fps and (S,) 16 kHz waveform -> the windows'
        (video (W, V, ...), audio (W, V, 1, T, F), start seconds (W,)), the centre crop."""
        clip = TensorClip(frames, wave)
        windows = plan_windows(self.recipe, clip.num_frames, hop=hop_frames(hop_s), segments=segments, crops=crops)
        pairs = [window_inputs(clip, w, self.recipe) for w in windows]
        starts = np.array([w.start / FPS for w in windows])
        return torch.stack([v for v, _ in pairs]), torch.stack([a for _, a in pairs]), starts

    @torch.no_grad()
    def features(self, video: torch.Tensor, audio: torch.Tensor, feature: str = "fusion") -> dict[str, torch.Tensor]:
        """(B, V, ...) inputs -> {name: (B, D)} averaged over the V views: "fusion" (the head's
        input) or "encoders" ("video" and "audio": each encoder's pooled output)."""
        if feature not in FEATURES:
            raise ConfigError(f"feature {feature!r}: expected one of {', '.join(FEATURES)}")
        b, v = video.shape[:2]
        x, a = video.flatten(0, 1).to(self.device), audio.flatten(0, 1).to(self.device)
        if feature == "fusion":
            out = {"fusion": self.net.features(x, a)}
        else:
            out = dict(zip(("video", "audio"), self.net.retrieval_features(x, a)))
        return {k: t.float().view(b, v, -1).mean(dim=1).cpu() for k, t in out.items()}

    def outputs(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """(B, V, ...) inputs -> (B, K): class probabilities (regression outputs) averaged over
        the views, by the fine-tuning evaluation's predict."""
        self.require_head()
        batch = {"video": video, "audio": audio, "label": torch.zeros(video.shape[0]), "key": [""] * video.shape[0]}
        _, out, _ = eval_predict(self.net, [batch], self.task, self.device, torch.float32)
        return torch.from_numpy(out)

    def require_head(self) -> None:
        if self.task is None:
            raise ConfigError(
                f"{self.source} holds pretraining weights: no head to predict with (fine-tune first, or embed)"
            )

    def embed(self, path, **options):
        """One video -> ClipResult (per window and pooled features); options as run.run_inputs."""
        return self._one(path, "embed", options)

    def predict(self, path, **options):
        """One video -> ClipResult (per window and per video probabilities, `names`)."""
        return self._one(path, "predict", options)

    def _one(self, path, what: str, options: dict):
        from hicmae_dist.infer.run import run_inputs
        from hicmae_dist.infer.sources import VideoInput

        (result,) = run_inputs(self, [VideoInput(Path(path).stem, Path(path))], what, progress=False, **options)
        return result


def hop_frames(hop_s: float | None) -> int | None:
    if hop_s is None:
        return None
    hop = round(hop_s * FPS)
    if hop < 1:
        raise ConfigError(f"hop {hop_s} s: at least one frame ({1 / FPS} s)")
    return hop
