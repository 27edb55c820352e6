"""`hicmae-dist bench data`: how fast the data layer turns clips into batches.

On a synthetic corpus written for the purpose (real mp4/m4a files):
  - prepare: clips/s with 1, 2 and N threads (N = CPUs), HiCMAE's stored form (stride 4, 160 px)
    and CAV-MAE's (10 full 224 px frames);
  - the loader: clips/s for HiCMAE inputs and for CAV-MAE inputs, in the main process (one core:
    its CPU time gives clips per CPU-second, the per-core figure) and with 1, 2 and N DataLoader
    workers (wall clock; per worker = clips/s / workers);
  - a profile of one core's work per clip, stage by stage (CPU ms), and the HiCMAE goal of
    >= 250 clips/s per core.
Wall-clock rates depend on what else the machine runs (the report prints the load average);
CPU-time rates much less.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hicmae_dist.bench.timing import Stopwatch, torch_threads
from hicmae_dist.config import Config, DataConfig, ModelConfig, load_config

GOAL_CLIPS_PER_CORE = 250  # HiCMAE inputs, per CPU core (a GPU eats thousands of clips per second)
STAGES = ("read tar", "json", "jpeg decode", "crop+resize+normalise", "fbank", "masks", "new batch memory")


def bench_data(*, quick: bool = False, workers: list[int] | None = None, work_dir: str | Path | None = None,
               clips: int | None = None, batches: int | None = None, batch_size: int | None = None,
               seed: int = 0) -> dict:
    """Run the benchmark (module docstring); returns the results (format_table prints them)."""
    from hicmae_dist.data.synth import write_corpus

    ncpu = os.cpu_count() or 1
    workers = sorted(set(workers or ([1, 2] if quick else [1, 2, ncpu])))
    clips = clips or (8 if quick else 48)
    batches = batches or (4 if quick else 12)
    batch_size = batch_size or (4 if quick else 8)
    owned = work_dir is None
    root = Path(work_dir or tempfile.mkdtemp(prefix="hicmae-bench-data-"))
    result: dict = {"quick": quick, "cpus": ncpu, "load_average": [round(x, 2) for x in os.getloadavg()],
                    "clips": clips, "batch_size": batch_size, "batches": batches, "workers": workers}
    try:
        with torch_threads(1):
            corpus = root / "corpus"
            if not (corpus / "labels.csv").exists():
                write_corpus(corpus, clips, num_classes=4, seed=seed, workers=ncpu, progress=False)
            result["prepare"], stores = _bench_prepare(corpus, root, workers)
            models = {"hicmae": Config().model, "cavmae": load_config("cavmae-base-vox2").model}
            result["loader"] = [_loader_row(arch, stores[arch], model_cfg, w, batch_size, batches, seed)
                                for arch, model_cfg in models.items() for w in [0, *workers]]
            result["profile"] = {arch: profile_decode(stores[arch], cfg, samples=6 if quick else 24)
                                 for arch, cfg in models.items()}
        result["goal"] = _goal(result)
        return result
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)


def _bench_prepare(corpus: Path, root: Path, workers: list[int]) -> tuple[list[dict], dict[str, Path]]:
    """Time `prepare` into HiCMAE's form with each worker count, then CAV-MAE's with the most:
    (rows, {arch: a shard directory of its form})."""
    from hicmae_dist.data.prepare import prepare_shards

    forms = [("hicmae", "hicmae: stride 4, 160px", root / f"shards-hicmae-w{w}", w, {}) for w in workers]
    forms.append(("cavmae", "cavmae: ten frames, 224px", root / "shards-cavmae", max(workers),
                  {"full_frame": True, "frames": "ten"}))
    rows, stores = [], {}
    for arch, form, out, w, options in forms:
        shutil.rmtree(out, ignore_errors=True)
        with Stopwatch() as took:
            manifest = prepare_shards(corpus, out, shard_size="1MB", workers=w, progress=False, **options)
        rows.append(_prepare_row(form, w, manifest, took.wall, took.cpu))
        stores.setdefault(arch, out)
    return rows, stores


def _goal(result: dict) -> dict:
    """HiCMAE's clips per CPU-second in the main process against the goal, and the two stages
    that cost the most."""
    per_core = next(r["clips_per_cpu_s"] for r in result["loader"] if r["arch"] == "hicmae" and r["workers"] == 0)
    prof = result["profile"]["hicmae"]
    top = sorted(((v, k) for k, v in prof["ms"].items()), reverse=True)[:2]
    return {"clips_per_core": GOAL_CLIPS_PER_CORE, "hicmae_clips_per_core": per_core,
            "met": per_core >= GOAL_CLIPS_PER_CORE,
            "limited_by": [f"{k} {v:.2f} ms ({100 * v / prof['total_ms']:.0f}%)" for v, k in top]}


def _prepare_row(form: str, workers: int, manifest: dict, wall: float, cpu: float) -> dict:
    n = manifest["last_run"]["clips_done"]
    return {"form": form, "workers": workers, "clips": n, "clips_per_s": round(n / wall, 2),
            "clips_per_s_per_worker": round(n / wall / workers, 2),
            "clips_per_cpu_s": round(n / cpu, 2) if cpu > 0 else None, "bytes_per_clip": manifest["bytes_per_clip"]}


def _loader_row(arch: str, shards: Path, model_cfg: ModelConfig, workers: int, batch_size: int, batches: int,
                seed: int) -> dict:
    from hicmae_dist.data.loader import make_pretrain_loader

    data_cfg = DataConfig(batch_size=batch_size, num_workers=workers, shuffle_buffer=2 * batch_size,
                          multiscale_crop=arch == "hicmae", gain_augment=arch == "hicmae", roll_augment=arch == "cavmae")
    loader = make_pretrain_loader(shards, data_cfg, model_cfg, seed=seed)
    it = iter(loader)
    for _ in range(max(1, workers)):  # warm-up: worker start, shuffle buffer fill, first batch each
        next(it)
    with Stopwatch() as took:
        for _ in range(batches):
            next(it)
    del it
    n = batches * batch_size
    row = {"arch": arch, "workers": workers, "clips_per_s": round(n / took.wall, 2),
           "clips_per_s_per_worker": round(n / took.wall / max(1, workers), 2)}
    if workers == 0:
        row["clips_per_cpu_s"] = round(n / took.cpu, 2) if took.cpu > 0 else None  # one core, one thread
    return row


def profile_decode(shards: Path, model_cfg: ModelConfig, samples: int = 12) -> dict:
    """CPU ms per clip of each stage of the loader's decode, one thread, on real shard samples."""
    from hicmae_dist.data.shards import ShardReader, load_index

    indexes = [load_index(p) for p in sorted(Path(shards).glob("shard-*.tar"))]
    refs = [(s, i) for s in range(len(indexes)) for i in range(len(indexes[s]))][:samples]
    reader = ShardReader(indexes)
    m = model_cfg
    ms = dict.fromkeys(STAGES, 0.0)
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    vshape = (3, m.image_size, m.image_size) if m.arch == "cavmae" else (3, m.num_frames, m.image_size, m.image_size)
    out_v, out_a = torch.empty(vshape), torch.empty(m.audio_frames, m.mel_bins)
    with torch_threads(1):
        for n, ref in enumerate(refs * 2):  # the first pass warms caches and is not counted
            ticks = _decode_one(reader, ref, m, rng, gen, out_v, out_a)
            if n >= len(refs):
                for key, t0, t1 in zip(ms, ticks, ticks[1:]):
                    ms[key] += t1 - t0
    reader.close()
    ms = {k: round(1000 * v / len(refs), 3) for k, v in ms.items()}
    total = sum(ms.values())
    return {"samples": len(refs), "ms": ms, "total_ms": round(total, 3),
            "clips_per_cpu_s": round(1000 / total, 1) if total else None}


def _decode_one(reader, ref: tuple[int, int], m: ModelConfig, rng: random.Random, gen: torch.Generator,
                out_v: torch.Tensor, out_a: torch.Tensor) -> list[float]:
    """One clip through the loader's decode; the CPU clock before the first stage and after each."""
    from hicmae_dist.data import audio, video
    from hicmae_dist.masking import audio_structured_mask, mae_random_mask, random_mask, tube_mask

    cav = m.arch == "cavmae"
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
    if cav:
        video.image_into(out_v, frames[0])
    else:
        video.frames_into(out_v, frames, video.multiscale_crop_box(m.image_size, rng))
    ticks.append(time.process_time())
    wave = audio.from_pcm16(sample["pcm"] if cav else sample["pcm"][:2 * 40960])[0]
    (audio.cavmae_fbank_into if cav else audio.fbank_into)(out_a, wave)
    ticks.append(time.process_time())
    if cav:
        mae_random_mask((m.image_size // m.patch) ** 2, m.video_mask_ratio, gen)
        audio_structured_mask(m.mel_bins // m.patch, m.audio_frames // m.patch, m.audio_mask_ratio,
                              m.audio_mask_mode, gen)
    else:
        tube_mask(m.num_frames // m.tubelet, (m.image_size // m.patch) ** 2, m.video_mask_ratio, gen)
        random_mask((m.audio_frames // m.patch) * (m.mel_bins // m.patch), m.audio_mask_ratio, gen)
    ticks.append(time.process_time())
    # Each batch is new memory (it leaves for the main process): the kernel must provide and zero
    # its pages on first write. (The stages above reuse one buffer.) One clip's share of a fresh
    # batch of 8, too big for malloc to recycle (> 32 MB: mmap).
    torch.empty(8, *out_v.shape)[0].fill_(0)
    torch.empty(8, m.audio_frames, m.mel_bins)[0].fill_(0)
    ticks.append(time.process_time())
    return ticks


def format_table(result: dict) -> str:
    lines = [f"bench data{' --quick' if result['quick'] else ''}: {result['clips']} synthetic clips, batch "
             f"{result['batch_size']}, {result['cpus']} CPUs, load average {result['load_average'][0]}", ""]
    lines.append(f"{'prepare':34s} {'workers':>7s} {'clips/s':>9s} {'per worker':>10s} {'clips/CPU-s':>11s} {'bytes/clip':>10s}")
    for r in result["prepare"]:
        lines.append(f"  {r['form']:32s} {r['workers']:7d} {r['clips_per_s']:9.1f} {r['clips_per_s_per_worker']:10.1f} "
                     f"{r['clips_per_cpu_s'] or 0:11.1f} {r['bytes_per_clip']:10d}")
    lines += ["", f"{'loader':34s} {'workers':>7s} {'clips/s':>9s} {'per worker':>10s} {'clips/CPU-s':>11s}"]
    names = {"hicmae": "hicmae: 16x160px, 256x128 fbank", "cavmae": "cavmae: 1x224px, 1024x128 fbank"}
    for r in result["loader"]:
        who = "main" if r["workers"] == 0 else str(r["workers"])
        cpu = f"{r['clips_per_cpu_s']:11.1f}" if r.get("clips_per_cpu_s") else f"{'':11s}"
        lines.append(f"  {names[r['arch']]:32s} {who:>7s} {r['clips_per_s']:9.1f} {r['clips_per_s_per_worker']:10.1f} {cpu}")
    for arch, prof in result["profile"].items():
        stages = ", ".join(f"{k} {v:.2f}" for k, v in prof["ms"].items())
        lines += ["", f"profile {arch}, CPU ms per clip (one thread): {stages}; total {prof['total_ms']:.2f} ms "
                      f"= {prof['clips_per_cpu_s']} clips per CPU-second"]
    g = result["goal"]
    lines += ["", f"goal: HiCMAE >= {g['clips_per_core']} clips/s per core: {g['hicmae_clips_per_core']} per CPU-second "
                  f"({'met' if g['met'] else 'not met'}); largest costs: {', '.join(g['limited_by'])}"]
    return "\n".join(lines)
