"""The paper's downstream datasets (SPEC.md 1, 'Downstream datasets and metrics'): what a user
needs to point `hicmae-dist finetune --dataset NAME --splits DIR` at their own copy.

Labels in the annotation files are the integers 0..K-1 in the order of `classes` (the names
are for tables and confusion matrices); regression sets list one float column per dimension.
`folds` is the protocol's number of split directories (split01 ...; leave-one-session-out
sets have one per session). `subject` is a regular expression whose first group, searched in a
clip's frame_dir, names its subject (actor or speaker): it carves a subject-independent
validation split from training when a fold has no val.csv. None: the set has no subject ids
(in-the-wild clips), the validation split is carved by clip. `paper` holds HiCMAE-B's reported
test figures (percent) for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetPreset:
    name: str
    task: str  # "classification" | "regression"
    classes: tuple[str, ...] = ()  # classification: names of labels 0..K-1
    dimensions: tuple[str, ...] = ()  # regression: names of the label columns
    folds: int = 1
    protocol: str = ""
    metrics: tuple[str, ...] = ("uar", "war")  # reported, the first selects the validation epoch
    subject: str | None = r"([^/]+)/[^/]+/?$"  # default: the directory above the clip's frame_dir
    paper: dict[str, float] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else len(self.dimensions)


DATASETS = {p.name: p for p in (
    DatasetPreset("mafw", "classification",
                  ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise", "contempt",
                   "anxiety", "helplessness", "disappointment"),
                  folds=5, protocol="5-fold (the dataset's splits)", subject=None,
                  paper={"uar": 42.65, "war": 56.17}),
    DatasetPreset("dfew", "classification",
                  ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
                  folds=5, protocol="5-fold (the dataset's splits)", subject=None, paper={"war": 75.01}),
    DatasetPreset("mer-multi", "classification",
                  ("neutral", "anger", "happiness", "sadness", "worry", "surprise"),
                  folds=1, protocol="train / test (MER 2023)", metrics=("weighted_f1", "uar", "war"),
                  subject=None),
    DatasetPreset("crema-d", "classification", ("anger", "disgust", "fear", "happy", "neutral", "sad"),
                  folds=5, protocol="5-fold subject-independent", subject=r"(?:^|/)(\d{4})_[A-Z]{3}_",
                  paper={"uar": 84.91, "war": 84.89}),
    DatasetPreset("ravdess", "classification",
                  ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"),
                  folds=6, protocol="6-fold subject-independent",
                  subject=r"(?:^|/)\d\d-\d\d-\d\d-\d\d-\d\d-\d\d-(\d\d)", paper={"war": 87.99}),
    DatasetPreset("msp-improv", "classification", ("angry", "happy", "neutral", "sad"),
                  folds=6, protocol="leave-one-session-out (6 sessions)", subject=r"MSP-IMPROV-S\d\d[A-Z]-([MF]\d\d)",
                  paper={"war": 74.95}),
    DatasetPreset("iemocap", "classification", ("neutral", "happy", "angry", "sad"),
                  folds=5, protocol="leave-one-session-out (5 sessions)", subject=r"(Ses\d\d[MF])",
                  paper={"war": 68.36}),
    DatasetPreset("werewolf-xl", "regression", dimensions=("arousal", "valence", "dominance"),
                  folds=5, protocol="5-fold", metrics=("ccc", "pcc"), subject=None,
                  paper={"ccc_valence": 64.81, "ccc_arousal": 31.85}),
    DatasetPreset("avcaffe-arousal", "classification", ("1", "2", "3", "4", "5"),
                  folds=1, protocol="train / test (the dataset's split)", metrics=("weighted_f1", "uar", "war")),
    DatasetPreset("avcaffe-valence", "classification", ("1", "2", "3", "4", "5"),
                  folds=1, protocol="train / test (the dataset's split)", metrics=("weighted_f1", "uar", "war")),
)}


def get_dataset(name: str) -> DatasetPreset:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"dataset {name!r}: expected one of {', '.join(DATASETS)}") from None


def format_datasets() -> str:
    rows = [f"{'name':<16} {'task':<14} {'outputs':>7} {'folds':>5}  {'metrics':<22} protocol"]
    for p in DATASETS.values():
        rows.append(f"{p.name:<16} {p.task:<14} {p.num_outputs:>7} {p.folds:>5}  {', '.join(p.metrics):<22} {p.protocol}")
    return "\n".join(rows)
