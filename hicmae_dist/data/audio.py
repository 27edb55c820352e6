"""Audio features and augmentation (SPEC.md 1 and 2, 'Inputs', audio).

Waveforms are (1, S) float32 tensors at 16 kHz in [-1, 1]; shards store them as int16 PCM.

kaldi_fbank is torchaudio.compliance.kaldi.fbank with the spec's settings, computed with the
same torch operations in the same order (bit-identical output; the tests hold it to exact
equality) minus the work those settings throw away: the mel filterbank and the Hann window are
built once and cached instead of on every call, and the frame energy that use_energy=False
discards is not computed. About 1.5x faster than torchaudio's on a 2.56 s window.
"""
from __future__ import annotations

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
        raise ValueError(f"fbank needs at least {FRAME_SAMPLES} samples (one 25 ms frame), "
                         f"got {waveform.shape[1]}")
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
    out[:feats.shape[0]] = feats
    out[feats.shape[0]:] = 0
    return out


def fbank_into(out: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
    """HiCMAE's fbank (see fbank) of the (S,) waveform, written into out (frames, bins)."""
    return _padded_fbank_into(out, wave).sub_(FBANK_MEAN).div_(2 * FBANK_STD)


def cavmae_fbank_into(out: torch.Tensor, wave: torch.Tensor) -> torch.Tensor:
    """CAV-MAE's fbank (SPEC.md 2): the same Kaldi fbank of the mean-subtracted (S,) waveform,
    zero-padded or cut to out's 1024 frames, then (x + 5.081) / 4.4849; written into out."""
    return _padded_fbank_into(out, wave).sub_(CAVMAE_FBANK_MEAN).div_(CAVMAE_FBANK_STD)


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


def random_gain(waveform: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Scale by m ~ Beta(10, 10) + 0.5 (the release's magnitude augmentation)."""
    return waveform * (rng.betavariate(10, 10) + 0.5)


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
