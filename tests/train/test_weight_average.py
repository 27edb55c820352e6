"""Checkpoint weight averaging over ZeRO-sharded checkpoints: 2 CPU ranks over gloo, a tiny
model, one step per "epoch", a checkpoint after each with only the newest kept by retention;
the average of epochs start..end equals the arithmetic mean of the whole-model weights gathered
at those epochs' ends, tensor by tensor."""

import os

import pytest
import torch

from hicmae_dist.config import load_config
from tests.support import run_ranks

STAGES, EPOCHS = (2, 3), 3
RANGES = ([0, 2], [1, 2])  # k = 3 and k = 2 epochs


def _whole_weights(engine) -> dict[str, torch.Tensor]:
    """Every rank calls it: the module's full fp32 weights (ZeRO-3 gathers its partitions)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def _rank(rank: int, world_size: int, port: int, out_dir: str, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from pathlib import Path

    from hicmae_dist.comm import init_distributed
    from hicmae_dist.train.checkpoint import save_checkpoint
    from hicmae_dist.train.engine import build_engine, build_model_for_engine
    from hicmae_dist.train.finetune.averaging import average_weights, epoch_checkpoints, keeps_for_average
    from hicmae_dist.train.rundir import RunDir
    from hicmae_dist.train.step import train_step

    init_distributed()
    for stage in STAGES:
        cfg = load_config(
            "tiny-cpu",
            [
                f"train.zero_stage={stage}",
                "data.batch_size=1",
                "model.width=32",
                "model.decoder_width=32",
                "model.contrastive_weight=0",
            ],
        )
        torch.manual_seed(0)
        engine = build_engine(build_model_for_engine(cfg, world_size), cfg, world_size)
        for group in engine.optimizer.param_groups:
            group["lr"] = 1e-2  # weights that move visibly between epochs
        run = RunDir(Path(out_dir) / f"zero{stage}")
        g = torch.Generator().manual_seed(rank)
        m, per_epoch = cfg.model, []
        for epoch in range(EPOCHS):
            video = torch.randn(1, 3, m.num_frames, m.image_size, m.image_size, generator=g)
            audio = torch.randn(1, 1, m.audio_frames, m.mel_bins, generator=g)
            batch = (video, audio, *engine.module.make_masks(1, generator=g))
            train_step(engine, 1, lambda: batch, lambda b: {"loss": engine(*b)["loss"]}, stop_requested=False)
            per_epoch.append(_whole_weights(engine))
            save_checkpoint(
                engine,
                run.path,
                epoch + 1,
                {"epoch": epoch + 1, "batch_in_epoch": 0},
                keep=1,
                keep_also=keeps_for_average(list(RANGES[0])),
            )
        if rank == 0:
            for start, end in RANGES:
                averaged = average_weights(epoch_checkpoints(run, [start, end]))
                want = {k: torch.stack([w[k] for w in per_epoch[start : end + 1]]).mean(0) for k in per_epoch[0]}
                worst = max((averaged[k] - want[k]).abs().max().item() for k in want)
                moved = max((per_epoch[start][k] - per_epoch[end][k]).abs().max().item() for k in want)
                queue.put(
                    (
                        stage,
                        (start, end),
                        sorted(averaged) == sorted(want),
                        worst,
                        moved,
                        len(run.complete_checkpoints()),
                    )
                )
        torch.distributed.barrier()


@pytest.mark.slow
def test_average_of_zero2_and_zero3_epoch_checkpoints_is_the_mean(tmp_path):
    results = run_ranks(_rank, 2, (str(tmp_path),), expect=len(STAGES) * len(RANGES), timeout_s=900)
    assert sorted((r[0], r[1]) for r in results) == [(s, tuple(r)) for s in STAGES for r in RANGES]
    for stage, epochs, same_keys, worst, moved, kept in results:
        assert same_keys, (stage, epochs)
        assert worst < 1e-6, (stage, epochs, worst)  # the mean, tensor by tensor
        assert moved > 1e-3, (stage, epochs, moved)  # the epochs differ: a wrong pick would show
        assert kept == EPOCHS  # retention kept 1 newest, the averaging range kept the rest


def test_range_is_validated_and_a_missing_epoch_is_named(tmp_path):
    import json

    from hicmae_dist.config import ConfigError, load_config
    from hicmae_dist.train.finetune.averaging import ends_epoch_in, epoch_checkpoints
    from hicmae_dist.train.rundir import RunDir

    for bad in ("[2, 1]", "[0, 10]", "[-1, 2]", "[3]"):
        with pytest.raises(ConfigError, match=r"finetune.weight_average: expected \[\] \(off\) or \[start, end\]"):
            load_config("finetune-cavmae", ["finetune.epochs=10", f"finetune.weight_average={bad}"]).validate()
    load_config("finetune-cavmae", ["finetune.epochs=10", "finetune.weight_average=[9, 9]"]).validate()
    # a checkpoint after epoch e has e + 1 in progress and none of its batches; a stop's closes none
    assert ends_epoch_in({"epoch": 3, "batch_in_epoch": 0}, [1, 2]) == 2
    assert ends_epoch_in({"epoch": 3, "batch_in_epoch": 4}, [1, 2]) is None
    assert ends_epoch_in({"epoch": 1, "batch_in_epoch": 0}, [1, 2]) is None  # closes epoch 0
    run = RunDir(tmp_path)
    for step, epoch in ((4, 2), (6, 3)):  # epochs 1 and 2 closed; epoch 0's checkpoint is gone
        run.checkpoint(RunDir.tag(step)).mkdir(parents=True)
        run.state_file(run.checkpoint(RunDir.tag(step))).write_text(json.dumps({"epoch": epoch, "batch_in_epoch": 0}))
    assert [p.name for p in epoch_checkpoints(run, [1, 2])] == ["step00000004", "step00000006"]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint closes epoch\(s\) \[0\] \(0-based\)"):
        epoch_checkpoints(run, [0, 2])
