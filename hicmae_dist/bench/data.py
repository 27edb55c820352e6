"""`hicmae-dist bench data`: clips per CPU core, against the authors' data path, and the CPU
cores a GPU needs.

On a synthetic corpus written for the purpose (real mp4/m4a files, 25 fps H.264, GOP 50), one
run measures, all on one thread per process:
  - prepare: clips/s with 1, 2 and N threads, per stored form;
  - release (the anchor): the authors' per-sample work. HiCMAE (release_clip): open the mp4,
    decode its 16 frames at stride 4, crop, resize, normalise, read the wav window, fbank, masks.
    CAV-MAE (release_cavmae_clip): one of 10 pre-extracted JPEG frames, the whole wav, fbank,
    noise and roll. CPU time in the main process gives clips per CPU-second;
  - the loader, per video path (today's float batches, the uint8 ones) and stored audio form:
    clips per CPU-second in the main process (workers=0: one core's work) and clips/s with 1, 2
    and N DataLoader workers (wall clock; per worker = clips/s / workers);
  - device: the uint8 -> normalised float step that moves out of the workers, clips/s on the
    CPU and, where present, on CUDA;
  - profile: CPU ms per clip of each stage of one core's work, per path;
  - capacity: CPU cores per H100 to feed each model at 40% of the H100's dense bf16 peak
    (capacity_table states the formula);
  - goal: HiCMAE clips per CPU-second against 300 and against 13x the release.
Wall-clock rates depend on what else the machine runs (the report prints the load average);
CPU-time rates much less.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import tempfile
import time
import wave
from pathlib import Path

import torch

from hicmae_dist.bench.report import machine, md_table
from hicmae_dist.bench.timing import Stopwatch, time_calls, torch_threads
from hicmae_dist.config import DataConfig, ModelConfig, load_config

GOAL_CLIPS_PER_CORE = 300  # HiCMAE inputs per CPU-second (issue #16)
GOAL_VS_RELEASE = 13  # ... and that many times the release's clips per CPU-second
H100_BF16_DENSE_TFLOPS = 989.4  # H100 SXM datasheet, dense bf16 (no sparsity)
TARGET_MFU = 0.4  # the training rate a GPU is fed for: 40% of that peak
CAPACITY_MODELS = ("hicmae-s", "hicmae-b", "cavmae-base")
ARCH_PRESETS = {"hicmae": "hicmae-b-vox2", "cavmae": "cavmae-base-vox2"}  # the inputs are the same for every size
# today's float batches; the uint8 ones normalised on the device; "jpeg": the workers' side of
# data.decode_on=cuda (they slice JPEG bytes, the GPU decodes), measurable on the CPU alone
LOADER_PATHS = ("float", "uint8", "jpeg")
AUDIO_FORMS = ("wave", "fbank")  # the stored audio forms (prepare --audio-form)
GOAL_PATH = "uint8, fbank"  # the goal's path: uint8 batches from shards with the stored fbank
GPU_DECODE_PATH = "jpeg, fbank"  # beside it: the same with decode_on=cuda (no JPEG decode in the workers)
FLOAT_STAGES = (
    "read tar",
    "json",
    "jpeg decode",
    "crop+resize+normalise",
    "fbank+augment",
    "masks",
    "new batch memory",
)
UINT8_STAGES = ("read tar", "json", "jpeg decode", "crop+resize", "fbank+augment", "masks")  # normalise: device row
RELEASE_STAGES = ("open mp4", "decode frames", "crop+resize+normalise", "read wav", "fbank", "masks")
CAVMAE_RELEASE_STAGES = ("read jpeg", "jpeg decode", "normalise", "read wav", "fbank+augment")


def bench_data(
    *,
    quick: bool = False,
    workers: list[int] | None = None,
    work_dir: str | Path | None = None,
    clips: int | None = None,
    batches: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
) -> dict:
    """Run the benchmark (module docstring); returns the results (format_table renders them)."""
    from hicmae_dist.data.synth import write_corpus

    ncpu = os.cpu_count() or 1
    workers = sorted(set(workers or ([1, 2] if quick else [1, 2, ncpu])))
    clips = clips or (8 if quick else 48)
    batches = batches or (4 if quick else 12)
    batch_size = batch_size or (4 if quick else 8)
    samples = 6 if quick else 24  # clips per profile / release measurement
    owned = work_dir is None
    root = Path(work_dir or tempfile.mkdtemp(prefix="hicmae-bench-data-"))
    result: dict = {
        "quick": quick,
        "cpus": ncpu,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(torch.device("cpu")),
        "clips": clips,
        "batch_size": batch_size,
        "batches": batches,
        "workers": workers,
    }
    try:
        with torch_threads(1):
            corpus = root / "corpus"
            if not (corpus / "labels.csv").exists():
                write_corpus(corpus, clips, num_classes=4, seed=seed, workers=ncpu, progress=False)
            result["prepare"], stores = _bench_prepare(corpus, root, workers)
            models = {arch: load_config(preset).model for arch, preset in ARCH_PRESETS.items()}
            result["loader"], result["profile"] = [], {}
            for arch, m in models.items():  # the release's row, then the loader's
                release = release_profile(list(release_inputs(corpus, root, arch).values()), m, samples, seed)
                result["profile"][arch] = {"release": release}
                result["loader"].append(_release_row(arch, release))
                result["loader"] += [
                    _loader_row(arch, stores[arch, form], m, path, form, w, batch_size, batches, seed)
                    for path, form, w in _loader_settings(workers)
                ]
            result["device"] = _device_rows(models, batch_size, repeats=3 if quick else 7)
            for arch, m in models.items():
                for path, form in (("float", "wave"), ("uint8", "wave"), ("uint8", "fbank")):
                    label = path if form == "wave" else f"{path}, {form}"
                    result["profile"][arch][label] = profile_decode(stores[arch, form], m, path, samples)
        result["capacity"] = capacity_table(per_core_rates(result["loader"]))
        result["goal"] = _goal(result)
        return result
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)


# --- prepare --------------------------------------------------------------------------------------


def _prepare_options(arch: str, form: str) -> dict:
    """prepare_shards keywords of an (arch, audio form)'s stored form."""
    options = {"full_frame": True, "frames": "ten"} if arch == "cavmae" else {}
    options["audio_form"] = form
    return options


def _bench_prepare(corpus: Path, root: Path, workers: list[int]) -> tuple[list[dict], dict[tuple, Path]]:
    """Time `prepare` into HiCMAE's form with each worker count, then every other (arch, audio
    form) with the most: (rows, {(arch, form): a shard directory of that form})."""
    from hicmae_dist.data.prepare import prepare_shards

    labels = {"hicmae": "hicmae: stride 4, 160px", "cavmae": "cavmae: ten frames, 224px"}
    forms = [("hicmae", "wave", w) for w in workers]
    forms += [
        (arch, form, max(workers))
        for arch in ARCH_PRESETS
        for form in AUDIO_FORMS
        if (arch, form) != ("hicmae", "wave")
    ]
    rows, stores = [], {}
    for arch, form, w in forms:
        out = root / f"shards-{arch}-{form}-w{w}"
        shutil.rmtree(out, ignore_errors=True)
        with Stopwatch() as took:
            manifest = prepare_shards(
                corpus, out, shard_size="1MB", workers=w, progress=False, **_prepare_options(arch, form)
            )
        rows.append(_prepare_row(f"{labels[arch]}, {form} audio", w, manifest, took.wall, took.cpu))
        stores.setdefault((arch, form), out)
    return rows, stores


def _prepare_row(form: str, workers: int, manifest: dict, wall: float, cpu: float) -> dict:
    n = manifest["last_run"]["clips_done"]
    return {
        "form": form,
        "workers": workers,
        "clips": n,
        "clips_per_s": round(n / wall, 2),
        "clips_per_s_per_worker": round(n / wall / workers, 2),
        "clips_per_cpu_s": round(n / cpu, 2) if cpu > 0 else None,
        "bytes_per_clip": manifest["bytes_per_clip"],
    }


# --- the release's data path ------------------------------------------------------------------------


def release_inputs(corpus: Path, root: Path, arch: str) -> dict[str, tuple]:
    """{key: the files the release reads per clip}: HiCMAE (mp4, wav), CAV-MAE (its 10 frames'
    JPEGs, wav). Both releases read 16 kHz wavs and CAV-MAE's JPEG frames extracted beforehand
    (their preprocessing, not timed); this writes them under root, from prepare's decoders."""
    wavs = release_wavs(corpus, root / "release-wav")
    if arch == "hicmae":
        return wavs
    return {key: (_release_frames(mp4, root / "release-frames" / key), wav) for key, (mp4, wav) in wavs.items()}


def _release_frames(mp4: Path, out: Path) -> list[Path]:
    """CAV-MAE's 10 frames of a clip as JPEG files (quality 95, OpenCV's default, as its
    extract_video_frame.py writes them)."""
    from torchcodec.decoders import VideoDecoder

    from hicmae_dist.data import video

    paths = [out / f"frame_{i}.jpg" for i in range(10)]
    if not all(p.exists() for p in paths):
        decoder = VideoDecoder(str(mp4), dimension_order="NCHW")
        frames = decoder.get_frames_at(video.cavmae_frame_indices(len(decoder), decoder.metadata.average_fps)).data
        blob, sizes = video.encode_jpegs(frames, quality=95)
        out.mkdir(parents=True, exist_ok=True)
        for path, end, size in zip(paths, itertools.accumulate(sizes), sizes):
            path.write_bytes(blob[end - size : end])
    return paths


def release_wavs(corpus: Path, out: Path) -> dict[str, tuple[Path, Path]]:
    """{key: (mp4, wav)}: the clips' audio as 16 kHz wavs (out/<key>.wav), from the same decode as
    prepare's."""
    from torchcodec.decoders import AudioDecoder

    from hicmae_dist.data import audio
    from hicmae_dist.data.prepare import find_clips

    pairs = {}
    for clip in find_clips(corpus):
        wav = out / f"{clip.key}.wav"
        if not wav.exists():
            samples = AudioDecoder(clip.audio_path, sample_rate=audio.SAMPLE_RATE, num_channels=1).get_all_samples()
            wav.parent.mkdir(parents=True, exist_ok=True)
            with wave.open(str(wav), "wb") as f:
                f.setnchannels(1), f.setsampwidth(2), f.setframerate(audio.SAMPLE_RATE)
                f.writeframes(audio.to_pcm16(samples.data))
        pairs[clip.key] = (clip.video_path, wav)
    return pairs


def release_clip(
    mp4: Path,
    wav: Path,
    m: ModelConfig,
    rng: random.Random,
    start: int | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """One clip as the HiCMAE release's pretraining dataset makes it, with our functions for the
    shared parts: (video (3, 16, S, S), audio (1, 256, 128), the CPU clock before and after each
    of RELEASE_STAGES).

    The release, per sample: decord.VideoReader(mp4, num_threads=1) (opens and indexes the file);
    a random start, frames start + 4 i (i < 16), decoded with get_batch (from the keyframe before
    them, every frame: H.264); rows 0:160, columns 32:192, one PIL image per frame;
    GroupMultiScaleCrop (PIL crop + bilinear resize), /255, ImageNet normalisation; tube mask; the
    audio from the start frame's timestamp to the end of frame min(start + 64, n - 1) (2.6 s,
    41600 samples) read from a 16 kHz wav with torchaudio.load(frame_offset, num_frames); minus its
    mean, Kaldi fbank, cut or padded to 256 frames, (x - mean) / (2 std); random audio mask. No
    gain or roll (roll_mag_aug is off by default).
    Here: torchcodec's VideoDecoder (one ffmpeg thread, exact seek mode: a packet scan, as decord
    indexes) and our crop/resize/normalise (frames_into), fbank and masks. The wav window is read
    with the wave module (a seek and a read, as torchaudio's soundfile backend of the release's
    day did; torchaudio 2.11's load goes through an ffmpeg open, ~8 ms here, which would flatter
    every comparison with the release).
    """
    from torchcodec.decoders import VideoDecoder

    from hicmae_dist.data import audio, video
    from hicmae_dist.masking import random_mask, tube_mask

    span = m.num_frames * video.FRAME_STRIDE  # 64 source frames
    ticks = [time.process_time()]
    decoder = VideoDecoder(str(mp4), dimension_order="NHWC", num_ffmpeg_threads=1)
    n, fps = len(decoder), decoder.metadata.average_fps
    ticks.append(time.process_time())
    start = rng.randrange(n - span + 1) if start is None else start
    frames = decoder.get_frames_at(list(range(start, start + span, video.FRAME_STRIDE))).data  # (16, 224, 224, 3)
    ticks.append(time.process_time())
    box = video.multiscale_crop_box(m.image_size, rng) if box is None else box
    out_v = torch.empty(3, m.num_frames, m.image_size, m.image_size)
    video.frames_into(out_v, frames, box, video.face_box(frames.shape[2], m.image_size))
    ticks.append(time.process_time())
    end = min(start + span, n - 1) + 1  # the end of the frame after the window (decord's timestamps)
    first = int(start / fps * audio.SAMPLE_RATE)
    wave_ = _read_wav(wav, first, int((end - start) / fps * audio.SAMPLE_RATE))  # (1, 41600)
    ticks.append(time.process_time())
    out_a = torch.empty(1, m.audio_frames, m.mel_bins)
    audio.fbank_into(out_a[0], wave_[0])
    ticks.append(time.process_time())
    tube_mask(m.num_frames // m.tubelet, (m.image_size // m.patch) ** 2, m.video_mask_ratio)
    random_mask((m.audio_frames // m.patch) * (m.mel_bins // m.patch), m.audio_mask_ratio)
    ticks.append(time.process_time())
    return out_v, out_a, ticks


def _read_wav(path: Path, first: int, count: int) -> torch.Tensor:
    """Samples [first, first + count) of a 16-bit mono wav -> (1, <= count) float32 in [-1, 1)."""
    from hicmae_dist.data import audio

    with wave.open(str(path), "rb") as f:
        if (f.getnchannels(), f.getsampwidth()) != (1, 2):
            raise ValueError(
                f"{path}: expected 16-bit mono, got {f.getnchannels()} channels of {8 * f.getsampwidth()} bits"
            )
        f.setpos(min(first, f.getnframes()))
        return audio.from_pcm16(f.readframes(count))


def release_cavmae_clip(
    frames: list[Path], wav: Path, m: ModelConfig, rng: random.Random, pick: int | None = None, noise: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """One clip as the CAV-MAE release's training dataset makes it, with our functions for the
    shared parts: (video (3, 224, 224), audio (1, 1024, 128), the CPU clock before and after each
    of CAVMAE_RELEASE_STAGES).

    The release, per sample: frame_{random 0..9}/<id>.jpg opened with PIL, Resize(224, bicubic) and
    CenterCrop(224) (the identity on 224 px frames), ToTensor, ImageNet normalisation;
    torchaudio.load of the whole wav, minus its mean, Kaldi fbank cut or padded to 1024 frames,
    (x + 5.081) / 4.4849, then (its `noise` switch) U*U/10 noise and a roll in [-1024, 1024). Its
    masks are drawn on the GPU, inside the model. Here: our JPEG decode, image_into, wave-module
    read (see release_clip), cavmae_fbank_into and cavmae_augment_.
    """
    from hicmae_dist.data import audio, video

    ticks = [time.process_time()]
    data = frames[rng.randrange(len(frames)) if pick is None else pick].read_bytes()
    ticks.append(time.process_time())
    frame = video.decode_frames_hwc(data, [len(data)], [0])[0]  # (224, 224, 3)
    ticks.append(time.process_time())
    out_v = video.image_into(torch.empty(3, m.image_size, m.image_size), frame)
    ticks.append(time.process_time())
    wave_ = _read_wav(wav, 0, 1 << 30)  # (1, S): the whole clip
    ticks.append(time.process_time())
    out_a = torch.empty(1, m.audio_frames, m.mel_bins)
    feats = audio.cavmae_fbank_into(out_a[0], wave_[0])
    if noise:
        audio.cavmae_augment_(feats, rng, torch.Generator().manual_seed(rng.randrange(1 << 31)))
    ticks.append(time.process_time())
    return out_v, out_a, ticks


def release_profile(inputs: list[tuple], m: ModelConfig, samples: int, seed: int) -> dict:
    """CPU ms per clip of each stage of the release's per-sample work (release_clip for HiCMAE,
    release_cavmae_clip for CAV-MAE) over `samples` clips (after an untimed one)."""
    clip, stages = (
        (release_cavmae_clip, CAVMAE_RELEASE_STAGES) if m.arch == "cavmae" else (release_clip, RELEASE_STAGES)
    )
    rng = random.Random(seed)
    ms = dict.fromkeys(stages, 0.0)
    for n in range(samples + 1):  # the first clip warms caches and is not counted
        ticks = clip(*inputs[n % len(inputs)], m, rng)[2]
        if n > 0:
            for key, t0, t1 in zip(stages, ticks, ticks[1:]):
                ms[key] += t1 - t0
    return _profile_summary(ms, samples)


def _release_row(arch: str, release: dict) -> dict:
    return {
        "arch": arch,
        "path": "release",
        "audio": "wav",
        "workers": 0,
        "clips_per_cpu_s": release["clips_per_cpu_s"],
    }


# --- the loader -----------------------------------------------------------------------------------


def _loader_settings(workers: list[int]) -> list[tuple[str, str, int]]:
    """(video path, audio form, workers): the CPU-decode paths with the wave form in the main
    process and with each worker count; the other forms and the jpeg path in the main process
    (one core's work)."""
    return [
        (path, form, w)
        for path in LOADER_PATHS
        for form in AUDIO_FORMS
        for w in ([0, *workers] if form == "wave" and path != "jpeg" else [0])
    ]


def _loader_options(path: str, form: str) -> dict:
    """make_pretrain_loader keywords of a video path (the audio form is the shards' and DataConfig's)."""
    return {"video_out": path}


def _loader_row(
    arch: str,
    shards: Path,
    model_cfg: ModelConfig,
    path: str,
    form: str,
    workers: int,
    batch_size: int,
    batches: int,
    seed: int,
) -> dict:
    from hicmae_dist.data.loader import make_pretrain_loader

    data_cfg = DataConfig(
        batch_size=batch_size,
        num_workers=workers,
        shuffle_buffer=2 * batch_size,
        multiscale_crop=arch == "hicmae",
        gain_augment=arch == "hicmae",
        roll_augment=arch == "cavmae",
        audio_form=form,
    )
    loader = make_pretrain_loader(shards, data_cfg, model_cfg, seed=seed, **_loader_options(path, form))
    it = iter(loader)
    for _ in range(max(1, workers)):  # warm-up: worker start, shuffle buffer fill, first batch each
        next(it)
    with Stopwatch() as took:
        for _ in range(batches):
            next(it)
    del it
    n = batches * batch_size
    row = {
        "arch": arch,
        "path": path,
        "audio": form,
        "workers": workers,
        "clips_per_s": round(n / took.wall, 2),
        "clips_per_s_per_worker": round(n / took.wall / max(1, workers), 2),
    }
    if workers == 0:
        row["clips_per_cpu_s"] = round(n / took.cpu, 2) if took.cpu > 0 else None  # one core, one thread
    return row


def per_core_rates(loader_rows: list[dict]) -> dict[str, dict[str, float]]:
    """{arch: {path label: clips per CPU-second}} from the main-process rows ("uint8", "float",
    "release"; another audio form than wave is named after the path: "uint8, fbank")."""
    rates: dict[str, dict[str, float]] = {}
    for r in loader_rows:
        if r["workers"] == 0 and r.get("clips_per_cpu_s"):
            label = r["path"] if r["audio"] in ("wave", "wav") else f"{r['path']}, {r['audio']}"
            rates.setdefault(r["arch"], {})[label] = r["clips_per_cpu_s"]
    return rates


# --- the device side ------------------------------------------------------------------------------


def _uint8_clip_shape(m: ModelConfig) -> tuple[int, ...]:
    """A worker's uint8 clip, channels-last: HiCMAE (16, S, S, 3), CAV-MAE (S, S, 3)."""
    return (m.image_size, m.image_size, 3) if m.arch == "cavmae" else (m.num_frames, m.image_size, m.image_size, 3)


def _device_rows(models: dict[str, ModelConfig], batch_size: int, repeats: int) -> list[dict]:
    """clips/s of normalise_video on a uint8 batch, on the CPU (this process's threads) and on
    CUDA where present."""
    from hicmae_dist.data.device import normalise_video

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for arch, m in models.items():
        for name in devices:
            device = torch.device(name)
            u8 = torch.randint(0, 256, (batch_size, *_uint8_clip_shape(m)), dtype=torch.uint8, device=device)
            t = time_calls(lambda: normalise_video(u8), device, warmup=2, repeats=repeats, min_time=0.02)
            rows.append(
                {
                    "arch": arch,
                    "device": name,
                    "threads": torch.get_num_threads() if name == "cpu" else None,
                    "batch_size": batch_size,
                    "ms_per_batch": round(t["median_ms"], 3),
                    "clips_per_s": round(1000 * batch_size / t["median_ms"], 1),
                }
            )
    return rows


# --- one core's work per clip, stage by stage -------------------------------------------------------


def profile_decode(shards: Path, model_cfg: ModelConfig, path: str = "float", samples: int = 12) -> dict:
    """CPU ms per clip of each stage of the loader's decode on `path` ("float": FLOAT_STAGES,
    "uint8": UINT8_STAGES), one thread, on real shard samples."""
    from hicmae_dist.data.shards import ShardReader, load_index

    indexes = [load_index(p) for p in sorted(Path(shards).glob("shard-*.tar"))]
    refs = [(s, i) for s in range(len(indexes)) for i in range(len(indexes[s]))][:samples]
    reader = ShardReader(indexes)
    m = model_cfg
    stages = FLOAT_STAGES if path == "float" else UINT8_STAGES
    ms = dict.fromkeys(stages, 0.0)
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    if path == "float":
        vshape = (
            (3, m.image_size, m.image_size) if m.arch == "cavmae" else (3, m.num_frames, m.image_size, m.image_size)
        )
        out_v = torch.empty(vshape)
    else:  # one pooled buffer, reused: no new memory per batch
        out_v = torch.empty(_uint8_clip_shape(m), dtype=torch.uint8)
    out_a = torch.empty(m.audio_frames, m.mel_bins)
    with torch_threads(1):
        for n, ref in enumerate(refs * 2):  # the first pass warms caches and is not counted
            ticks = _decode_one(reader, ref, m, rng, gen, out_v, out_a)
            if n >= len(refs):
                for key, t0, t1 in zip(stages, ticks, ticks[1:]):
                    ms[key] += t1 - t0
    reader.close()
    return _profile_summary(ms, len(refs))


def _profile_summary(seconds: dict[str, float], samples: int) -> dict:
    ms = {k: round(1000 * v / samples, 3) for k, v in seconds.items()}
    total = sum(ms.values())
    return {
        "samples": samples,
        "ms": ms,
        "total_ms": round(total, 3),
        "clips_per_cpu_s": round(1000 / total, 1) if total else None,
    }


def _decode_one(
    reader,
    ref: tuple[int, int],
    m: ModelConfig,
    rng: random.Random,
    gen: torch.Generator,
    out_v: torch.Tensor,
    out_a: torch.Tensor,
) -> list[float]:
    """One clip through the loader's decode into out_v (float: normalised; uint8: the pooled
    channels-last buffer); the CPU clock before the first stage and after each."""
    from hicmae_dist.data import audio, video
    from hicmae_dist.masking import audio_structured_mask, mae_random_mask, random_mask, tube_mask

    cav, u8 = m.arch == "cavmae", out_v.dtype == torch.uint8
    ticks = [time.process_time()]
    sample = reader.read(*ref)
    ticks.append(time.process_time())
    meta = json.loads(sample["json"])
    ticks.append(time.process_time())
    if cav:
        frames = video.decode_frames_hwc(sample["jpgs"], meta["frame_bytes"], [rng.randrange(meta["num_frames"])])
    else:
        start = video.sample_start(meta["num_frames"], m.num_frames, rng)
        frames = video.decode_frames_hwc(sample["jpgs"], meta["frame_bytes"], range(start, start + m.num_frames))
    ticks.append(time.process_time())
    box = None if cav else video.multiscale_crop_box(m.image_size, rng)
    if u8 and cav:
        video.image_u8_into(out_v, frames[0])
    elif u8:
        video.frames_u8_into(out_v, frames, box)
    elif cav:
        video.image_into(out_v, frames[0])
    else:
        video.frames_into(out_v, frames, box)
    ticks.append(time.process_time())
    # The loader's audio with the loader rows' augmentation (HiCMAE's gain, CAV-MAE's noise and
    # roll), from the shards' stored form.
    form = meta.get("audio_form", "wave")
    if cav:
        audio.cavmae_audio_into(out_a, sample, meta, form, gain=False, noise_roll=True, rng=rng, generator=gen)
    else:
        audio.hicmae_audio_into(
            out_a, sample, meta, form, *audio.window_samples(meta, start, m.num_frames), gain=True, roll=False, rng=rng
        )
    ticks.append(time.process_time())
    if cav:
        mae_random_mask((m.image_size // m.patch) ** 2, m.video_mask_ratio, gen)
        audio_structured_mask(
            m.mel_bins // m.patch, m.audio_frames // m.patch, m.audio_mask_ratio, m.audio_mask_mode, gen
        )
    else:
        tube_mask(m.num_frames // m.tubelet, (m.image_size // m.patch) ** 2, m.video_mask_ratio, gen)
        random_mask((m.audio_frames // m.patch) * (m.mel_bins // m.patch), m.audio_mask_ratio, gen)
    ticks.append(time.process_time())
    if not u8:
        # Each float batch is new memory (it leaves for the main process): the kernel must provide
        # and zero its pages on first write. One clip's share of a fresh batch of 8, too big for
        # malloc to recycle (> 32 MB: mmap). The uint8 path reuses a pool of batches instead.
        torch.empty(8, *out_v.shape)[0].fill_(0)
        torch.empty(8, m.audio_frames, m.mel_bins)[0].fill_(0)
        ticks.append(time.process_time())
    return ticks


# --- capacity and goal --------------------------------------------------------------------------------


def capacity_table(rates: dict[str, dict[str, float]]) -> list[dict]:
    """CPU cores per H100 for each of CAPACITY_MODELS, for every measured path of its inputs.

    GPU clips/s = TARGET_MFU * H100_BF16_DENSE_TFLOPS / training FLOPs per clip, with training
    FLOPs = 3 x 2 x the pretraining forward's MACs (models.macs, as `hicmae-dist info`: 2 FLOPs
    per multiply-accumulate; the backward pass costs twice the forward); cores = GPU clips/s /
    clips per CPU-second of the path.
    """
    from hicmae_dist.models.info import model_config
    from hicmae_dist.models.macs import macs

    rows = []
    for name in CAPACITY_MODELS:
        cfg = model_config(name)
        forward_macs = sum(macs(cfg, "pretrain").values())
        train_flops = 3 * 2 * forward_macs
        gpu_rate = TARGET_MFU * H100_BF16_DENSE_TFLOPS * 1e12 / train_flops
        rows.append(
            {
                "model": name,
                "arch": cfg.arch,
                "forward_macs": forward_macs,
                "train_flops": train_flops,
                "gpu_clips_per_s": round(gpu_rate, 1),
                "cores_per_gpu": {path: round(gpu_rate / r, 1) for path, r in rates.get(cfg.arch, {}).items()},
            }
        )
    return rows


def _goal(result: dict) -> dict:
    """HiCMAE's clips per CPU-second on GOAL_PATH against GOAL_CLIPS_PER_CORE and against
    GOAL_VS_RELEASE times the release's, and the two stages that cost the most."""
    rates = per_core_rates(result["loader"])["hicmae"]
    per_core, release = rates[GOAL_PATH], rates["release"]
    prof = result["profile"]["hicmae"][GOAL_PATH]
    top = sorted(((v, k) for k, v in prof["ms"].items()), reverse=True)[:2]
    return {
        "path": GOAL_PATH,
        "target_clips_per_core": GOAL_CLIPS_PER_CORE,
        "target_vs_release": GOAL_VS_RELEASE,
        "hicmae_clips_per_core": per_core,
        "release_clips_per_core": release,
        "vs_release": round(per_core / release, 2),
        "clips_per_core_by_path": rates,
        "gpu_decode": {
            "path": GPU_DECODE_PATH,
            "hicmae_clips_per_core": rates.get(GPU_DECODE_PATH),
            "vs_release": round(rates[GPU_DECODE_PATH] / release, 2) if GPU_DECODE_PATH in rates else None,
        },
        "met": per_core >= GOAL_CLIPS_PER_CORE and per_core >= GOAL_VS_RELEASE * release,
        "limited_by": [f"{k} {v:.2f} ms ({100 * v / prof['total_ms']:.0f}%)" for v, k in top],
    }


# --- the report ---------------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def format_table(result: dict) -> str:
    """The results as Markdown: prepare, the loader rows beside the release's, the device rows,
    the per-stage profile, the capacity table and the goal."""
    r = result
    lines = [
        f"# bench data{' --quick' if r['quick'] else ''}",
        "",
        f"{r['clips']} synthetic clips, batch {r['batch_size']}, {r['cpus']} CPUs, load average "
        f"{r['load_average'][0]}; one thread per process",
        "",
        "## prepare",
        "",
    ]
    lines.append(
        md_table(
            ["stored form", "workers", "clips/s", "per worker", "clips/CPU-s", "bytes/clip"],
            [
                [
                    p["form"],
                    p["workers"],
                    _num(p["clips_per_s"]),
                    _num(p["clips_per_s_per_worker"]),
                    _num(p["clips_per_cpu_s"]),
                    p["bytes_per_clip"],
                ]
                for p in r["prepare"]
            ],
        )
    )
    rates = per_core_rates(r["loader"])
    lines += ["", "## loader (release: the authors' per-sample path; HiCMAE's decodes the mp4)", ""]
    lines.append(
        md_table(
            ["arch", "path", "audio", "workers", "clips/s", "per worker", "clips/CPU-s", "vs release"],
            [
                [
                    x["arch"],
                    x["path"],
                    x["audio"],
                    "main" if x["workers"] == 0 else x["workers"],
                    _num(x.get("clips_per_s")),
                    _num(x.get("clips_per_s_per_worker")),
                    _num(x.get("clips_per_cpu_s")),
                    f"{x['clips_per_cpu_s'] / rates[x['arch']]['release']:.1f}x" if x.get("clips_per_cpu_s") else "",
                ]
                for x in r["loader"]
            ],
        )
    )
    lines += ["", "## device: uint8 batch -> normalised float (moved out of the workers)", ""]
    lines.append(
        md_table(
            ["arch", "device", "threads", "batch", "ms/batch", "clips/s"],
            [
                [
                    d["arch"],
                    d["device"],
                    d["threads"] or "",
                    d["batch_size"],
                    _num(d["ms_per_batch"], 3),
                    _num(d["clips_per_s"]),
                ]
                for d in r["device"]
            ],
        )
    )
    lines += [
        "",
        "## profile: CPU ms per clip, one thread",
        "",
        _profile_table(r["profile"]),
        "",
        "## capacity: CPU cores per H100",
        "",
        _capacity_text(r["capacity"]),
        "",
        _goal_line(r["goal"]),
    ]
    return "\n".join(lines)


def _profile_table(profile: dict) -> str:
    columns = [(arch, path) for arch, paths in profile.items() for path in paths]
    stages = list(dict.fromkeys(s for arch, path in columns for s in profile[arch][path]["ms"]))
    rows = [
        [s, *(_num(profile[a][p]["ms"].get(s), 2) if s in profile[a][p]["ms"] else "-" for a, p in columns)]
        for s in stages
    ]
    rows.append(["total", *(_num(profile[a][p]["total_ms"], 2) for a, p in columns)])
    rows.append(["clips/CPU-s", *(_num(profile[a][p]["clips_per_cpu_s"]) for a, p in columns)])
    return md_table(["stage", *(f"{a} {p}" for a, p in columns)], rows)


def _capacity_text(capacity: list[dict]) -> str:
    paths = list(dict.fromkeys(p for c in capacity for p in c["cores_per_gpu"]))
    table = md_table(
        ["model", "forward GMACs/clip", "train GFLOPs/clip", "GPU clips/s", *(f"cores ({p})" for p in paths)],
        [
            [
                c["model"],
                _num(c["forward_macs"] / 1e9, 2),
                _num(c["train_flops"] / 1e9),
                _num(c["gpu_clips_per_s"]),
                *(_num(c["cores_per_gpu"].get(p)) or "-" for p in paths),
            ]
            for c in capacity
        ],
    )
    return (
        f"GPU clips/s = {TARGET_MFU:.0%} x {H100_BF16_DENSE_TFLOPS} TFLOP/s (H100 SXM dense bf16 peak) / "
        f"train FLOPs per clip; train FLOPs = 3 x 2 x forward MACs of the pretraining step (models.macs, "
        f"as `hicmae-dist info`); cores = GPU clips/s / the path's clips per CPU-second "
        f"(main process, one thread).\n\n" + table
    )


def _goal_line(g: dict) -> str:
    return (
        f"goal: HiCMAE >= {g['target_clips_per_core']} clips/s per core and >= {g['target_vs_release']}x the "
        f"release: {g['path']} path {g['hicmae_clips_per_core']} per CPU-second, {g['vs_release']}x the release's "
        f"{g['release_clips_per_core']} ({'met' if g['met'] else 'not met'}); largest costs: "
        f"{', '.join(g['limited_by'])}. With data.decode_on=cuda ({g['gpu_decode']['path']} path, the GPU "
        f"decodes): {g['gpu_decode']['hicmae_clips_per_core']} per CPU-second, {g['gpu_decode']['vs_release']}x"
    )
