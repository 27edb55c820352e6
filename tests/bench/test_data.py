"""`hicmae-dist bench data --quick`: runs end to end and prints its table and JSON."""
from __future__ import annotations

import json
import shutil

from hicmae_dist.cli import main
from tests.support import require


def test_bench_data_quick(capsys):
    require("ffmpeg", shutil.which("ffmpeg") is not None, "apt-get install ffmpeg")
    assert main(["bench", "data", "--quick", "--clips", "4", "--batches", "2", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    table, _, raw = out.rpartition("\n{")
    result = json.loads("{" + raw)
    assert "prepare" in table and "loader" in table and "goal: HiCMAE >= 250 clips/s per core" in table
    assert [(r["arch"], r["workers"]) for r in result["loader"]] == \
        [("hicmae", 0), ("hicmae", 1), ("hicmae", 2), ("cavmae", 0), ("cavmae", 1), ("cavmae", 2)]
    assert [r["workers"] for r in result["prepare"]] == [1, 2, 2]
    for row in result["loader"] + result["prepare"]:
        assert row["clips_per_s"] > 0 and row["clips_per_s_per_worker"] > 0
    assert result["goal"]["hicmae_clips_per_core"] > 0 and result["goal"]["limited_by"]
    for arch in ("hicmae", "cavmae"):
        prof = result["profile"][arch]
        assert prof["total_ms"] > 0 and set(prof["ms"]) >= {"jpeg decode", "fbank"}


def test_bench_parser_keeps_bench_model():
    from hicmae_dist.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["bench", "model", "hicmae-t"]).func.__name__ == "cmd_bench_model"
    assert parser.parse_args(["bench", "data", "--quick"]).func.__name__ == "cmd_bench_data"
