"""Downstream (fine-tuning) data: face-frame folders plus 16 kHz wav, in the authors' annotation
format, with k-fold split files and the spec's fine-tuning sampling (docs/models.md, HiCMAE
fine-tuning recipe and CAV-MAE fine-tuning).

    /data/mafw/frames/00025 /data/mafw/audio/00025.wav 5        (frame_dir wav_path label...)

Also the CAV-MAE release's JSON datafiles (read_release_json) and multi-label lines. Split files:
<split_root>/split01/{train,val,test}.csv ..., one directory per fold; validation is a separate
subject group (make_folds), never the test fold. Train / val / test sampling for each family
(frames, crops, views, audio window); all randomness from (seed, epoch, index): call
set_epoch(e) each epoch. The formats and the sampling: docs/data.md, "Fine-tuning data".
"""

from __future__ import annotations

import functools
import json
import math
import random
import wave as wavmod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hicmae_dist.config import ConfigError, ModelConfig
from hicmae_dist.data import audio, video

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val", "test")
MODES = ("train", "val", "test")


RELEASE_FRAMES = 10  # frame_0 ... frame_9
LABEL_CSV = "class_labels_indices.csv"


@dataclass(frozen=True)
class DownstreamItem:
    frame_dir: Path  # the clip's frame folder; for the release's layout only its key
    wav_path: Path
    label: tuple  # ints (classification, multi-label) or floats (regression)
    frames: tuple[Path, ...] = ()  # the release's layout: the clip's frame files, else listed from frame_dir


def read_annotations(
    path: str | Path, *, root: str | Path | None = None, regression: bool | None = None
) -> list[DownstreamItem]:
    """Parse an annotation file (module docstring). regression None: floats if any label is not
    an integer."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3:
            raise ValueError(f"{path}:{n}: expected 'frame_dir wav_path label...', got {line!r}")
        rows.append((n, parts))
    if regression is None:
        regression = any(not _is_int(x) for _, parts in rows for x in parts[2:])
    items = []
    for n, parts in rows:
        try:
            label = tuple(float(x) for x in parts[2:]) if regression else tuple(int(x) for x in parts[2:])
        except ValueError:
            raise ValueError(f"{path}:{n}: labels must be numbers, got {parts[2:]}") from None
        items.append(DownstreamItem(_resolve(parts[0], base), _resolve(parts[1], base), label))
    return items


def read_label_csv(path: str | Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """class_labels_indices.csv (header index,mid,display_name) -> ({mid: index}, names in
    index order). The indices must be 0..K-1."""
    import csv

    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"index", "mid", "display_name"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a csv with the columns index,mid,display_name")
    try:
        index = {r["mid"]: int(r["index"]) for r in rows}
    except ValueError:
        raise ValueError(f"{path}: the index column must hold integers") from None
    if sorted(index.values()) != list(range(len(rows))):
        raise ValueError(f"{path}: expected the indices 0..{len(rows) - 1}, once each")
    names = [""] * len(rows)
    for r in rows:
        names[int(r["index"])] = r["display_name"]
    return index, tuple(names)


def read_release_json(path: str | Path, label_csv: str | Path) -> list[DownstreamItem]:
    """The release's datafile (module docstring) -> items whose label is the tuple of class
    indices. Checked here, naming the entry: its wav exists, every frame_i folder of its
    video_path exists, every label id is in the csv. (A missing single frame file is named
    when the clip is loaded: checking 10 files per clip here would cost minutes on AS-2M.)"""
    path = Path(path)
    index, _ = read_label_csv(label_csv)
    try:
        entries = json.loads(path.read_text())["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f'{path}: expected the release\'s datafile {{"data": [...]}} ({err})') from None
    checked: set[str] = set()  # video_path folders already seen
    items = []
    for n, e in enumerate(entries):
        where = f"{path}: entry {n} (video_id {e.get('video_id')!r})"
        missing_keys = [k for k in ("video_id", "wav", "video_path", "labels") if k not in e]
        if missing_keys:
            raise ValueError(f"{where}: missing {', '.join(missing_keys)}")
        wav = _resolve(e["wav"], path.parent)
        if not wav.is_file():
            raise FileNotFoundError(f"{where}: no wav at {wav}")
        video_path = _resolve(e["video_path"], path.parent)
        if str(video_path) not in checked:
            absent = [f"frame_{i}" for i in range(RELEASE_FRAMES) if not (video_path / f"frame_{i}").is_dir()]
            if absent:
                raise FileNotFoundError(
                    f"{where}: no frame folder {video_path}/{absent[0]} (expected "
                    f"frame_0 ... frame_{RELEASE_FRAMES - 1} holding <video_id>.jpg)"
                )
            checked.add(str(video_path))
        unknown = [m for m in e["labels"].split(",") if m not in index]
        if unknown:
            raise ValueError(f"{where}: label id {unknown[0]!r} is not in {label_csv}")
        labels = tuple(sorted({index[m] for m in e["labels"].split(",")}))
        frames = tuple(video_path / f"frame_{i}" / f"{e['video_id']}.jpg" for i in range(RELEASE_FRAMES))
        items.append(DownstreamItem(video_path / e["video_id"], wav, labels, frames))
    return items


def find_label_csv(split_file: Path, split_root: Path, explicit: str = "") -> Path:
    """The class csv of a release datafile: finetune.label_csv, else class_labels_indices.csv in
    the split's directory, else in split_root."""
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"finetune.label_csv: no file {explicit}")
        return Path(explicit)
    for d in (split_file.parent, split_root):
        if (d / LABEL_CSV).is_file():
            return d / LABEL_CSV
    raise FileNotFoundError(
        f"{split_file}: the release's datafiles need {LABEL_CSV} (index,mid,display_name): "
        f"put it in {split_file.parent} or {split_root}, or set finetune.label_csv"
    )


def read_split(
    path: Path, split_root: Path, *, regression: bool | None = None, label_csv: str = ""
) -> list[DownstreamItem]:
    """An annotation file (.csv) or the release's datafile (.json)."""
    if path.suffix != ".json":
        return read_annotations(path, regression=regression)
    return read_release_json(path, find_label_csv(path, split_root, label_csv))


def split_class_names(split_root: str | Path, fold: int, label_csv: str = "") -> tuple[str, ...]:
    """The display names of the fold's class csv (find_label_csv) when its splits are the
    release's JSON datafiles; () otherwise."""
    train = fold_files(split_root, fold)["train"]
    return read_label_csv(find_label_csv(train, Path(split_root), label_csv))[1] if train.suffix == ".json" else ()


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def _resolve(text: str, base: Path) -> Path:
    p = Path(text)
    return p if p.is_absolute() else base / p


def write_annotations(path: str | Path, items: list[DownstreamItem]) -> Path:
    """Write items in the annotation format (absolute paths, as the authors' files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in items:
        labels = " ".join(f"{x:.6g}" if isinstance(x, float) else str(x) for x in item.label)
        lines.append(f"{Path(item.frame_dir).resolve()} {Path(item.wav_path).resolve()} {labels}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_folds(items: list[DownstreamItem], subjects: list[str], k: int, seed: int = 0) -> list[dict]:
    """Subject-independent k folds: subjects dealt (shuffled with seed) into k groups; fold f
    tests on group f, validates on group f + 1 (mod k) and trains on the rest. Returns
    [{'train': [...], 'val': [...], 'test': [...]}, ...]."""
    if k < 3:
        raise ValueError(f"k-fold splits with separate val and test need k >= 3, got {k}")
    names = sorted(set(subjects))
    if len(names) < k:
        raise ValueError(f"{len(names)} subjects cannot make {k} subject-independent folds")
    random.Random(f"hicmae-dist/folds/{seed}").shuffle(names)
    group = {s: i % k for i, s in enumerate(names)}
    folds = []
    for f in range(k):
        split = {"train": [], "val": [], "test": []}
        for item, subject in zip(items, subjects):
            g = group[subject]
            split["test" if g == f else "val" if g == (f + 1) % k else "train"].append(item)
        folds.append(split)
    return folds


def write_folds(split_root: str | Path, folds: list[dict]) -> list[dict[str, Path]]:
    """split_root/split01/{train,val,test}.csv, ...; returns the paths per fold."""
    return [
        {name: write_annotations(Path(split_root) / f"split{f + 1:02d}" / f"{name}.csv", fold[name]) for name in SPLITS}
        for f, fold in enumerate(folds)
    ]


def fold_files(split_root: str | Path, fold: int) -> dict[str, Path]:
    """The split files of fold `fold` (1-based, as split01): train and test, and val when the
    fold has one; each <name>.csv (annotation format) or <name>.json (the release's), not both."""
    d = Path(split_root) / f"split{fold:02d}"
    files = {}
    for name in SPLITS:
        found = [d / f"{name}{ext}" for ext in (".csv", ".json") if (d / f"{name}{ext}").exists()]
        if len(found) > 1:
            raise ValueError(f"fold {fold}: both {found[0]} and {found[1]}; keep one")
        if found:
            files[name] = found[0]
    missing = [f"{d}/{name}.csv" for name in ("train", "test") if name not in files]
    if missing:
        raise FileNotFoundError(
            f"fold {fold}: missing {', '.join(missing)} (expected {d}/{{train,val,test}}.csv or .json, val optional)"
        )
    return files


DEFAULT_SUBJECT = r"([^/]+)/[^/]+/?$"  # the directory above the clip's frame_dir


def subject_of(item: DownstreamItem, pattern: str | None = DEFAULT_SUBJECT) -> str | None:
    """The subject id of a clip: the first group of `pattern` searched in its frame_dir path;
    None when pattern is None or does not match."""
    import re

    if pattern is None:
        return None
    m = re.search(pattern, Path(item.frame_dir).as_posix())
    return m.group(1) if m else None


def carve_validation(
    train: list[DownstreamItem], fraction: float, *, subject: str | None = DEFAULT_SUBJECT, seed: int = 0
) -> tuple[list[DownstreamItem], list[DownstreamItem], str]:
    """Split training clips into (train, val, how): whole subjects go to val (about `fraction`
    of them, at least one, never all) when every clip has a subject id, else clips. Seeded and
    independent of the file order."""
    subjects = [subject_of(item, subject) for item in train]
    by_subject = all(s is not None for s in subjects) and len(set(subjects)) >= 2
    keys = subjects if by_subject else [str(item.frame_dir) for item in train]
    names = sorted(set(keys))
    if len(names) < 2:
        raise ValueError(f"cannot carve a validation split from {len(train)} training clip(s)")
    random.Random(f"hicmae-dist/val/{seed}").shuffle(names)
    chosen = set(names[: min(len(names) - 1, max(1, round(fraction * len(names))))])
    val = [item for item, k in zip(train, keys) if k in chosen]
    rest = [item for item, k in zip(train, keys) if k not in chosen]
    how = f"{len(chosen)} of {len(names)} training {'subjects' if by_subject else 'clips'}"
    return rest, val, how


def check_disjoint(splits: dict[str, list[DownstreamItem]], files: dict[str, Path] | None = None) -> None:
    """No clip (frame_dir) in two splits: model selection must never see the test clips."""
    owner: dict[str, str] = {}
    for name, items in splits.items():
        for item in items:
            key = str(Path(item.frame_dir).resolve())
            if key in owner and owner[key] != name:
                where = (
                    f" ({files[owner[key]]} and {files[name]})"
                    if files and name in files and owner[key] in files
                    else ""
                )
                hint = (
                    (
                        " - selecting the epoch on the test fold is what this toolkit refuses; remove val.csv to "
                        "carve a validation split from training"
                    )
                    if {owner[key], name} == {"val", "test"}
                    else ""
                )
                raise ValueError(f"clip {key} is in both the {owner[key]} and the {name} split{where}{hint}")
            owner[key] = name


def load_fold(
    split_root: str | Path,
    fold: int,
    *,
    regression: bool | None = None,
    val_fraction: float = 0.15,
    subject: str | None = DEFAULT_SUBJECT,
    seed: int = 0,
    label_csv: str = "",
) -> tuple[dict[str, list[DownstreamItem]], str]:
    """The train / val / test clips of fold `fold` (1-based): val.csv (.json) when the fold has
    one, else carved from train (carve_validation); checked disjoint. Returns (splits, how val
    was made)."""
    files = fold_files(split_root, fold)
    read = functools.partial(read_split, split_root=Path(split_root), regression=regression, label_csv=label_csv)
    splits = {name: read(files[name]) for name in ("train", "test")}
    if "val" in files:
        splits["val"] = read(files["val"])
        how = f"{files['val']}"
    else:
        splits["train"], splits["val"], how = carve_validation(
            splits["train"], val_fraction, subject=subject, seed=seed
        )
        how = f"carved from training: {how}"
    for name, items in splits.items():
        if not items:
            raise ValueError(f"fold {fold}: the {name} split is empty ({files[name]})")
    check_disjoint(splits, files)
    return splits, how


def parse_folds(text: str, available: int | None = None) -> list[int]:
    """'1-5', '1,3', '2' or 'all' (needs `available`) -> [1, 2, ...]."""
    if text == "all":
        if not available:
            raise ValueError("--folds all: the number of folds is unknown (no split directories found)")
        return list(range(1, available + 1))
    folds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            folds += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"--folds {text!r}: expected e.g. 1-5, 1,3 or all") from None
    if not folds or min(folds) < 1:
        raise ValueError(f"--folds {text!r}: folds are numbered from 1")
    return sorted(set(folds))


def count_folds(split_root: str | Path) -> int:
    return len(list(Path(split_root).glob("split[0-9][0-9]")))


def select_folds(text: str, split_root: str | Path) -> list[int]:
    """--folds against the split directories of split_root; a bad spelling is a ConfigError (a usage error)."""
    try:
        return parse_folds(text, count_folds(split_root))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def list_frames(frame_dir: Path) -> list[Path]:
    frames = sorted(p for p in Path(frame_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} frames in {frame_dir}")
    return frames


def read_wav(path: Path) -> torch.Tensor:
    """(S,) float32 mono at 16 kHz in [-1, 1): int16 PCM wavs directly, others via torchcodec."""
    try:
        with wavmod.open(str(path), "rb") as w:
            if w.getsampwidth() == 2 and w.getframerate() == audio.SAMPLE_RATE:
                pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
                return torch.from_numpy(pcm.astype(np.float32).mean(axis=1) / 32768.0)
    except (wavmod.Error, EOFError):
        pass
    from torchcodec.decoders import AudioDecoder

    return AudioDecoder(path, sample_rate=audio.SAMPLE_RATE, num_channels=1).get_all_samples().data[0]


def videomae_indices(n: int, clip_len: int, stride: int, rng: random.Random | None) -> list[int]:
    """VideoMAE's fine-tuning frame indices (loadvideo_decord, one segment): rng None takes the
    centre span instead of a random one."""
    span = clip_len * stride
    if n <= span:
        index = np.linspace(0, n, num=n // stride)
        index = np.concatenate((index, np.ones(clip_len - n // stride) * n))
        return np.clip(index, 0, n - 1).astype(np.int64).tolist()
    end = rng.randrange(span, n) if rng is not None else (span + n) // 2
    start = end - span
    return np.clip(np.linspace(start, end, num=clip_len), start, end - 1).astype(np.int64).tolist()


def test_views(n: int, clip_len: int, stride: int, segments: int) -> list[list[int]]:
    """The temporal chunks of VideoMAE's test sampling: frames every stride, padded to clip_len
    with the last, chunk c from int(c * (len - clip_len) / (segments - 1))."""
    all_index = list(range(0, n, stride))
    while len(all_index) < clip_len:
        all_index.append(all_index[-1])
    step = max((len(all_index) - clip_len) / (segments - 1), 0) if segments > 1 else 0
    return [all_index[int(c * step) : int(c * step) + clip_len] for c in range(segments)]


def random_resized_box(
    width: int, height: int, rng: random.Random, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, w, h): 10 tries, then the centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def short_side_box(width: int, height: int, size: int, position: float = 0.5) -> tuple[float, float, float, float]:
    """(left, top, w, h) in source pixels of a size x size crop after resizing the short side to
    size; position in [0, 1] slides it along the long side (0.5: centre)."""
    side = min(width, height)
    scale = side / size
    room = max(width, height) / scale - size  # free pixels along the long side, after the resize
    offset = (int(round(room / 2)) if position == 0.5 else int(position * room)) * scale  # CenterCrop / VideoMAE
    return (offset, 0.0, float(side), float(side)) if width >= height else (0.0, offset, float(side), float(side))


def load_crop(
    path: Path, box: tuple[float, float, float, float], size: int, *, flip: bool = False, resample=Image.BILINEAR
) -> np.ndarray:
    """Decode one image and return the box (left, top, w, h in source pixels) resized to
    size x size, (size, size, 3) uint8. JPEGs are decoded at a reduced DCT scale when the box
    is at least twice the output (PIL draft)."""
    with Image.open(path) as img:
        full_w, full_h = img.size
        left, top, w, h = box
        reduce = min(w, h) / size
        if img.format == "JPEG" and reduce >= 2:
            img.draft("RGB", (math.ceil(full_w / reduce), math.ceil(full_h / reduce)))
        img = img.convert("RGB")
        sx, sy = img.size[0] / full_w, img.size[1] / full_h
        return crop_resize(
            img, (left * sx, top * sy, (left + w) * sx, (top + h) * sy), size, flip=flip, resample=resample
        )


def crop_resize(
    img: Image.Image, box: tuple[float, float, float, float], size: int, *, flip: bool = False, resample=Image.BILINEAR
) -> np.ndarray:
    """The corners (left, top, right, bottom in img's pixels) of an RGB image resized to
    size x size, (size, size, 3) uint8; infer crops decoded video frames with it too."""
    out = img.resize((size, size), resample, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.array(out)  # writable (torch.from_numpy wants it)


class DownstreamDataset(Dataset):
    """Fine-tuning samples for model_cfg.arch (module docstring). Items: video, audio, label
    (int64 scalar, float32 regression vector, or with multi_hot=K a (K,) float32 multi-hot
    vector of the clip's classes), index, key (the frame directory)."""

    def __init__(
        self,
        annotation: str | Path | list[DownstreamItem],
        model_cfg: ModelConfig,
        mode: str = "train",
        *,
        root: str | Path | None = None,
        regression: bool | None = None,
        frame_stride: int = 4,
        test_num_segment: int = 2,
        test_num_crop: int = 2,
        fps: float = video.FPS,
        seed: int = 0,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        multi_hot: int = 0,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.items = (
            annotation
            if isinstance(annotation, list)
            else read_annotations(annotation, root=root, regression=regression)
        )
        if not self.items:
            raise ValueError(f"no clips in {annotation}")
        self.cfg, self.mode = model_cfg, mode
        self.frame_stride, self.fps, self.seed = frame_stride, fps, seed
        self.test_num_segment, self.test_num_crop = test_num_segment, test_num_crop
        self.crop_scale, self.multi_hot = crop_scale, multi_hot
        self.regression = isinstance(self.items[0].label[0], float)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_views(self) -> int:
        if self.mode != "test":
            return 1
        return 10 if self.cfg.arch == "cavmae" else self.test_num_segment * self.test_num_crop

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        rng = random.Random(f"hicmae-dist/finetune/{self.seed}/{self.epoch}/{index}")
        frames = list(item.frames) or list_frames(item.frame_dir)
        wave = read_wav(item.wav_path)
        if self.cfg.arch == "cavmae":
            vid, aud = self._cavmae(frames, wave, rng)
        else:
            vid, aud = self._hicmae(frames, wave, rng)
        if self.mode != "test":
            vid, aud = vid[0], aud[0]
        if self.multi_hot:
            label = torch.zeros(self.multi_hot).index_fill_(0, torch.tensor(item.label), 1.0)
        elif self.regression:
            label = torch.tensor(item.label, dtype=torch.float32)
        else:
            label = torch.tensor(item.label[0], dtype=torch.int64)
        return {"video": vid, "audio": aud, "label": label, "index": index, "key": str(item.frame_dir)}

    # --- HiCMAE -----------------------------------------------------------------------------------

    def _hicmae(self, frames: list[Path], wave: torch.Tensor, rng: random.Random):
        m, n, size = self.cfg, len(frames), self.cfg.image_size
        with Image.open(frames[0]) as first:
            width, height = first.size
        views = []  # (frame indices, crop box in source pixels, flip)
        if self.mode == "train":
            box = random_resized_box(width, height, rng, scale=self.crop_scale)
            views.append((videomae_indices(n, m.num_frames, self.frame_stride, rng), box, rng.random() < 0.5))
        elif self.mode == "val":
            views.append(
                (videomae_indices(n, m.num_frames, self.frame_stride, None), short_side_box(width, height, size), False)
            )
        else:
            crops = [k / (self.test_num_crop - 1) if self.test_num_crop > 1 else 0.5 for k in range(self.test_num_crop)]
            for chunk in test_views(n, m.num_frames, self.frame_stride, self.test_num_segment):
                views += [(chunk, short_side_box(width, height, size, pos), False) for pos in crops]
        out_v = torch.empty(len(views), 3, m.num_frames, size, size)
        out_a = torch.empty(len(views), 1, m.audio_frames, m.mel_bins)
        length = round(m.num_frames * self.frame_stride / self.fps * audio.SAMPLE_RATE)  # 2.56 s
        for v, (indices, box, flip) in enumerate(views):
            pixels = np.stack([load_crop(frames[i], box, size, flip=flip) for i in indices])
            video.frames_into(out_v[v], torch.from_numpy(pixels), None)
            first = round(indices[0] / n * wave.shape[0])
            window = wave[first : first + length]
            if window.shape[0] < audio.FRAME_SAMPLES:  # the last frames of a clip whose wav is short
                window = wave[-length:]
            audio.fbank_into(out_a[v, 0], window)
        return out_v, out_a

    # --- CAV-MAE ----------------------------------------------------------------------------------

    def _cavmae(self, frames: list[Path], wave: torch.Tensor, rng: random.Random):
        m, size = self.cfg, self.cfg.image_size
        ten = video.cavmae_frame_indices(len(frames), self.fps)
        if self.mode == "train":
            picks = [ten[rng.randrange(10)]]
        elif self.mode == "val":
            picks = [len(frames) // 2]
        else:
            picks = ten
        out_v = torch.empty(len(picks), 3, size, size)
        for v, i in enumerate(picks):
            with Image.open(frames[i]) as img:
                width, height = img.size
            pixels = load_crop(frames[i], short_side_box(width, height, size), size, resample=Image.BICUBIC)
            video.image_into(out_v[v], torch.from_numpy(pixels))
        feats = audio.cavmae_fbank_into(torch.empty(m.audio_frames, m.mel_bins), wave)
        if self.mode == "train":
            audio.cavmae_augment_(feats, rng, torch.Generator().manual_seed(rng.getrandbits(63)))
        out_a = feats.expand(len(picks), 1, *feats.shape).clone()
        return out_v, out_a


def make_finetune_loader(
    annotation: str | Path | list[DownstreamItem],
    model_cfg: ModelConfig,
    mode: str = "train",
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool | None = None,
    **dataset_kw,
) -> DataLoader:
    """A DataLoader over DownstreamDataset: shuffled (seeded) with whole batches in train, in
    order with every clip in val and test. dataset.set_epoch(e) before each epoch reseeds the
    augmentation; the shuffle order follows the DataLoader's generator."""
    dataset = DownstreamDataset(annotation, model_cfg, mode, seed=seed, **dataset_kw)
    train = mode == "train"
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        num_workers=num_workers,
        drop_last=train if drop_last is None else drop_last,
        generator=torch.Generator().manual_seed(seed) if train else None,
        pin_memory=torch.cuda.is_available(),
    )
