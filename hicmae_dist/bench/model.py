"""`hicmae-dist bench model`: forward + backward of a shipped pretraining model, timed."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from hicmae_dist.bench.timing import PeakMemory, sync
from hicmae_dist.config import ModelConfig
from hicmae_dist.models import build_model
from hicmae_dist.models.info import example_inputs
from hicmae_dist.models.macs import macs


def bench_model(
    cfg: ModelConfig,
    batch: int = 2,
    steps: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time forward + backward of the pretraining model (fp32, train mode) on random inputs and
    the spec's masks: medians over `steps` timed steps after `warmup` untimed ones, and the
    peak memory of all of them (see PeakMemory)."""
    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError("bench: need batch >= 1, steps >= 1, warmup >= 0")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = build_model(cfg).to(device).train()
    video, audio = example_inputs(cfg, batch, device, torch.Generator().manual_seed(seed))
    video_mask, audio_mask = (m.to(device) for m in model.make_masks(batch, torch.Generator().manual_seed(seed)))
    forward_s, step_s = [], []
    with PeakMemory(device) as memory:
        for i in range(warmup + steps):
            model.zero_grad(set_to_none=True)
            sync(device)
            t0 = time.perf_counter()
            out = model(video, audio, video_mask, audio_mask)
            sync(device)
            t1 = time.perf_counter()
            out["loss"].backward()
            sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                forward_s.append(t1 - t0)
                step_s.append(t2 - t0)
    step = statistics.median(step_s)
    fwd_macs = sum(macs(cfg, "pretrain").values())
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": batch,
        "steps": steps,
        "warmup": warmup,
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_ms": 1e3 * statistics.median(forward_s),
        "forward_backward_ms": 1e3 * step,
        "forward_backward_ms_all": [round(1e3 * s, 2) for s in step_s],
        "samples_per_s": batch / step,
        "forward_macs_per_sample": fwd_macs,
        # forward + backward ~ 3 forward passes, 2 FLOPs per MAC
        "achieved_gflops": 3 * 2 * fwd_macs * batch / step / 1e9,
        "peak_memory_bytes": memory.delta,
        "memory_method": memory.method,
        "loss": float(out["loss"].detach()),
    }


def format_bench(name: str, r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"model: {name} pretraining, fp32, batch {r['batch']}, device {r['device']} ({r['threads']} threads)",
            f"parameters: {r['parameters']}",
            f"forward: {r['forward_ms']:.1f} ms (median of {r['steps']} after {r['warmup']} warm-up)",
            f"forward + backward: {r['forward_backward_ms']:.1f} ms (median; all: {r['forward_backward_ms_all']})",
            f"throughput: {r['samples_per_s']:.2f} samples/s, about {r['achieved_gflops']:.1f} GFLOP/s "
            f"(3 x {r['forward_macs_per_sample'] / 1e9:.2f} G forward MACs x 2 per sample)",
            f"peak memory: {r['peak_memory_bytes'] / 2**20:.1f} MiB ({r['memory_method']})",
        ]
    )
