"""Token masks for masked autoencoding (docs/models.md, HiCMAE pretraining forward, step 1).

A mask is a bool tensor over the flat token index, True where the token is MASKED (hidden from
the encoder). Every sample of a batch masks the same number of tokens, so the visible tokens of
a batch gather into a dense (B, N_visible, C) tensor.
"""

from __future__ import annotations

import torch


def num_masked(num_tokens: int, ratio: float) -> int:
    """int(ratio * N), as the release: 0.9 * 100 -> 90, 0.8 * 128 -> 102."""
    return int(ratio * num_tokens)


def random_mask(num_tokens: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_tokens,) bool: exactly num_masked(num_tokens, ratio) True at uniformly random places."""
    order = torch.randperm(num_tokens, generator=generator)
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    mask[order[: num_masked(num_tokens, ratio)]] = True
    return mask


def tube_mask(
    temporal_tokens: int, spatial_tokens: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(temporal_tokens * spatial_tokens,) bool in (t, h, w) order: one random spatial mask
    repeated over every temporal slice (VideoMAE tube masking)."""
    return random_mask(spatial_tokens, ratio, generator).repeat(temporal_tokens)


def split_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) bool mask with the same count per row -> (visible_idx (B, Nv), masked_idx (B, Nm)),
    int64, each in ascending token order."""
    counts = mask.sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(f"every sample must mask the same number of tokens; got counts {counts.tolist()}")
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible (0) first, in order
    num_visible = mask.shape[1] - (int(counts[0]) if counts.numel() else 0)
    return order[:, :num_visible], order[:, num_visible:]


def split_indices_to(mask: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """split_indices of the host copy of `mask`, moved to `device`: the counts it checks are read
    on the host, so a step on a GPU does not wait for the device (the loader's masks are CPU
    tensors; a device mask costs one copy back)."""
    visible, masked = split_indices(mask.cpu())
    return visible.to(device, non_blocking=True), masked.to(device, non_blocking=True)


# --- CAV-MAE (docs/models.md, CAV-MAE masking): MAE-style masks, per sample ---------------------

AUDIO_MASK_MODES = ("random", "time", "freq", "tf")


def num_visible_mae(num_tokens: int, ratio: float) -> int:
    """int(N * (1 - ratio)) visible tokens, the MAE / CAV-MAE rounding: 0.75 of 512 -> 128,
    0.75 of 196 -> 49. (random_mask above rounds the masked count instead, as HiCMAE does.)"""
    return int(num_tokens * (1 - ratio))


def _keep_lowest(noise: torch.Tensor, num_visible: int) -> torch.Tensor:
    """(N,) noise -> (N,) bool mask, True = masked: the num_visible tokens of lowest noise stay
    visible (MAE's argsort of per-sample noise)."""
    order = torch.argsort(noise, stable=True)
    mask = torch.ones(noise.shape[0], dtype=torch.bool)
    mask[order[:num_visible]] = False
    return mask


def mae_random_mask(num_tokens: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_tokens,) bool: exactly num_visible_mae(num_tokens, ratio) visible tokens at uniformly
    random places (unstructured masking; the CAV-MAE visual mask and default audio mask)."""
    return _keep_lowest(torch.rand(num_tokens, generator=generator), num_visible_mae(num_tokens, ratio))


def audio_structured_mask(
    freq_tokens: int, time_tokens: int, ratio: float, mode: str = "random", generator: torch.Generator | None = None
) -> torch.Tensor:
    """(freq_tokens * time_tokens,) bool over CAV-MAE's frequency-major audio tokens (index
    f * time_tokens + t). Always exactly num_visible_mae(N, ratio) visible tokens.

    mode "random": unstructured. "time": int(T * ratio) random time columns are forced masked;
    "freq": int(F * ratio) random frequency rows; "tf": int(T * ratio * 0.7) columns and
    int(F * ratio * 0.7) rows. The remaining tokens are then ranked by uniform noise as in
    "random", so the visible count is exact whatever the lines cover. At ratio 0.75 on the 8 x 64
    grid, "time" masks exactly 48 whole columns and "freq" 6 whole rows; "tf" forces 33 columns
    and 4 rows (388 tokens > the 384 to mask), so 4 forced tokens stay visible. The release marks
    forced tokens with one constant and leaves the choice among them to argsort's tie order; here
    they are ranked by fresh noise, i.e. chosen uniformly at random.
    """
    if mode not in AUDIO_MASK_MODES:
        raise ValueError(f"audio mask mode {mode!r}: expected one of {', '.join(AUDIO_MASK_MODES)}")
    noise = torch.rand(freq_tokens, time_tokens, generator=generator)  # [0, 1): ranks the free tokens
    forced = torch.zeros(freq_tokens, time_tokens, dtype=torch.bool)
    columns, rows = {  # whole lines forced masked; products evaluated left to right, as the release
        "random": (0, 0),
        "time": (int(time_tokens * ratio), 0),
        "freq": (0, int(freq_tokens * ratio)),
        "tf": (int(time_tokens * ratio * 0.7), int(freq_tokens * ratio * 0.7)),
    }[mode]
    if columns:
        forced[:, torch.randperm(time_tokens, generator=generator)[:columns]] = True
    if rows:
        forced[torch.randperm(freq_tokens, generator=generator)[:rows], :] = True
    noise = noise + forced.float()  # forced tokens rank after every free one
    return _keep_lowest(noise.flatten(), num_visible_mae(freq_tokens * time_tokens, ratio))
