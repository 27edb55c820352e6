"""Multi-label fine-tuning pieces without a training run: the release's smoothed and mixed
multi-hot targets, the BCE loss, balanced sampling (frequencies and resume), the CAV-MAE dataset
presets and their recipes."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hicmae_dist.config import ConfigError, load_config
from hicmae_dist.eval.datasets import get_dataset, recipe_overrides
from hicmae_dist.train.finetune.mixing import mix_batch, smooth_multi_hot
from hicmae_dist.train.finetune.sampling import EpochBatches, balanced_weights
from hicmae_dist.train.finetune.task import resolve_task, task_loss


def _ft(**kw):
    base = dict(mixup=10.0, cutmix=0.0, mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1, mix_video_only=False)
    return types.SimpleNamespace(**{**base, **kw})


def test_multi_hot_targets_smoothed_and_mixed_as_the_release():
    y = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.float32)
    # unmixed: negatives s / K, positives 1 - s (assigned, as the release's dataloader)
    assert smooth_multi_hot(y, 0.1)[0].tolist() == pytest.approx([0.9, 0.025, 0.025, 0.9])
    video, audio = torch.rand(3, 3, 8, 8), torch.rand(3, 1, 16, 8)
    v, a, target = mix_batch(video.clone(), audio.clone(), y, 4, _ft(), np.random.default_rng(0))
    lam = float(((v - video.flip(0)) / (video - video.flip(0)))[0, 0, 0, 0])
    assert torch.allclose(a, lam * audio + (1 - lam) * audio.flip(0), atol=1e-6)  # both modalities
    # mixed: s / K + (1 - s) (lam y + (1 - lam) y'), y' the mirrored clip's labels
    expected = 0.025 + 0.9 * (lam * y + (1 - lam) * y.flip(0))
    assert torch.allclose(target, expected, atol=1e-6)
    assert target[0, 3].item() == pytest.approx(0.025 + 0.9)  # a class both clips carry
    assert 0.35 < lam < 0.65  # Beta(10, 10): close to 1/2, as the release's draw
    # mix_prob 0: the unmixed targets
    _, _, plain = mix_batch(video.clone(), audio.clone(), y, 4, _ft(mix_prob=0.0), np.random.default_rng(0))
    assert torch.equal(plain, smooth_multi_hot(y, 0.1))


def test_multilabel_task_and_bce_loss():
    task = resolve_task(load_config("finetune-tiny-cpu", ["finetune.task=multilabel", "finetune.num_outputs=5"]))
    assert task.multilabel and task.report == ("map", "auc") and task.select_metric == "map"
    out, target = torch.randn(4, 5), torch.rand(4, 5)
    expected = -(target * F.logsigmoid(out) + (1 - target) * F.logsigmoid(-out)).mean()
    assert task_loss(out, target, task, None).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="finetune.task"):
        load_config("finetune-tiny-cpu", ["finetune.task=tagging"])


def test_balanced_weights_are_the_releases():
    y = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1]])
    w = balanced_weights(y).numpy()
    count = np.array([3, 1, 1])
    assert w == pytest.approx([1000 / (3.01), 1000 / 3.01 + 1000 / 1.01, 1000 / 3.01, 1000 / 1.01])
    assert (1000 / (count + 0.01))[0] == pytest.approx(w[0])


def test_balanced_sampling_draws_as_its_weights_say_and_resumes_exactly():
    """An imbalanced multi-label set of 20 clips: over 300 epochs the observed share of each
    class among the drawn labels is within 0.02 of the share the weights predict; a draw never
    depends on the batch it resumes from; two ranks split each global batch."""
    rng = np.random.default_rng(0)
    y = np.zeros((20, 4))
    y[:12, 0] = 1  # class 0 on 12 clips, 1 on 5, 2 on 3, 3 on 2 (some clips carry two)
    y[rng.choice(20, 5, replace=False), 1] = 1
    y[[1, 14, 17], 2] = 1
    y[[5, 19], 3] = 1
    y[y.sum(1) == 0, 0] = 1
    w = balanced_weights(y)
    p = (w / w.sum()).numpy()
    expected = (p @ y) / (p @ y).sum()  # each class's share of the drawn labels
    drawn = np.zeros(4)
    for epoch in range(300):
        for batch in EpochBatches(20, 4, 0, 1, seed=3, epoch=epoch, weights=w):
            drawn += y[batch].sum(0)
    observed = drawn / drawn.sum()
    natural = y.sum(0) / y.sum()
    assert np.abs(observed - expected).max() < 0.02
    assert observed[3] > 2 * natural[3]  # the rare class is drawn far more than it occurs

    full = list(EpochBatches(20, 4, 0, 1, seed=3, epoch=7, weights=w))
    assert len(full) == 5 and len(set(sum(full, []))) < 20  # with replacement: repeats
    assert list(EpochBatches(20, 4, 0, 1, seed=3, epoch=7, start=2, weights=w)) == full[2:]  # resume: the tail
    r0, r1 = (list(EpochBatches(20, 2, r, 2, seed=3, epoch=7, weights=w)) for r in (0, 1))
    assert [a + b for a, b in zip(r0, r1)] == [f[0::2] + f[1::2] for f in full]
    assert list(EpochBatches(20, 4, 0, 1, seed=3, epoch=8, weights=w)) != full
    with pytest.raises(ValueError, match="3 sampling weights for 20 clips"):
        EpochBatches(20, 4, 0, 1, seed=3, epoch=0, weights=w[:3])


def test_cavmae_dataset_presets_and_recipes():
    as20k, as2m, vgg = (get_dataset(n) for n in ("audioset-20k", "audioset-2m", "vggsound"))
    assert (as20k.task, as20k.num_outputs, as20k.metrics[0]) == ("multilabel", 527, "map")
    assert (vgg.task, vgg.num_outputs, vgg.metrics[0]) == ("classification", 309, "war")
    assert as20k.paper["map"] == 42.0 and as2m.paper["map"] == 51.2 and vgg.paper["war"] == 65.5
    assert as2m.recipe["finetune.balanced_sampling"] and not as20k.recipe["finetune.balanced_sampling"]
    assert as20k.recipe["finetune.lr_milestone_epochs"] == list(range(5, 15))
    assert as20k.recipe["finetune.weight_average"] == [2, 14]  # the script's wa 3..15, counted from 1
    assert as20k.recipe_pending == {"specaugment": {"freqm": 48, "timem": 192}}
    overrides, applied = recipe_overrides("audioset-20k", ["finetune.head_lr_scale=7"])
    assert "finetune.head_lr_scale" not in applied and "train.base_lr" in applied
    cfg = load_config("finetune-cavmae", overrides + ["finetune.head_lr_scale=7", "finetune.dataset=audioset-20k"])
    assert cfg.train.base_lr == 5e-5 and cfg.finetune.head_lr_scale == 7 and cfg.train.schedule == "step"
    assert cfg.finetune.mixup == 10.0 and cfg.finetune.mix_prob == 0.5 and cfg.finetune.epochs == 15
    task = resolve_task(cfg)
    assert task.num_outputs == 527 and task.paper_model == "CAV-MAE"
    names = tuple(f"c{i}" for i in range(527))
    assert resolve_task(cfg, names).names[3] == "c3"
    with pytest.raises(ConfigError, match="the class csv has 3 classes, dataset audioset-20k 527"):
        resolve_task(cfg, ("a", "b", "c"))
    with pytest.raises(ConfigError, match="train.schedule: step"):
        load_config("finetune-cavmae", ["finetune.lr_milestone_epochs=[2]"])


def test_finetune_dataset_flag_applies_the_recipe_and_reads_the_class_names(tmp_path, capsys):
    """`finetune --dataset audioset-20k --dry-run` over release-style split files: the recipe
    printed and applied under the command line's overrides, the names from the csv."""
    from hicmae_dist import cli

    split = tmp_path / "splits" / "split01"
    split.mkdir(parents=True)
    for name in ("train", "test"):
        (split / f"{name}.json").write_text('{"data": []}')
    rows = ["index,mid,display_name"] + [f"{i},/m/x{i},sound {i}" for i in range(527)]
    (tmp_path / "splits" / "class_labels_indices.csv").write_text("\n".join(rows) + "\n")
    code = cli.main(
        [
            "finetune",
            "--preset",
            "finetune-cavmae",
            "--dataset",
            "audioset-20k",
            "--splits",
            str(tmp_path / "splits"),
            "--run-dir",
            str(tmp_path / "run"),
            "--dry-run",
            "finetune.head_lr_scale=7",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert "dataset audioset-20k: the authors' recipe applied" in err and "train.base_lr=5e-05" in err
    assert "finetune.head_lr_scale" not in err and "specaugment" in err  # yours win; pending listed
    assert "weight_average:\n  - 2\n  - 14\n" in out  # the recipe's averaging range, 0-based
    assert "head_lr_scale: 7.0" in out and "balanced_sampling: false" in out
    assert "# task multilabel, 527 outputs (sound 0, sound 1," in out and "validation map" in out
