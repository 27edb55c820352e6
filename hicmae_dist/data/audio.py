"""Audio features and augmentation (docs/models.md, HiCMAE inputs and CAV-MAE inputs, audio).

Waveforms are (1, S) float32 tensors at 16 kHz in [-1, 1]. Shards store each clip's audio in
one of two forms (data.audio_form, `prepare --audio-form`; docs/data.md): "wave", int16 PCM, from
which the loader computes the window's fbank; "fbank", the whole clip's log-mel fbank as float16,
which the loader slices at the window (gain as a log shift). hicmae_audio_into and
cavmae_audio_into are the loader's audio, for either form.

kaldi_fbank is torchaudio.compliance.kaldi.fbank with the spec's settings, computed with the
same torch operations in the same order (bit-identical output; the tests hold it to exact
equality) minus the work those settings throw away: the mel filterbank and the Hann window are
built once and cached instead of on every call, and the frame energy that use_energy=False
discards is not computed. About 1.5x faster than torchaudio's on a 2.56 s window.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi

SAMPLE_RATE = 16000
FRAME_SAMPLES = 400  # one 25 ms fbank frame
FBANK_MEAN = -4.2677393  # the release's dataset statistics; the std is doubled on purpose
FBANK_STD = 4.5689974
CAVMAE_FBANK_MEAN = -5.081  # CAV-MAE's normalisation: (x + 5.081) / 4.4849 (the std not doubled)
CAVMAE_FBANK_STD = 4.4849
FRAME_SHIFT = 160  # 10 ms
PADDED_FRAME = 512  # 400 rounded up to a power of two
PREEMPHASIS = 0.97
_EPSILON = torch.finfo(torch.float32).eps
LOG_FLOOR = math.log(_EPSILON)  # kaldi's energy floor, in the log domain: -15.94
AUDIO_FORMS = ("wave", "fbank")
_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _window_and_mel(num_mel_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hann window (400,) and the mel filterbank (num_mel_bins, 257), kaldi's own tensors."""
    if num_mel_bins not in _cache:
        mel, _ = kaldi.get_mel_banks(num_mel_bins, PADDED_FRAME, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
        _cache[num_mel_bins] = (torch.hann_window(FRAME_SAMPLES, periodic=False), F.pad(mel, (0, 1)))
    return _cache[num_mel_bins]


def num_fbank_frames(num_samples: int) -> int:
    """Frames of a kaldi fbank of num_samples (25 ms frames every 10 ms, edges snipped)."""
    return 0 if num_samples < FRAME_SAMPLES else 1 + (num_samples - FRAME_SAMPLES) // FRAME_SHIFT


def kaldi_fbank(wave: torch.Tensor, num_mel_bins: int = 128) -> torch.Tensor:
    """(S,) float32 waveform -> (frames, num_mel_bins) log mel energies, equal to
    kaldi.fbank(wave[None], htk_compat=True, sample_frequency=16000, use_energy=False,
    window_type='hanning', num_mel_bins=num_mel_bins, dither=0.0, frame_shift=10)."""
    window, mel = _window_and_mel(num_mel_bins)
    strided = wave.unfold(0, FRAME_SAMPLES, FRAME_SHIFT)  # (m, 400) view, snip_edges
    frames = torch.zeros(strided.shape[0], PADDED_FRAME)
    x = frames[:, :FRAME_SAMPLES]
    torch.sub(strided, strided.mean(dim=1, keepdim=True), out=x)  # remove_dc_offset
    # x[:, j] -= 0.97 * x[:, max(0, j - 1)], as kaldi's replicate-padded shift
    x.sub_(PREEMPHASIS * F.pad(x.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)[:, :-1])
    x.mul_(window)
    power = torch.fft.rfft(frames).abs().pow_(2.0)  # (m, 257)
    return torch.mm(power, mel.T).clamp_min_(_EPSILON).log_()


def fbank(waveform: torch.Tensor, target_frames: int = 256, num_mel_bins: int = 128) -> torch.Tensor:
    """(1, S) float waveform at 16 kHz -> (target_frames, num_mel_bins) float32 normalised fbank.

    Kaldi fbank of the mean-subtracted waveform (25 ms Hanning frames every 10 ms, HTK-compatible
    mel bins, no energy, no dither), zero-padded at the end or cut to target_frames, then
    (x - FBANK_MEAN) / (2 * FBANK_STD).
    """
    if waveform.dim() != 2 or waveform.shape[0] != 1:
        raise ValueError(f"fbank expects a (1, S) mono waveform, got shape {tuple(waveform.shape)}")
    if waveform.shape[1] < FRAME_SAMPLES:
        raise ValueError(f"fbank needs at least {FRAME_SAMPLES} samples (one 25 ms frame), got {waveform.shape[1]}")
    out = torch.empty(target_frames, num_mel_bins)
    return fbank_into(out, waveform[0].float())


def _padded_fbank_into(out: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
    """Mean-subtracted kaldi fbank of `wave` (only the frames out holds are computed), zero rows
    after its end, into out (target_frames, num_mel_bins)."""
    target_frames, num_mel_bins = out.shape
    if wave.shape[0] < FRAME_SAMPLES:
        raise ValueError(f"fbank needs at least {FRAME_SAMPLES} samples (one 25 ms frame), got {wave.shape[0]}")
    wave = wave - wave.mean()
    needed = FRAME_SAMPLES + (target_frames - 1) * FRAME_SHIFT  # samples of target_frames frames
    feats = kaldi_fbank(wave[:needed], num_mel_bins)
    out[: feats.shape[0]] = feats
    out[feats.shape[0] :] = 0
    return out


def fbank_into(out: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
    """HiCMAE's fbank (see fbank) of the (S,) waveform, written into out (frames, bins)."""
    return _hicmae_normalise_(_padded_fbank_into(out, wave))


def cavmae_fbank_into(out: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
    """CAV-MAE's fbank (docs/models.md, CAV-MAE inputs): the same Kaldi fbank of the mean-subtracted (S,) waveform,
    zero-padded or cut to out's 1024 frames, then (x + 5.081) / 4.4849; written into out."""
    return _cavmae_normalise_(_padded_fbank_into(out, wave))


def _hicmae_normalise_(log_mel: torch.Tensor) -> torch.Tensor:
    return log_mel.sub_(FBANK_MEAN).div_(2 * FBANK_STD)


def _cavmae_normalise_(log_mel: torch.Tensor) -> torch.Tensor:
    return log_mel.sub_(CAVMAE_FBANK_MEAN).div_(CAVMAE_FBANK_STD)


def cavmae_augment_(feats: torch.Tensor, rng: random.Random, generator: torch.Generator) -> torch.Tensor:
    """CAV-MAE's training augmentation of a normalised (T, F) fbank, in place: add
    rand(T, F) * u / 10 with u ~ U[0, 1) (the U*U/10 noise), then roll along time by a
    uniform integer in [-T, T)."""
    noise = torch.rand(feats.shape, generator=generator)
    feats.add_(noise.mul_(rng.random() / 10))
    shift = rng.randrange(-feats.shape[0], feats.shape[0])
    if shift % feats.shape[0]:
        feats.copy_(torch.roll(feats, shift, dims=0))
    return feats


def gain_factor(rng: random.Random) -> float:
    """m ~ Beta(10, 10) + 0.5 (the release's magnitude augmentation)."""
    return rng.betavariate(10, 10) + 0.5


def random_gain(waveform: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Scale by m = gain_factor(rng)."""
    return waveform * gain_factor(rng)


def random_roll(waveform: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Circular shift in time by a uniform random number of samples.

    The release meant to do this but rolled a (1, S) array along its length-1 first axis, a
    no-op; this rolls along time.
    """
    return torch.roll(waveform, rng.randrange(waveform.shape[-1]), dims=-1)


def to_pcm16(waveform: torch.Tensor) -> bytes:
    """(1, S) float in [-1, 1] -> little-endian int16 bytes (the stored form; from_pcm16 inverts it)."""
    pcm = (waveform * 32768).round().clamp(-32768, 32767).to(torch.int16)
    return pcm.numpy().astype("<i2").tobytes()


def from_pcm16(data: bytes) -> torch.Tensor:
    """Little-endian int16 bytes -> (1, S) float32 in [-1, 1), scaled as torchaudio.load does."""
    pcm = np.frombuffer(data, dtype="<i2")
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0).unsqueeze(0)


# --- the loader's audio, from either stored form (docs/data.md) ----------------------------------

FBANK_DTYPE = "<f2"  # float16: 128 bins x 100 frames x 2 B = 25.6 kB per second (int16 PCM: 32 kB)


def clip_fbank(waveform: torch.Tensor, num_mel_bins: int = 128) -> torch.Tensor:
    """(1, S) waveform -> (num_fbank_frames(S), num_mel_bins) float32 log-mel of the whole clip,
    the fbank form's content. Computed from the int16-rounded samples the wave form stores, so both
    forms start from the same numbers; no mean subtraction: kaldi removes each frame's DC offset
    before pre-emphasis, so the loader's window mean changes nothing but float rounding."""
    return kaldi_fbank(from_pcm16(to_pcm16(waveform))[0], num_mel_bins)


def to_fbank16(log_mel: torch.Tensor) -> bytes:
    """(frames, bins) float log-mel -> little-endian float16 bytes (rounded to nearest)."""
    return log_mel.numpy().astype(FBANK_DTYPE).tobytes()


def window_samples(meta: dict, start: int, num_frames: int) -> tuple[int, int]:
    """(first sample, length) of the audio under num_frames stored frames from stored frame
    `start` (stored frame i is source frame i * frame_stride): 40,960 samples, 2.56 s, for 16."""
    seconds_per_stored = meta["frame_stride"] / meta["fps"]
    return (round(start * seconds_per_stored * SAMPLE_RATE), round(num_frames * seconds_per_stored * SAMPLE_RATE))


def hicmae_audio_into(
    out: torch.Tensor,
    sample: dict,
    meta: dict,
    form: str,
    first: int,
    length: int,
    *,
    gain: bool,
    roll: bool,
    rng: random.Random,
) -> torch.Tensor:
    """HiCMAE's audio (docs/models.md, HiCMAE inputs) into out (256, bins): the normalised fbank of the clip's samples
    [first, first + length), with the gain (and, wave form only, roll) augmentations."""
    if form == "wave":
        wave = from_pcm16(_member(sample, "pcm")[2 * first : 2 * (first + length)])  # (1, <= length)
        if gain:
            wave = random_gain(wave, rng)
        if roll:
            wave = random_roll(wave, rng)
        return fbank_into(out, wave[0])
    if roll:  # the loader refuses this combination up front (check_audio_form)
        raise ValueError("data.roll_augment rolls the waveform, which the fbank form does not store")
    _stored_window_into(out, sample, meta, first, length, gain_factor(rng) if gain else None)
    return _hicmae_normalise_(out)


def cavmae_audio_into(
    out: torch.Tensor,
    sample: dict,
    meta: dict,
    form: str,
    *,
    gain: bool,
    noise_roll: bool,
    rng: random.Random,
    generator: torch.Generator,
) -> torch.Tensor:
    """CAV-MAE's audio (docs/models.md, CAV-MAE inputs) into out (1024, bins): the normalised fbank of the clip's first
    10.24 s, gain on the waveform; noise_roll: cavmae_augment_ (exact on either form)."""
    if form == "wave":
        wave = from_pcm16(_member(sample, "pcm"))
        if gain:
            wave = random_gain(wave, rng)
        cavmae_fbank_into(out, wave[0])
    else:
        _stored_window_into(out, sample, meta, 0, meta["num_samples"], gain_factor(rng) if gain else None)
        _cavmae_normalise_(out)
    if noise_roll:
        cavmae_augment_(out, rng, generator)
    return out


def _member(sample: dict, name: str) -> bytes:
    if name not in sample:
        raise ValueError(
            f"the sample has no .{name} member (its shards hold another audio form: "
            f"`hicmae-dist prepare --audio-form {'wave' if name == 'pcm' else 'fbank'}` writes it)"
        )
    return sample[name]


def _stored_window_into(
    out: torch.Tensor, sample: dict, meta: dict, first: int, length: int, gain: float | None
) -> torch.Tensor:
    """The stored clip fbank's rows that the wave form's fbank of samples [first, first + length)
    has, zero rows after (un-normalised log-mel, into out (frames, bins)).

    A window starting at a multiple of the 160-sample frame shift (every window at 25 fps: 2560
    samples per stored frame) has exactly the clip's frames first / 160 on; other starts take the
    nearest frame (within 5 ms). Gain m multiplies the power by m^2: log-mel + 2 ln m, clamped at
    kaldi's floor ln(eps) as the waveform path is. A stored value at the floor stays there (exact
    for power 0, as in the mel bins whose filter is empty); it differs from the waveform path
    only for 0 < power < eps with m > 1, whose value lies in [ln eps, ln eps + 2 ln m]."""
    frames, bins = out.shape
    stored = _member(sample, "fbank")
    if meta.get("mel_bins") != bins:
        raise ValueError(f"the stored fbank has {meta.get('mel_bins')} mel bins, the model takes {bins}")
    total = num_fbank_frames(meta["num_samples"])
    if len(stored) != 2 * bins * total:
        raise ValueError(
            f"the stored fbank has {len(stored)} bytes ({len(stored) / (2 * bins):g} frames), "
            f"{meta['num_samples']} samples make {total} frames"
        )
    samples = min(length, meta["num_samples"] - first)
    if samples < FRAME_SAMPLES:
        raise ValueError(f"fbank needs at least {FRAME_SAMPLES} samples (one 25 ms frame), got {max(samples, 0)}")
    start = round(first / FRAME_SHIFT)
    rows = min(num_fbank_frames(samples), frames, total - start)
    window = np.frombuffer(stored, FBANK_DTYPE, count=rows * bins, offset=2 * start * bins)
    out[:rows] = torch.from_numpy(window.astype(np.float32)).view(rows, bins)
    out[rows:] = 0
    floored = out[:rows] <= LOG_FLOOR  # float16 rounds ln(eps) down, to -15.9453
    if gain is not None:
        out[:rows].add_(2 * math.log(gain)).clamp_min_(LOG_FLOOR)
    out[:rows].masked_fill_(floored, LOG_FLOOR)
    return out
