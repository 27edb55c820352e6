"""Parameter and compute accounting, and a forward + backward benchmark, for the shipped models.

MACs come from hicmae_dist.models.macs (each family's count, by formula). Against SPEC.md's
"about 13.8 / 27.6 / 46.1 G MACs per fine-tune view" for HiCMAE T / S / B, it gives
13.81 / 27.65 / 46.11 G: the same quantity (the video encoder is about 70% of it); the
differences are rounding plus the classifier head (12 k MACs).
"""
from __future__ import annotations

import re
import resource
import statistics
import time
from collections import Counter
from typing import Any

import torch
import torch.nn as nn

from hicmae_dist.config import ModelConfig, load_config
from hicmae_dist.models import build_finetune_model, build_model, get_spec
from hicmae_dist.models.macs import macs

MODELS = {"hicmae-t": "hicmae-t-vox2", "hicmae-s": "hicmae-s-vox2", "hicmae-b": "hicmae-b-vox2",
          "cavmae-base": "cavmae-base-vox2"}  # name -> preset
SPEC_FINETUNE_GMACS = {"hicmae-t": 13.8, "hicmae-s": 27.6, "hicmae-b": 46.1}  # SPEC.md 1, 'Sizes'


def model_config(name: str) -> ModelConfig:
    """The ModelConfig of a shipped model name (hicmae-t, hicmae-s, hicmae-b, cavmae-base)."""
    if name not in MODELS:
        raise ValueError(f"model {name!r}: expected one of {', '.join(MODELS)}")
    return load_config(MODELS[name]).model


# --- parameters --------------------------------------------------------------------------------

def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """{"total", "trainable", "components": {top-level module or parameter: count}}."""
    components: Counter[str] = Counter()
    for name, p in model.named_parameters():
        components[name.split(".")[0]] += p.numel()
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "components": dict(components)}


# --- the `info` report ---------------------------------------------------------------------------

def _build(cfg: ModelConfig, finetune: bool, num_classes: int, device: str = "meta") -> nn.Module:
    with torch.device(device):
        return build_finetune_model(cfg, num_classes) if finetune else build_model(cfg)


def _g(n: int) -> str:
    return f"{n / 1e9:.2f} G"


def info_report(name: str, finetune: bool = False, num_classes: int | None = None) -> str:
    """The text `hicmae-dist info` prints."""
    cfg = model_config(name)
    num_classes = num_classes or get_spec(cfg.arch).default_classes
    model = _build(cfg, finetune, num_classes)  # meta device: shapes only, no memory
    counts = parameter_counts(model)
    what = f"fine-tuning, {num_classes} classes" if finetune else "pretraining"
    lines = [f"model: {name} ({type(model).__name__}, {what}; preset {MODELS[name]})",
             f"total parameters: {counts['total']}",
             f"trainable parameters: {counts['trainable']}",
             "parameters by component:"]
    width = max(map(len, counts["components"]))
    lines += [f"  {k:<{width}}  {v:>12,}" for k, v in counts["components"].items()]
    lines.append("multiply-accumulates per sample (linear layers, patch-embedding convolutions, attention matmuls):")
    for kind, label in (("pretrain", "pretraining (masked)"), ("finetune", "fine-tuning (one view)")):
        parts = macs(cfg, kind, num_classes)
        total = sum(parts.values())
        spec = SPEC_FINETUNE_GMACS.get(name) if kind == "finetune" else None
        note = f"   (SPEC.md: about {spec} G)" if spec else ""
        lines.append(f"  {label}: {_g(total)}  = {total}{note}")
        lines += [f"    {k:<{width}}  {_g(v):>10}" for k, v in parts.items() if v]
    return "\n".join(lines)


# --- benchmark -------------------------------------------------------------------------------------

def example_inputs(cfg: ModelConfig, batch: int, device: str | torch.device = "cpu",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (video, audio) of the shapes the pretraining model takes."""
    g = generator or torch.Generator().manual_seed(0)
    video_shape, audio_shape = get_spec(cfg.arch).input_shapes(cfg, batch)
    video = torch.randn(video_shape, generator=g)
    audio = torch.randn(audio_shape, generator=g)
    return video.to(device), audio.to(device)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory over a region. CUDA: max_memory_allocated after a reset (minus what was
    allocated at the start). CPU: the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) minus the resident set at the start; where the reset is not possible,
    the growth of ru_maxrss, which misses peaks below an earlier one."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        self.start = (_status_kb("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "peak RSS (VmHWM) - RSS at start"
        except OSError:
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss growth (lower bound)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("peak RSS"):
            self.peak = (_status_kb("VmHWM") or 0) * 1024
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.delta = max(self.peak - self.start, 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(cfg: ModelConfig, batch: int = 2, steps: int = 5, warmup: int = 1,
                device: str | torch.device | None = None, seed: int = 0) -> dict[str, Any]:
    """Time forward + backward of the pretraining model (fp32, train mode) on random inputs and
    the spec's masks: medians over `steps` timed steps after `warmup` untimed ones, and the
    peak memory of all of them (see PeakMemory)."""
    from hicmae_dist.models import build_model

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
            _sync(device)
            t0 = time.perf_counter()
            out = model(video, audio, video_mask, audio_mask)
            _sync(device)
            t1 = time.perf_counter()
            out["loss"].backward()
            _sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                forward_s.append(t1 - t0)
                step_s.append(t2 - t0)
    step = statistics.median(step_s)
    fwd_macs = sum(macs(cfg, "pretrain").values())
    return {"device": str(device), "threads": torch.get_num_threads(), "batch": batch, "steps": steps,
            "warmup": warmup, "parameters": sum(p.numel() for p in model.parameters()),
            "forward_ms": 1e3 * statistics.median(forward_s), "forward_backward_ms": 1e3 * step,
            "forward_backward_ms_all": [round(1e3 * s, 2) for s in step_s],
            "samples_per_s": batch / step, "forward_macs_per_sample": fwd_macs,
            # forward + backward ~ 3 forward passes, 2 FLOPs per MAC
            "achieved_gflops": 3 * 2 * fwd_macs * batch / step / 1e9,
            "peak_memory_bytes": memory.delta, "memory_method": memory.method,
            "loss": float(out["loss"].detach())}


def format_bench(name: str, r: dict[str, Any]) -> str:
    return "\n".join([
        f"model: {name} pretraining, fp32, batch {r['batch']}, device {r['device']} ({r['threads']} threads)",
        f"parameters: {r['parameters']}",
        f"forward: {r['forward_ms']:.1f} ms (median of {r['steps']} after {r['warmup']} warm-up)",
        f"forward + backward: {r['forward_backward_ms']:.1f} ms (median; all: {r['forward_backward_ms_all']})",
        f"throughput: {r['samples_per_s']:.2f} samples/s, about {r['achieved_gflops']:.1f} GFLOP/s "
        f"(3 x {r['forward_macs_per_sample'] / 1e9:.2f} G forward MACs x 2 per sample)",
        f"peak memory: {r['peak_memory_bytes'] / 2 ** 20:.1f} MiB ({r['memory_method']})",
    ])
