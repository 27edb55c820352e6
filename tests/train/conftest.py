"""A small synthetic corpus, sharded once per test session, for the training tests."""

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.support import pretrain_cmd, require, shared_across_workers


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    require("ffmpeg", shutil.which("ffmpeg") is not None, "apt-get install ffmpeg")
    from hicmae_dist.data.prepare import prepare_shards
    from hicmae_dist.data.synth import write_corpus

    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "corpus", 48, num_classes=4, seed=0, workers=2, progress=False)
    prepare_shards(root / "corpus", root / "shards", shard_size_mb=2, workers=2, progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """The environment of a `hicmae-dist` subprocess: cached DeepSpeed JIT ops, no progress bars."""
    # Not the in-process tests' torch.distributed variables (test_faults): a child would try to
    # join their group, or bind the port the pytest process holds.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/hicmae-dist/torch_extensions"))
    env["TQDM_DISABLE"] = "1"
    return env


@pytest.fixture(scope="session")
def two_minute_run(shards, cli_env, tmp_path_factory):
    """The tiny preset pretrained for 120 steps through the CLI, once a session (once for all
    xdist workers: the first to need it runs it, the others wait and read it): the loss and
    tracking test checks the run, the fine-tuning tests start from its weights. Progress is on,
    with output to pipes, as in a Slurm log. Returns (run_dir, the finished process)."""
    import subprocess

    with shared_across_workers(tmp_path_factory, "two_minute") as root:
        run_dir, done = root / "run", root / "process.json"
        if not done.exists():
            overrides = ["train.steps=120", "train.warmup_steps=10", "train.log_every=10", "train.checkpoint_every=60"]
            cmd = pretrain_cmd(shards, run_dir, *overrides, progress=True)
            r = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=900)
            done.write_text(
                json.dumps({"args": r.args, "returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr})
            )
        return run_dir, subprocess.CompletedProcess(**json.loads(done.read_text()))


@pytest.fixture(scope="module")
def engine():
    """A tiny DeepSpeed engine in this process (a 1-rank group), for the checkpoint and fault tests."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/hicmae-dist/torch_extensions"))
    from hicmae_dist.comm import init_distributed
    from hicmae_dist.config import load_config
    from hicmae_dist.train.engine import build_engine, build_model_for_engine

    init_distributed()
    cfg = load_config(
        "tiny-cpu", ["model.width=32", "model.decoder_width=32", "data.batch_size=2", "data.num_workers=0"]
    )
    return build_engine(build_model_for_engine(cfg, 1), cfg, 1)
