"""Throughput accounting: model FLOPs utilisation and the per-rank memory estimate of a run.

MFU = (model FLOPs per step / step time) / (peak FLOP/s per device * devices), with
model FLOPs per sample = 3 (forward + backward ~ 2 x forward) * 2 (FLOPs per MAC) * MACs of the
pretraining forward (hicmae_dist.models.info.macs: linear layers, patch embeddings and both
attention matmuls on the tokens each part sees; activation recomputation is not counted).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from hicmae_dist.config import Config
from hicmae_dist.models import get_spec
from hicmae_dist.models.macs import macs

# Dense peak FLOP/s per device, from the vendors' data sheets (no sparsity).
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100": {"bf16": 989.0, "fp32": 494.7},  # SXM; fp32 = TF32 tensor cores
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp32": 183.0},
    "A10": {"bf16": 125.0, "fp32": 62.5},
    "V100": {"bf16": 125.0, "fp32": 15.7},  # no bf16: the fp16 tensor-core figure
    "RTX 4090": {"bf16": 165.2, "fp32": 82.6},
}


def model_flops_per_sample(cfg: Config) -> float:
    return 3 * 2 * float(sum(macs(cfg.model, "pretrain").values()))


def _cpu_peak_flops() -> tuple[float, str]:
    """cores x clock x FLOPs/cycle (two FMA units: 32 fp32 FLOPs/cycle with AVX2, 64 with AVX-512)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)] or [2000.0]
    per_cycle = 64 if " avx512f" in text else 32 if " avx2" in text else 8
    cores = len(os.sched_getaffinity(0))
    return cores * max(mhz) * 1e6 * per_cycle, f"CPU {cores} cores x {max(mhz):.0f} MHz x {per_cycle} FLOP/cycle"


def peak_flops(device: torch.device, bf16: bool) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from); None for an unknown GPU."""
    if device.type != "cuda":
        return _cpu_peak_flops()
    name = torch.cuda.get_device_name(device)
    for key, table in GPU_PEAK_TFLOPS.items():
        if key in name:
            return table["bf16" if bf16 else "fp32"] * 1e12, f"{name} ({key} data sheet)"
    return None, f"{name}: not in GPU_PEAK_TFLOPS, MFU not reported"


def memory_estimate(cfg: Config, num_params: int, world_size: int) -> dict[str, float]:
    """Bytes per rank for parameters, gradients and Adam state under the chosen ZeRO stage,
    plus activations (see activation_bytes). Mixed precision keeps fp32 master weights."""
    stage = cfg.train.zero_stage
    p16 = 2 if cfg.train.bf16 else 4
    params = num_params * p16
    grads = num_params * p16
    optim = num_params * (12 if cfg.train.bf16 else 8)  # (fp32 master +) two fp32 moments
    share = 1.0 / world_size
    return {
        "parameters": params * (share if stage >= 3 else 1.0),
        "gradients": grads * (share if stage >= 2 else 1.0),
        "optimizer_states": optim * (share if stage >= 1 else 1.0),
        "activations": activation_bytes(cfg),
    }


def activation_bytes(cfg: Config) -> float:
    """Activations kept for the backward of one micro-batch: per pre-norm transformer block on
    N tokens of width C, about 34 * N * C bytes at 16 bits (Korthikanti et al. 2022, no N^2
    term with fused attention), doubled for fp32; a CSBlock counts as 1.5 blocks."""
    token_widths = get_spec(cfg.model.arch).activation_token_widths
    if token_widths is None:
        return float("nan")
    per_elem = 34 * (1 if cfg.train.bf16 else 2)
    return cfg.data.batch_size * sum(n * c for n, c in token_widths(cfg.model)) * per_elem
