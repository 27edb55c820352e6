"""The paper's downstream datasets (docs/models.md, HiCMAE downstream datasets): what a user
needs to point `hicmae-dist finetune --dataset NAME --splits DIR` at their own copy.

Labels in the annotation files are the integers 0..K-1 in the order of `classes` (the names
are for tables and confusion matrices); regression sets list one float column per dimension.
`folds` is the protocol's number of split directories (split01 ...; leave-one-session-out
sets have one per session). `subject` is a regular expression whose first group, searched in a
clip's frame_dir, names its subject (actor or speaker): it carves a subject-independent
validation split from training when a fold has no val.csv. None: the set has no subject ids
(in-the-wild clips), the validation split is carved by clip. `paper` holds the reported test figures (percent) of
`paper_model` for comparison.

The CAV-MAE sets (audioset-20k, audioset-2m, vggsound) ship the class count only: their names
are the display_name column of the class_labels_indices.csv that comes with the release's
datafiles, read at run time (data.downstream.split_class_names). Their `recipe` is the
release's run_cavmae_ft_*.sh as config overrides, applied by `finetune --dataset NAME` between
the preset and the command line's overrides (recipe_overrides); `recipe_pending` holds the
parts of the script this toolkit does not apply (yet), as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DatasetPreset:
    name: str
    task: str  # "classification" | "multilabel" | "regression"
    classes: tuple[str, ...] = ()  # classification / multi-label: names of labels 0..K-1
    dimensions: tuple[str, ...] = ()  # regression: names of the label columns
    folds: int = 1
    protocol: str = ""
    metrics: tuple[str, ...] = ("uar", "war")  # reported, the first selects the validation epoch
    subject: str | None = r"([^/]+)/[^/]+/?$"  # default: the directory above the clip's frame_dir
    paper: dict[str, float] = field(default_factory=dict)
    paper_model: str = "HiCMAE-B"
    num_classes: int = 0  # the class count where the names are not shipped (read from the csv)
    recipe: dict[str, Any] = field(default_factory=dict)  # config overrides: the authors' fine-tuning recipe
    recipe_pending: dict[str, Any] = field(default_factory=dict)  # the recipe's parts not applied, as data

    @property
    def num_outputs(self) -> int:
        return len(self.dimensions) if self.task == "regression" else len(self.classes) or self.num_classes


def _cavmae_recipe(
    lr: float, epochs: int, decay_start: int, head_lr: float, batch: int, balanced: bool, wa: tuple[int, int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(recipe, pending) of the release's run_cavmae_ft_*.sh. Its MultiStepLR halves the LR after
    each epoch from `decay_start` on (0-based epochs decay_start .. epochs-1 run at lr x 0.5^k).
    It passes --warmup True, which traintest_ft.py never reads: no warm-up. Its mixup 0.5 is
    the chance a clip is mixed, with lambda ~ Beta(10, 10), both modalities, labels mixed with
    that lambda: here finetune.mix_prob 0.5 and finetune.mixup (the Beta's alpha) 10, per batch
    (timm's mode: one lambda, the mirrored clip) where the release draws per clip and a random
    partner. Its batch is global (one process, DataParallel); data.batch_size is per rank."""
    recipe = {
        "train.optimizer": "adam",
        "train.base_lr": lr,
        "train.scale_lr": False,
        "train.betas": [0.95, 0.999],
        "train.weight_decay": 5.0e-7,
        "train.schedule": "step",
        "train.lr_gamma": 0.5,
        "data.batch_size": batch,
        "finetune.epochs": epochs,
        "finetune.warmup_epochs": 0,
        "finetune.lr_milestone_epochs": list(range(decay_start, epochs)),
        "finetune.layer_decay": 1.0,
        "finetune.head_lr_scale": head_lr,
        "finetune.mixup": 10.0,
        "finetune.mix_prob": 0.5,
        "finetune.cutmix": 0.0,
        "finetune.mix_video_only": False,
        "finetune.label_smoothing": 0.1,
        "finetune.balanced_sampling": balanced,
        "finetune.weight_average": [wa[0] - 1, wa[1] - 1],
    }  # the script's wa_start / wa_end count from 1
    pending = {"specaugment": {"freqm": 48, "timem": 192}}  # not in this toolkit's CAV-MAE pipeline
    return recipe, pending


_AS20K = _cavmae_recipe(5e-5, 15, 5, 100.0, 36, balanced=False, wa=(3, 15))  # run_cavmae_ft_bal.sh (bal=None)
_AS2M = _cavmae_recipe(1e-5, 10, 2, 50.0, 48, balanced=True, wa=(1, 10))  # run_cavmae_ft_full.sh
_VGG = _cavmae_recipe(1e-4, 10, 2, 10.0, 48, balanced=True, wa=(3, 10))  # egs/vggsound/run_cavmae_ft.sh


DATASETS = {
    p.name: p
    for p in (
        DatasetPreset(
            "mafw",
            "classification",
            (
                "anger",
                "disgust",
                "fear",
                "happiness",
                "neutral",
                "sadness",
                "surprise",
                "contempt",
                "anxiety",
                "helplessness",
                "disappointment",
            ),
            folds=5,
            protocol="5-fold (the dataset's splits)",
            subject=None,
            paper={"uar": 42.65, "war": 56.17},
        ),
        DatasetPreset(
            "dfew",
            "classification",
            ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
            folds=5,
            protocol="5-fold (the dataset's splits)",
            subject=None,
            paper={"war": 75.01},
        ),
        DatasetPreset(
            "mer-multi",
            "classification",
            ("neutral", "anger", "happiness", "sadness", "worry", "surprise"),
            folds=1,
            protocol="train / test (MER 2023)",
            metrics=("weighted_f1", "uar", "war"),
            subject=None,
        ),
        DatasetPreset(
            "crema-d",
            "classification",
            ("anger", "disgust", "fear", "happy", "neutral", "sad"),
            folds=5,
            protocol="5-fold subject-independent",
            subject=r"(?:^|/)(\d{4})_[A-Z]{3}_",
            paper={"uar": 84.91, "war": 84.89},
        ),
        DatasetPreset(
            "ravdess",
            "classification",
            ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"),
            folds=6,
            protocol="6-fold subject-independent",
            subject=r"(?:^|/)\d\d-\d\d-\d\d-\d\d-\d\d-\d\d-(\d\d)",
            paper={"war": 87.99},
        ),
        DatasetPreset(
            "msp-improv",
            "classification",
            ("angry", "happy", "neutral", "sad"),
            folds=6,
            protocol="leave-one-session-out (6 sessions)",
            subject=r"MSP-IMPROV-S\d\d[A-Z]-([MF]\d\d)",
            paper={"war": 74.95},
        ),
        DatasetPreset(
            "iemocap",
            "classification",
            ("neutral", "happy", "angry", "sad"),
            folds=5,
            protocol="leave-one-session-out (5 sessions)",
            subject=r"(Ses\d\d[MF])",
            paper={"war": 68.36},
        ),
        DatasetPreset(
            "werewolf-xl",
            "regression",
            dimensions=("arousal", "valence", "dominance"),
            folds=5,
            protocol="5-fold",
            metrics=("ccc", "pcc"),
            subject=None,
            paper={"ccc_valence": 64.81, "ccc_arousal": 31.85},
        ),
        DatasetPreset(
            "avcaffe-arousal",
            "classification",
            ("1", "2", "3", "4", "5"),
            folds=1,
            protocol="train / test (the dataset's split)",
            metrics=("weighted_f1", "uar", "war"),
        ),
        DatasetPreset(
            "avcaffe-valence",
            "classification",
            ("1", "2", "3", "4", "5"),
            folds=1,
            protocol="train / test (the dataset's split)",
            metrics=("weighted_f1", "uar", "war"),
        ),
        # CAV-MAE's downstream sets; figures: the CAV-MAE paper (Gong et al., ICLR 2023), Table 1,
        # audio-visual CAV-MAE (docs/models.md, CAV-MAE fine-tuning)
        DatasetPreset(
            "audioset-20k",
            "multilabel",
            num_classes=527,
            folds=1,
            protocol="AS-20K balanced train / AudioSet eval",
            metrics=("map", "auc"),
            subject=None,
            paper={"map": 42.0},
            paper_model="CAV-MAE",
            recipe=_AS20K[0],
            recipe_pending=_AS20K[1],
        ),
        DatasetPreset(
            "audioset-2m",
            "multilabel",
            num_classes=527,
            folds=1,
            protocol="AS-2M train / AudioSet eval",
            metrics=("map", "auc"),
            subject=None,
            paper={"map": 51.2},
            paper_model="CAV-MAE",
            recipe=_AS2M[0],
            recipe_pending=_AS2M[1],
        ),
        DatasetPreset(
            "vggsound",
            "classification",
            num_classes=309,
            folds=1,
            protocol="train / test",
            metrics=("war", "uar"),
            subject=None,
            paper={"war": 65.5},
            paper_model="CAV-MAE",
            recipe=_VGG[0],
            recipe_pending=_VGG[1],
        ),
    )
}


def get_dataset(name: str) -> DatasetPreset:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"dataset {name!r}: expected one of {', '.join(DATASETS)}") from None


def recipe_overrides(name: str, user_overrides: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The dataset's recipe as `key=value` overrides, leaving out the keys the user overrides
    (they win), and what was applied {key: value}."""
    import json

    mine = {o.split("=", 1)[0].strip() for o in user_overrides}
    applied = {k: v for k, v in get_dataset(name).recipe.items() if k not in mine}
    return [f"{k}={json.dumps(v)}" for k, v in applied.items()], applied


def format_datasets() -> str:
    rows = [f"{'name':<16} {'task':<14} {'outputs':>7} {'folds':>5}  {'metrics':<22} protocol"]
    for p in DATASETS.values():
        rows.append(
            f"{p.name:<16} {p.task:<14} {p.num_outputs:>7} {p.folds:>5}  {', '.join(p.metrics):<22} {p.protocol}"
        )
    return "\n".join(rows)
