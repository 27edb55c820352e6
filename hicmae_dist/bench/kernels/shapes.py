"""The shapes the models really call the ops with, traced from one pretraining forward.

`model_calls(models)` runs each shipped model's pretraining forward at batch 1 with the hot ops
wrapped by recorders (attention replaced by a shape-only stub, the token ops run for real) and
returns one entry per distinct call with how often one forward makes it. Both fusion layouts
are traced (execution.pack_fusion off: dense calls; on: the packed varlen calls), so every shape a
run can produce is there. Nothing here restates the models' structure: a model change shows up.

Cheap (seconds): the ops' shapes depend on the token counts, heads and widths only, so the
trace runs a narrow copy of each model (head dim ENC_D in the encoders and fusion, DEC_D in
the decoders: distinct, so each call maps back to its real head dim and width) on one thread.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import ExitStack
from unittest import mock

import torch

from hicmae_dist.config import ExecutionConfig, load_config
from hicmae_dist.models.info import MODELS, example_inputs

ENC_D, DEC_D = 8, 4
QUICK_MODELS, QUICK_BATCH = ("hicmae-b", "cavmae-base"), 2


def chosen_models(s) -> tuple[str, ...]:
    """--models, else every shipped model (--quick: one HiCMAE and the CAV-MAE)."""
    return tuple(s.args.models or (QUICK_MODELS if s.quick else MODELS))


def preset_batch(model: str) -> int:
    """The per-GPU batch of the model's preset (data.batch_size)."""
    return load_config(MODELS[model]).data.batch_size


def batch_of(model: str, s) -> int:
    """--model-batch, else the preset's per-GPU batch (--quick: 2)."""
    return s.args.model_batch or (QUICK_BATCH if s.quick else preset_batch(model))


@functools.cache
def model_calls(models: tuple[str, ...]) -> tuple[dict, ...]:
    """Distinct op calls of one pretraining forward at batch 1, per model:
    {"model", "op", "count", ...shapes}, op one of
      attention:  layout "dense" | "varlen", heads, head_dim, seqlens_q / seqlens_k (one entry
                  per segment at batch 1; dense: the single (Nq,) / (Nk,)),
      gather_visible: tokens N, kept Nv, width C, grad (x requires grad),
      assemble_decoder_tokens: visible Nv, masked Nm, positions N, width C, grad flags,
      patch_norm: rows R (at batch 1), frames F, pixels S, channels C, frame_diff.
    `count` is per forward; with both fusion layouts traced, the larger of the two."""
    from hicmae_dist.models import blocks, build_model, targets
    from hicmae_dist.models.cavmae import model as cavmae
    from hicmae_dist.models.hicmae import model as hicmae

    out: dict[tuple, dict] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread beats two contending ones
    try:
        for name in models:
            real = load_config(MODELS[name]).model
            for pack in (False, True):
                narrow = dataclasses.replace(real, width=real.heads * ENC_D, decoder_width=real.decoder_heads * DEC_D)
                if narrow.width == narrow.decoder_width:
                    raise RuntimeError(f"{name}: the narrow copy cannot tell encoder and decoder widths apart")
                width = {narrow.width: real.width, narrow.decoder_width: real.decoder_width}
                head_dim = {ENC_D: real.width // real.heads, DEC_D: real.decoder_width // real.decoder_heads}
                calls: list[tuple] = []
                with ExitStack() as stack:
                    for module, fn_name, recorder in _recorders(
                        calls, blocks, cavmae, hicmae, targets, width, head_dim
                    ):
                        stack.enter_context(mock.patch.object(module, fn_name, recorder(getattr(module, fn_name))))
                    torch.manual_seed(0)
                    model = build_model(narrow, ExecutionConfig(pack_fusion=pack))
                    video, audio = example_inputs(narrow, 1)
                    model(video, audio, *model.make_masks(1, torch.Generator().manual_seed(0)))
                counts: dict[tuple, int] = {}
                for c in calls:
                    counts[c] = counts.get(c, 0) + 1
                for c, n in counts.items():
                    key = (name, c)
                    if key not in out or out[key]["count"] < n:
                        out[key] = {"model": name, **dict(c), "count": n}
    finally:
        torch.set_num_threads(threads)
    return tuple(out.values())


def _recorders(calls, blocks, cavmae, hicmae, targets, width, head_dim):
    """(module, function name, wrapper factory) for every op the models call."""

    def attention(_real):
        def stub(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, key_padding_mask=None, **_):
            if key_padding_mask is not None:
                raise RuntimeError("the models pass no key padding mask; teach bench/kernels/shapes.py about it")
            if cu_seqlens_q is None:
                rec = (
                    ("op", "attention"),
                    ("layout", "dense"),
                    ("heads", q.shape[1]),
                    ("head_dim", head_dim[q.shape[-1]]),
                    ("seqlens_q", (q.shape[2],)),
                    ("seqlens_k", (k.shape[2],)),
                )
            else:
                rec = (
                    ("op", "attention"),
                    ("layout", "varlen"),
                    ("heads", q.shape[1]),
                    ("head_dim", head_dim[q.shape[-1]]),
                    ("seqlens_q", tuple(cu_seqlens_q.diff().tolist())),
                    ("seqlens_k", tuple(cu_seqlens_k.diff().tolist())),
                )
            calls.append(rec)
            return q.new_zeros(q.shape)  # shape-only: the forward needs no real attention

        return stub

    def gather(real):
        def wrapper(x, idx):
            calls.append(
                (
                    ("op", "gather_visible"),
                    ("tokens", x.shape[1]),
                    ("kept", idx.shape[1]),
                    ("width", width.get(x.shape[2], x.shape[2])),
                    ("grad", x.requires_grad),
                )
            )
            return real(x, idx)

        return wrapper

    def assemble(real):
        def wrapper(visible, mask_token, pos, visible_idx, masked_idx):
            calls.append(
                (
                    ("op", "assemble_decoder_tokens"),
                    ("visible", visible.shape[1]),
                    ("masked", masked_idx.shape[1]),
                    ("positions", pos.shape[0]),
                    ("width", width[visible.shape[2]]),
                    ("grad", (visible.requires_grad, mask_token.requires_grad, pos.requires_grad)),
                )
            )
            return real(visible, mask_token, pos, visible_idx, masked_idx)

        return wrapper

    def patch_norm(real):
        def wrapper(x, frame_diff=False):
            calls.append(
                (
                    ("op", "patch_norm"),
                    ("rows", x.shape[0]),
                    ("frames", x.shape[1]),
                    ("pixels", x.shape[2]),
                    ("channels", x.shape[3]),
                    ("frame_diff", bool(frame_diff)),
                )
            )
            return real(x, frame_diff)

        return wrapper

    return [
        (blocks, "attention", attention),
        (cavmae, "attention", attention),
        (hicmae, "gather_visible", gather),
        (cavmae, "gather_visible", gather),
        (hicmae, "assemble_decoder_tokens", assemble),
        (targets, "patch_norm", patch_norm),
    ]
