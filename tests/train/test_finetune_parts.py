"""Fine-tuning pieces without a training run: the validation split, mixing, losses, layer decay,
dataset presets, the fold sampler and the protocol table."""

from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hicmae_dist.config import ConfigError, load_config
from hicmae_dist.data import downstream as ds
from hicmae_dist.eval import metrics as M
from hicmae_dist.eval.datasets import DATASETS
from hicmae_dist.models import build_finetune_model
from hicmae_dist.train.finetune.mixing import mix_batch, smooth_one_hot
from hicmae_dist.train.finetune.protocol import format_table, summarize
from hicmae_dist.train.finetune.sampling import EpochBatches
from hicmae_dist.train.finetune.task import ccc_loss, load_encoder_weights, resolve_task
from hicmae_dist.train.runtime import split_set_identity
from tests.support import run_ranks


def _items(subjects_clips: dict[str, int], root: Path, label_of=lambda i: i % 3) -> list[ds.DownstreamItem]:
    items, i = [], 0
    for subject, n in subjects_clips.items():
        for c in range(n):
            items.append(
                ds.DownstreamItem(root / "frames" / subject / f"{c:05d}", root / f"{subject}_{c}.wav", (label_of(i),))
            )
            i += 1
    return items


def test_validation_is_carved_by_subject_and_never_meets_test(tmp_path):
    train = _items({f"s{k:02d}": 3 for k in range(10)}, tmp_path)
    test = _items({f"t{k:02d}": 3 for k in range(3)}, tmp_path)
    fold = tmp_path / "splits" / "split01"
    ds.write_annotations(fold / "train.csv", train)
    ds.write_annotations(fold / "test.csv", test)
    splits, how = ds.load_fold(tmp_path / "splits", 1, val_fraction=0.2, seed=3)
    assert "carved from training: 2 of 10 training subjects" in how
    subjects = {name: {ds.subject_of(i) for i in items} for name, items in splits.items()}
    keys = {name: {str(i.frame_dir) for i in items} for name, items in splits.items()}
    assert len(subjects["val"]) == 2 and not subjects["val"] & subjects["train"]
    assert not keys["val"] & keys["test"] and not keys["train"] & keys["test"]
    assert len(keys["val"]) + len(keys["train"]) == 30  # every training clip used once
    # the same seed carves the same subjects, whatever the file order
    ds.write_annotations(fold / "train.csv", train[::-1])
    again, _ = ds.load_fold(tmp_path / "splits", 1, val_fraction=0.2, seed=3)
    assert {str(i.frame_dir) for i in again["val"]} == keys["val"]
    # no subject ids (in-the-wild sets): carved by clip
    _, _, how = ds.carve_validation(train, 0.1, subject=None)
    assert how == "3 of 30 training clips"


def test_a_val_file_that_overlaps_test_is_refused(tmp_path):
    train = _items({"a": 4, "b": 4}, tmp_path)
    test = _items({"c": 4}, tmp_path)
    fold = tmp_path / "splits" / "split01"
    ds.write_annotations(fold / "train.csv", train)
    ds.write_annotations(fold / "test.csv", test)
    ds.write_annotations(fold / "val.csv", test[:2])  # the releases' habit: select on test
    with pytest.raises(ValueError, match="in both the test and the val split.*refuses"):
        ds.load_fold(tmp_path / "splits", 1)
    ds.write_annotations(fold / "val.csv", train[:2])
    with pytest.raises(ValueError, match="both the train and the val split"):
        ds.load_fold(tmp_path / "splits", 1)
    with pytest.raises(FileNotFoundError, match="split02"):
        ds.load_fold(tmp_path / "splits", 2)


def test_dataset_subject_patterns_find_the_actor():
    def subject(name, path):
        return ds.subject_of(ds.DownstreamItem(Path(path), Path("x.wav"), (0,)), DATASETS[name].subject)

    assert subject("crema-d", "/data/crema-d/frames/1076_MTI_SAD_XX") == "1076"
    assert subject("ravdess", "/data/ravdess/Actor_12/01-01-05-02-01-02-12") == "12"
    assert subject("iemocap", "/data/iemocap/Ses03F_impro05_F012") == "Ses03F"
    assert subject("msp-improv", "/d/MSP-IMPROV-S05A-F03-S-MF02") == "F03"
    assert DATASETS["mafw"].subject is None and DATASETS["mafw"].num_outputs == 11
    assert DATASETS["werewolf-xl"].task == "regression" and DATASETS["werewolf-xl"].num_outputs == 3


def test_parse_folds():
    assert ds.parse_folds("1-3,5") == [1, 2, 3, 5] and ds.parse_folds("all", 4) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="numbered from 1"):
        ds.parse_folds("0-2")


def _ft(**kw):
    base = dict(mixup=0.8, cutmix=1.0, mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1, mix_video_only=False)
    return types.SimpleNamespace(**{**base, **kw})


def test_mixup_mixes_both_modalities_with_one_lambda():
    g = torch.Generator().manual_seed(0)  # lam is read off one element: a fixed draw keeps it well-conditioned
    video, audio = torch.rand(4, 3, 2, 8, 8, generator=g), torch.rand(4, 1, 16, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 1])
    rng = np.random.default_rng(0)
    v, a, target = mix_batch(video.clone(), audio.clone(), labels, 3, _ft(cutmix=0.0), rng)
    lam = float(((v - video.flip(0)) / (video - video.flip(0)))[0, 0, 0, 0, 0])
    assert torch.allclose(v, lam * video + (1 - lam) * video.flip(0), atol=1e-6)
    assert torch.allclose(a, lam * audio + (1 - lam) * audio.flip(0), atol=1e-6)
    smooth = smooth_one_hot(labels, 3, 0.1)
    assert smooth[0].tolist() == pytest.approx([0.1 / 3 + 0.9, 0.1 / 3, 0.1 / 3])
    assert torch.allclose(target, lam * smooth + (1 - lam) * smooth.flip(0))
    assert torch.allclose(target.sum(1), torch.ones(4))
    # the release's mixing: the audio is left alone
    v2, a2, _ = mix_batch(
        video.clone(), audio.clone(), labels, 3, _ft(cutmix=0.0, mix_video_only=True), np.random.default_rng(0)
    )
    assert torch.equal(a2, audio) and torch.allclose(v2, v)


def test_cutmix_cuts_the_same_fraction_from_both_modalities():
    for seed in range(5):
        video, audio = torch.rand(2, 3, 2, 40, 40), torch.rand(2, 1, 100, 8)
        v, a, target = mix_batch(
            video.clone(), audio.clone(), torch.tensor([0, 1]), 2, _ft(mixup=0.0), np.random.default_rng(seed)
        )
        pasted_v = (v != video)[0, 0, 0].float().mean().item()  # fraction of pixels from the other clip
        pasted_a = (a != audio)[0, 0, :, 0].float().mean().item()  # fraction of audio frames
        lam = 1 - pasted_v
        assert abs(pasted_a - pasted_v) <= 1 / 100 + 1e-9  # the same area, to one frame
        smooth = smooth_one_hot(torch.tensor([0, 1]), 2, 0.1)
        assert torch.allclose(target, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-6)


def test_ccc_loss_is_one_minus_lins_ccc():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(32, 2)), rng.normal(size=(32, 2)) + 0.5 * rng.normal(size=(32, 2))
    loss = ccc_loss(torch.tensor(pred), torch.tensor(target))
    assert float(loss) == pytest.approx(1 - M.ccc(pred, target).mean(), abs=1e-6)


def test_layer_decay_scales_follow_the_spec():
    # HiCMAE-S: encoders 10 deep, fusion 2: patch embed id 0 -> 0.75^13, block i -> 0.75^(12 - i),
    # fusion j -> 0.75^(2 - j), head and the rest 1
    with torch.device("meta"):
        model = build_finetune_model(load_config("hicmae-s-vox2").model, 6)
    groups = model.param_groups(0.05, layer_decay=0.75)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["video_encoder.patch_embed.weight"])] == pytest.approx(0.75**13)
    assert scale_of[id(named["audio_encoder.blocks.0.attn.qkv.weight"])] == pytest.approx(0.75**12)
    assert scale_of[id(named["video_encoder.blocks.9.mlp.fc1.weight"])] == pytest.approx(0.75**3)
    assert scale_of[id(named["fusion.audio_blocks.1.mlp.fc2.weight"])] == pytest.approx(0.75)
    assert scale_of[id(named["head.weight"])] == 1.0 and decay_of[id(named["head.bias"])] == 0.0
    assert len(scale_of) == len(named)  # every parameter in exactly one group
    from hicmae_dist.train.engine import set_lr

    opt = torch.optim.AdamW([{**g, "params": [torch.zeros(1, requires_grad=True)]} for g in groups])
    set_lr(opt, 1e-3)
    assert sorted({round(g["lr"] / 1e-3, 9) for g in opt.param_groups}) == sorted(
        {round(0.75**k, 9) for k in range(14)}
    )


def test_epoch_batches_split_ranks_and_resume_inside_an_epoch():
    full = list(EpochBatches(22, 2, 0, 1, seed=0, epoch=3))
    assert len(full) == 11 and sorted(sum(full, [])) == list(range(22))
    r0, r1 = (list(EpochBatches(22, 2, r, 2, seed=0, epoch=3)) for r in (0, 1))
    assert len(r0) == len(r1) == 5 and not set(sum(r0, [])) & set(sum(r1, []))
    assert list(EpochBatches(22, 2, 0, 1, seed=0, epoch=3, start=4)) == full[4:]
    assert list(EpochBatches(22, 2, 0, 1, seed=0, epoch=4)) != full


def test_a_folds_data_identity_follows_its_split_rows_not_where_the_set_lies(tmp_path):
    def splits(root, label_of=lambda i: i % 3, order=slice(None)):
        items = _items({"s01": 3, "s02": 2}, root, label_of)
        return {"train": items[:3][order], "val": items[3:4], "test": items[4:]}

    here = split_set_identity(splits(tmp_path / "a"))
    assert here["data_splits"] == f"train 3 / val 1 / test 1 clips under {tmp_path / 'a'}"
    assert split_set_identity(splits(tmp_path / "b" / "moved"))["data_id"] == here["data_id"]
    changed = [
        splits(tmp_path / "a", label_of=lambda i: (i + (i == 2)) % 3),  # one label edited
        splits(tmp_path / "a", order=slice(None, None, -1)),  # the same rows, drawn in another order
        {**splits(tmp_path / "a"), "val": [], "test": splits(tmp_path / "a")["val"]},  # val is no longer val
    ]
    assert len({here["data_id"], *(split_set_identity(s)["data_id"] for s in changed)}) == 4


def test_task_from_preset_and_errors():
    task = resolve_task(load_config("finetune-tiny-cpu", ["finetune.dataset=crema-d"]))
    assert task.num_outputs == 6 and task.select_metric == "uar" and task.names[0] == "anger"
    assert task.paper["uar"] == 84.91
    with pytest.raises(ConfigError, match="finetune.num_outputs"):
        resolve_task(load_config("finetune-tiny-cpu"))
    with pytest.raises(ConfigError, match="finetune.mode"):
        load_config("finetune-tiny-cpu", ["finetune.mode=both"])
    with pytest.raises(ValueError, match="dataset 'nope'"):
        resolve_task(load_config("finetune-tiny-cpu", ["finetune.dataset=nope"]))


def test_encoder_weights_load_and_the_wrong_model_is_named():
    from hicmae_dist.models import build_model
    from hicmae_dist.models.convert import Converted

    cfg = load_config("tiny-cpu").model
    pre = build_model(cfg)
    weights = Converted("hicmae", "pretrain", cfg, None, pre.state_dict())
    model = build_finetune_model(cfg, 4)
    report = load_encoder_weights(model, weights)
    assert torch.equal(
        model.state_dict()["audio_encoder.blocks.3.mlp.fc1.weight"],
        pre.state_dict()["audio_encoder.blocks.3.mlp.fc1.weight"],
    )
    assert report["initialised"] == 6 and report["dropped"] == len(pre.state_dict()) - report["loaded"]
    wider = build_finetune_model(type(cfg)(**{**cfg.__dict__, "width": 128, "heads": 4}), 4)
    with pytest.raises(ValueError, match="lack .* backbone tensors"):
        load_encoder_weights(wider, weights)


def test_protocol_table_has_folds_mean_std_and_the_paper():
    task = resolve_task(load_config("finetune-tiny-cpu", ["finetune.dataset=crema-d"]))
    per_fold = {
        f: {
            "best_epoch": f,
            "last": {"uar": u, "war": w, "weighted_f1": 0.5, "macro_f1": 0.5},
            "best": {"uar": u + 0.1, "war": w, "weighted_f1": 0.5, "macro_f1": 0.5},
        }
        for f, (u, w) in zip((1, 2, 3), ((0.5, 0.6), (0.7, 0.6), (0.6, 0.9)))
    }
    summary = summarize(per_fold, task)
    assert summary["last"]["uar"]["mean"] == pytest.approx(0.6)
    assert summary["last"]["uar"]["std"] == pytest.approx(np.std([0.5, 0.7, 0.6]))
    table = format_table(summary, task)
    assert "| last epoch | 2 | 70.00 | 60.00 |" in table
    assert "**60.00 ± 8.16**" in table and "**70.00 ± 8.16**" in table  # uar, last and best
    assert "| paper (HiCMAE-B) | | 84.91 | 84.89 |" in table


def _finish_rank(rank: int, world_size: int, port: int, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    from hicmae_dist import comm
    from hicmae_dist.train.finetune import fold as fold_mod

    def fail(*args):
        raise FileNotFoundError("no checkpoint closes epoch(s) [1]")

    comm.init_distributed()
    fold_mod._finish = fail  # rank 0's part of the fold's end fails
    fold = types.SimpleNamespace(rank0=rank == 0, engine=types.SimpleNamespace(device=torch.device("cpu")))
    try:
        fold_mod._finish_agreed(fold, [], {}, "")
        queue.put((rank, "returned"))
    except Exception as err:
        queue.put((rank, type(err).__name__))


def test_a_failure_in_rank_0s_end_of_fold_ends_every_rank_instead_of_a_hang():
    outcomes = dict(run_ranks(_finish_rank, 2, (), expect=2, timeout_s=120))
    assert outcomes == {0: "FileNotFoundError", 1: "RuntimeError"}
