"""Target normalisation: hicmae_dist.ops.patch_norm (native: C++ on the CPU, a fused two-pass
CUDA kernel) against its PyTorch maths, over the HiCMAE targets' calls (shapes.py) at
each preset's batch: video x (B * 800, 2, 256, 3) with frame differences, audio
(B * 128, 1, 256, 1). Forward only (targets are computed without gradient), fp32 (the targets
are built from `.float()` pixels whatever the training precision). Memory-bound: GB/s of
the compulsory traffic, read x once and write y once (the CUDA kernel reads twice).

    python -m kernels.patch_norm --quick
"""

from __future__ import annotations

import math

import torch

from hicmae_dist.bench import report
from hicmae_dist.bench.kernels import harness
from hicmae_dist.bench.kernels.shapes import batch_of, chosen_models, model_calls
from hicmae_dist.bench.kernels.tokens import _native_error
from hicmae_dist.ops import tokens as ops_tokens

NAME = "patch_norm"
BACKENDS = ("native", "reference")


def make_call(shape: dict, backend: str, s: harness.Settings):
    if backend == "native" and (why := _native_error()):
        raise harness.Unavailable(why)
    g = torch.Generator(device=s.device).manual_seed(0)
    x = torch.randn(shape["rows"], shape["frames"], shape["pixels"], shape["channels"], generator=g, device=s.device)
    fn = torch.ops.hicmae_dist.patch_norm if backend == "native" else ops_tokens.patch_norm_reference
    return lambda: fn(x, shape["frame_diff"])


def run(s: harness.Settings) -> dict:
    records = []
    for call in model_calls(chosen_models(s)):
        if call["op"] != "patch_norm":
            continue
        batch = batch_of(call["model"], s)
        shape = {k: v for k, v in call.items() if k not in ("op", "model", "count")}
        shape.update(rows=batch * call["rows"], batch=batch, calls_per_step=call["count"])
        numel = math.prod(shape[k] for k in ("rows", "frames", "pixels", "channels"))
        case = f"{call['model']} {shape['frames']}x{shape['pixels']}x{shape['channels']}" + (
            " frame-diff" if shape["frame_diff"] else ""
        )
        for backend in BACKENDS:
            records.append(
                harness.measure(
                    s,
                    op=NAME,
                    case=case,
                    backend=backend,
                    direction="fwd",
                    make=lambda: make_call(shape, backend, s),
                    shape=shape,
                    dtype="float32",
                    bytes_=2 * 4 * numel,
                )
            )
    return {"records": records}


def shape_text(r: dict) -> str:
    return f"R{r['shape']['rows']}"


def markdown(section: dict) -> str:
    return "Forward only, fp32; GB/s of read x + write y.\n\n" + report.timing_table(section["records"], shape_text)


def add_arguments(p) -> None:
    """No options of its own: --models and --model-batch choose the calls."""


def main(argv=None, prog: str | None = None) -> int:
    return harness.main(argv, (NAME,), prog)


if __name__ == "__main__":
    raise SystemExit(main())
