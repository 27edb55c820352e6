"""Faults a week-long job meets: a crash in the middle of a save, non-finite losses."""

import json
import os

import pytest
import torch

from hicmae_dist.config import load_config
from hicmae_dist.train import checkpoint
from hicmae_dist.train import pretrain as pretrain_mod
from hicmae_dist.train.rundir import RunDir
from tests.support import run_ranks

TINY = ["model.width=32", "model.decoder_width=32", "data.batch_size=2", "data.num_workers=0"]


def _weights(engine):
    return {k: v.clone() for k, v in engine.module.state_dict().items()}


def test_crash_during_save_leaves_previous_checkpoint_current(engine, tmp_path, monkeypatch):
    good = _weights(engine)
    checkpoint.save_checkpoint(engine, tmp_path, 1, {"config_hash": "h"}, keep=2)
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)

    real_save = engine.save_checkpoint

    def crash_after_writing(save_dir, tag, **kw):
        real_save(save_dir, tag=tag, **kw)  # files of the new checkpoint are on disk...
        raise OSError("node lost power")  # ...but the save never completes

    monkeypatch.setattr(engine, "save_checkpoint", crash_after_writing)
    with pytest.raises(OSError, match="node lost power"):
        checkpoint.save_checkpoint(engine, tmp_path, 2, {"config_hash": "h"}, keep=2)
    monkeypatch.undo()

    latest = RunDir(tmp_path).latest_checkpoint()
    assert latest.name == "step00000001"
    assert (tmp_path / "checkpoints" / ".tmp-step00000002").exists()  # the torn save, never current
    state = checkpoint.load_checkpoint(engine, latest)
    assert state["step"] == 1
    for k, v in engine.module.state_dict().items():
        assert torch.equal(v, good[k]), k

    checkpoint.save_checkpoint(engine, tmp_path, 2, {"config_hash": "h"}, keep=1)  # the next save cleans up
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert names == ["step00000002"]


class _NanAt(torch.nn.Module):
    """Wraps the model; makes the loss NaN on the chosen forward calls (1-based)."""

    def __init__(self, model, bad_calls):
        super().__init__()
        self.model, self.bad_calls, self.calls = model, set(bad_calls), 0

    def param_groups(self, weight_decay):
        return self.model.param_groups(weight_decay)

    def make_masks(self, batch_size, generator=None):
        return self.model.make_masks(batch_size, generator)

    def forward(self, *args):
        self.calls += 1
        out = self.model(*args)
        if self.calls in self.bad_calls:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out


def _pretrain_with_nans(monkeypatch, shards, run_dir, bad_calls, steps):
    from hicmae_dist.train import engine as engine_mod

    real = engine_mod.build_model_for_engine
    monkeypatch.setattr(pretrain_mod, "build_model_for_engine", lambda cfg, ws: _NanAt(real(cfg, ws), bad_calls))
    cfg = load_config(
        "tiny-cpu",
        TINY
        + [
            f"train.steps={steps}",
            "train.warmup_steps=1",
            "train.log_every=1",
            "train.checkpoint_every=2",
            "train.max_nonfinite_in_a_row=3",
            f"data.shards={shards}",
            "tracking.enabled=false",
        ],
    )
    return pretrain_mod.pretrain(cfg, run_dir, progress=False)


def test_nonfinite_loss_is_skipped_and_counted(engine, shards, tmp_path, monkeypatch):
    summary = _pretrain_with_nans(monkeypatch, shards, tmp_path, bad_calls=[3, 5], steps=4)
    assert summary["steps"] == 4 and summary["nonfinite_skipped"] == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_nonfinite_losses_in_a_row_stop_the_run_with_a_checkpoint(engine, shards, tmp_path, monkeypatch):
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row at step 2"):
        _pretrain_with_nans(monkeypatch, shards, tmp_path, bad_calls=[3, 4, 5], steps=6)
    assert RunDir(tmp_path).latest_checkpoint().name == "step00000002"


def _pretrain_rank(
    rank: int, world_size: int, port: int, shards: str, run_dir: str, grad_accum: int, bad_calls: list, queue
) -> None:
    """One of 2 gloo ranks pretraining; rank 1's model returns NaN losses on `bad_calls`."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from hicmae_dist.train import engine as engine_mod

    real, wrapped = engine_mod.build_model_for_engine, []

    def build(cfg, ws):
        wrapped.append(_NanAt(real(cfg, ws), bad_calls if rank == 1 else []))
        return wrapped[-1]

    pretrain_mod.build_model_for_engine = build
    cfg = load_config(
        "tiny-cpu",
        TINY
        + [
            "train.steps=4",
            "train.warmup_steps=1",
            "train.log_every=1",
            "train.checkpoint_every=2",
            f"train.grad_accum={grad_accum}",
            f"data.shards={shards}",
            "tracking.enabled=false",
        ],
    )
    summary = pretrain_mod.pretrain(cfg, run_dir, progress=False)
    weights = {k: v.numpy().copy() for k, v in wrapped[0].model.state_dict().items()}  # plain pickles
    queue.put((rank, summary["steps"], summary["nonfinite_skipped"], wrapped[0].calls, weights))


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum,bad_calls", [(1, [3]), (2, [4])], ids=["grad_accum1", "grad_accum2-second-micro"])
def test_nan_on_one_rank_skips_the_step_on_both(shards, tmp_path, grad_accum, bad_calls):
    """ZeRO-2 over gloo, a NaN loss on rank 1 only (step 3; with grad_accum 2 in its second
    micro-batch): both ranks skip that step, nothing hangs, the weights stay identical and both
    finish 4 steps with one skip."""
    results = sorted(
        run_ranks(_pretrain_rank, 2, (str(shards), str(tmp_path), grad_accum, bad_calls), expect=2, timeout_s=300)
    )
    (_, steps0, skipped0, calls0, w0), (_, steps1, skipped1, calls1, w1) = results
    assert (steps0, skipped0) == (steps1, skipped1) == (4, 1)
    assert calls0 == calls1 == 5 * grad_accum  # 4 steps + the refused one, every micro-batch run on both
    assert w0.keys() == w1.keys() and all((w0[k] == w1[k]).all() for k in w0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_losses_reach_the_host_once_per_log_window(engine, shards, tmp_path, monkeypatch):
    """20 steps, log_every 10: the trainer's only host reads of floating-point values (losses,
    norms, flags) are the step decision (one `comm.agree` per step), the window (one per log
    line) and the save's space check (one per checkpoint); no per-step `.item()`. (Integer reads,
    such as the masks' token counts, happen on host tensors: masking.split_indices_to.)"""
    import sys

    reads = {"item": 0, "__float__": 0, "__bool__": 0, "tolist": 0}

    def counted(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if self.is_floating_point() and "hicmae_dist" in sys._getframe(1).f_code.co_filename:
                reads[name] += 1
            return real(self, *args, **kwargs)

        return wrapper

    for name in reads:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    cfg = load_config(
        "tiny-cpu",
        TINY
        + [
            "train.steps=20",
            "train.warmup_steps=2",
            "train.log_every=10",
            "train.checkpoint_every=100",
            f"data.shards={shards}",
            "tracking.enabled=false",
        ],
    )
    summary = pretrain_mod.pretrain(cfg, tmp_path, progress=False)
    monkeypatch.undo()
    assert summary["steps"] == 20
    assert reads["item"] + reads["__float__"] + reads["__bool__"] <= 3, reads
    assert reads["tolist"] == 20 + 2 + 1, reads  # + the final save's free-space check (one all-reduce)


def test_a_metrics_line_torn_by_a_crash_is_skipped_on_resume_and_by_jobs(tmp_path, caplog):
    run = RunDir(tmp_path)
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    run.metrics.write_text(text + '{"step": 4, "lo')  # the crash hit the write of step 4's row
    assert run.metrics_rows(upto_step=2) == rows[:2]
    assert run.metrics_rows(upto_step=10) == rows
    assert "line 4 is torn" in caplog.text
    assert run.progress()["step"] == 3 and run.progress()["loss"] == rows[-1]["loss"]
