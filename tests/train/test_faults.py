"""Faults a week-long job meets: a crash in the middle of a save, non-finite losses."""
import json
import os

import pytest
import torch

from hicmae_dist.config import load_config
from hicmae_dist.train import checkpoint, pretrain as pretrain_mod

TINY = ["model.width=32", "model.decoder_width=32", "data.batch_size=2", "data.num_workers=0"]


@pytest.fixture(scope="module")
def engine():
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/hicmae-dist/torch_extensions"))
    from hicmae_dist.launch.dist import init_distributed
    from hicmae_dist.train.engine import build_engine, build_model_for_engine

    init_distributed()
    cfg = load_config("tiny-cpu", TINY)
    return build_engine(build_model_for_engine(cfg, 1), cfg, 1)


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

    latest = checkpoint.latest_checkpoint(tmp_path)
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
    cfg = load_config("tiny-cpu", TINY + [f"train.steps={steps}", "train.warmup_steps=1", "train.log_every=1",
                                          "train.checkpoint_every=2", "train.max_nonfinite_in_a_row=3",
                                          f"data.shards={shards}", "tracking.enabled=false"])
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
    assert checkpoint.latest_checkpoint(tmp_path).name == "step00000002"
