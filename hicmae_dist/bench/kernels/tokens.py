"""Token gather and decoder re-assembly: the native kernels of hicmae_dist._C against the PyTorch
indexing they replace, over the models' calls (shapes.py) at each preset's batch.

  gather_visible           x (B, N, C), idx (B, Nv) -> x[b, idx[b]] (B, Nv, C): the encoders'
                           visible tokens, the masked targets, CAV-MAE's un-shuffle
  assemble_decoder_tokens  cat([visible + pos[visible_idx], mask_token + pos[masked_idx]], 1)
                           (B, Nv + Nm, C): the HiCMAE decoders' input
Backends: "native" (the torch.ops.hicmae_dist ops: C++ on the CPU, CUDA kernels when the
extension was built with CUDA; "unavailable" when not built) and "reference" (PyTorch).
Directions fwd, bwd, fwd+bwd where the model's input needs a gradient, else fwd only (the
targets). Memory-bound: GB/s of the compulsory traffic (each input byte read once, each output
byte written once; formulas in `io_bytes`).

    python -m kernels.tokens --quick
"""

from __future__ import annotations

import torch

from hicmae_dist.bench import report
from hicmae_dist.bench.kernels import harness
from hicmae_dist.bench.kernels.shapes import batch_of, chosen_models, model_calls
from hicmae_dist.ops import gather as ops_gather
from hicmae_dist.ops import tokens as ops_tokens

NAME = "tokens"
BACKENDS = ("native", "reference")
OPS = ("gather_visible", "assemble_decoder_tokens")


def io_bytes(call: dict, batch: int, direction: str, elem: int) -> int:
    """gather fwd: read B Nv C, write B Nv C, idx B Nv int64; bwd: read the gradient B Nv C
    and idx, write the zero-filled (B, N, C). assemble fwd: read visible B Nv C, pos N C,
    mask token C, both idx, write B N C; bwd: read the gradient B N C, write what needs one
    (pos N C, mask token C; the visible part's gradient is a view)."""
    C = call["width"]
    if call["op"] == "gather_visible":
        n, nv = call["tokens"], call["kept"]
        fwd = 2 * elem * batch * nv * C + 8 * batch * nv
        bwd = elem * batch * (nv + n) * C + 8 * batch * nv
    else:
        n = call["visible"] + call["masked"]
        fwd = elem * (batch * call["visible"] * C + call["positions"] * C + C + batch * n * C) + 8 * batch * n
        _, mask_grad, pos_grad = call["grad"]
        bwd = elem * (batch * n * C + (call["positions"] * C if pos_grad else 0) + (C if mask_grad else 0))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def _native_error() -> str | None:
    if not ops_gather.native_available():
        return f"hicmae_dist._C is not built ({ops_gather._NATIVE_ERROR}); `pip install -e .` builds it"
    if not ops_tokens._NATIVE:
        return "hicmae_dist._C predates assemble_decoder_tokens / patch_norm: rebuild it"
    return None


def make_call(call: dict, batch: int, backend: str, direction: str, s: harness.Settings):
    if backend == "native" and (why := _native_error()):
        raise harness.Unavailable(why)
    g = torch.Generator(device=s.device).manual_seed(0)
    dev, dt, C = s.device, s.dtype, call["width"]

    def random_split(n: int, k: int):  # a random mask per sample: k kept indices, the others; ascending
        order = torch.rand(batch, n, generator=g, device=dev).argsort(dim=1)
        return order[:, :k].sort(dim=1).values, order[:, k:].sort(dim=1).values

    if call["op"] == "gather_visible":
        x = torch.randn(batch, call["tokens"], C, generator=g, device=dev, dtype=dt).requires_grad_(direction != "fwd")
        idx = random_split(call["tokens"], call["kept"])[0]
        fn = torch.ops.hicmae_dist.gather_visible if backend == "native" else ops_gather.gather_visible_reference
        args, leaves = (x, idx), (x,)
    else:
        n = call["positions"]
        vis_idx, mask_idx = random_split(n, call["visible"])
        needs = call["grad"] if direction != "fwd" else (False, False, False)
        visible = torch.randn(batch, call["visible"], C, generator=g, device=dev, dtype=dt).requires_grad_(needs[0])
        mask_token = torch.randn(C, generator=g, device=dev, dtype=dt).requires_grad_(needs[1])
        pos = torch.randn(n, C, generator=g, device=dev, dtype=dt).requires_grad_(needs[2])
        fn = (
            torch.ops.hicmae_dist.assemble_decoder_tokens
            if backend == "native"
            else ops_tokens.assemble_decoder_tokens_reference
        )
        args = (visible, mask_token, pos, vis_idx, mask_idx)
        leaves = tuple(t for t, need in zip(args[:3], needs) if need)
    return harness.directional(lambda: fn(*args), leaves, direction)


def case_name(call: dict) -> str:
    if call["op"] == "gather_visible":
        return f"{call['model']} gather {call['tokens']}->{call['kept']} C{call['width']}"
    return f"{call['model']} assemble {call['visible']}+{call['masked']} C{call['width']}"


def run(s: harness.Settings) -> dict:
    elem = torch.finfo(s.dtype).bits // 8
    records = []
    for call in model_calls(chosen_models(s)):
        if call["op"] not in OPS:
            continue
        batch = batch_of(call["model"], s)
        grad = call["grad"] if call["op"] == "gather_visible" else any(call["grad"])
        shape = {k: v for k, v in call.items() if k not in ("model", "count")}
        shape.update(batch=batch, calls_per_step=call["count"])
        for backend in BACKENDS:
            for direction in harness.DIRECTIONS if grad else ("fwd",):
                records.append(
                    harness.measure(
                        s,
                        op=NAME,
                        case=case_name(call),
                        backend=backend,
                        direction=direction,
                        make=lambda: make_call(call, batch, backend, direction, s),
                        shape=shape,
                        dtype=str(s.dtype)[6:],
                        bytes_=io_bytes(call, batch, direction, elem),
                    )
                )
    return {"records": records}


def shape_text(r: dict) -> str:
    return f"B{r['shape']['batch']}"


def markdown(section: dict) -> str:
    return (
        "Memory-bound: GB/s of the compulsory traffic (hicmae_dist/bench/kernels/tokens.py `io_bytes`).\n\n"
        + report.pivot_table(section["records"], shape_text, "gbps")
        + "\n\nEvery record:\n\n"
        + report.timing_table(section["records"], shape_text)
    )


def add_arguments(p) -> None:
    """No options of its own: --models and --model-batch choose the calls."""


def main(argv=None, prog: str | None = None) -> int:
    return harness.main(argv, (NAME,), prog)


if __name__ == "__main__":
    raise SystemExit(main())
