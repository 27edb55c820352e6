"""`hicmae-dist <verb>`: one thin function per verb; the work lives in the layers below."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from hicmae_dist.config import ConfigError, list_presets, load_config


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hicmae-dist"


def cmd_synth(args: argparse.Namespace) -> int:
    from hicmae_dist.data.synth import write_corpus

    summary = write_corpus(Path(args.out), args.clips, num_classes=args.classes, num_speakers=args.speakers,
                           seed=args.seed, duration_s=args.duration, workers=args.workers)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from hicmae_dist.data.prepare import prepare_shards

    manifest = prepare_shards(Path(args.src), Path(args.out), shard_size_mb=args.shard_size_mb,
                              workers=args.workers, limit=args.limit)
    keys = ("clips", "skipped", "shards", "bytes_per_clip")
    print(json.dumps({k: manifest[k] for k in keys if k in manifest}, indent=1, default=len))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.shards={Path(args.data).resolve()}")
    cfg = load_config(args.preset, overrides)
    if args.dry_run:
        from hicmae_dist.train.engine import deepspeed_config

        print(f"# resolved config (preset {args.preset}, hash {cfg.hash()})")
        print(cfg.to_yaml(), end="")
        print("# deepspeed config (world size 1)")
        print(json.dumps(deepspeed_config(cfg, 1), indent=1))
        return 0
    if not args.run_dir:
        raise ConfigError("--run-dir is required unless --dry-run")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_cache_dir() / "torch_extensions"))
    from hicmae_dist.train.pretrain import format_summary, pretrain

    summary = pretrain(cfg, Path(args.run_dir), resume=args.resume, tracking_uri=args.tracking_uri,
                       progress=not args.no_progress)
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hicmae-dist", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    s = sub.add_parser("synth", help="write a synthetic VoxCeleb2-like corpus of real mp4/m4a files",
                       description="Write clips whose hidden class sets both a visual pattern and a sound, "
                                   "in VoxCeleb2's layout: OUT/dev/mp4/idNNNNN/VIDEO/NNNNN.mp4 and "
                                   "OUT/dev/aac/idNNNNN/VIDEO/NNNNN.m4a, plus OUT/labels.csv.")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--clips", type=int, required=True, help="number of clips")
    s.add_argument("--classes", type=int, default=4, help="hidden audio-visual classes (default 4)")
    s.add_argument("--speakers", type=int, default=None, help="speaker ids (default: clips / 4)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same corpus")
    s.add_argument("--duration", type=float, default=3.2, help="clip length in seconds (>= 2.56)")
    s.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel encoders")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("prepare", help="decode a VoxCeleb2-layout corpus into WebDataset shards",
                       description="Decode every clip under SRC (dev/mp4 + dev/aac) once and write "
                                   "tar shards plus manifest.json to OUT; bad clips are skipped and listed.")
    s.add_argument("--src", required=True, help="corpus root (holds dev/mp4 and dev/aac)")
    s.add_argument("--out", required=True, help="shard directory")
    s.add_argument("--shard-size-mb", type=float, default=1024, help="target shard size in MB (default 1024)")
    s.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel decoders")
    s.add_argument("--limit", type=int, default=None, help="only the first N clips (sorted order)")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("pretrain", help="pretrain a model on shards with DeepSpeed, tracked in MLflow",
                       description="Pretrain with a preset plus dotted overrides, e.g. "
                                   "`hicmae-dist pretrain --preset tiny-cpu --data shards/ --run-dir runs/a "
                                   f"train.steps=50 model.width=128`. Presets: {', '.join(list_presets())}.")
    s.add_argument("--preset", required=True, help="preset name or path to a YAML config")
    s.add_argument("--data", help="directory of .tar shards (sets data.shards)")
    s.add_argument("--run-dir", help="where checkpoints, config, metrics and the MLflow store go")
    s.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto: continue from the newest complete checkpoint in --run-dir (default); "
                        "never: refuse a run dir that has one")
    s.add_argument("--dry-run", action="store_true",
                   help="validate the preset and overrides, print the resolved config and exit")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite file RUN_DIR/mlflow.db)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    s.set_defaults(func=cmd_pretrain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"hicmae-dist {args.verb}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
