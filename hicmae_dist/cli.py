"""`hicmae-dist <verb>`: one thin function per verb; the work lives in the layers below."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path

from hicmae_dist.config import ConfigError, list_presets, load_config

# Exit status (README, "Exit status and errors"), for the scripts around a run. EXIT_INTERRUPTED is
# EX_TEMPFAIL of sysexits.h ("try again"). Slurm jobs of `submit` call the trainer in-process, not
# main(): launch/job.py's REQUEUE_EXIT_CODE (3) is theirs, and differs from every code here.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_CTRL_C = 0, 1, 2, 75, 130
EXIT_STATUS_HELP = (
    f"Exit status: {EXIT_OK} done; {EXIT_FAILURE} failed (bad data, a checkpoint that cannot "
    f"resume, a missing file, a full disk: one line says which, --debug adds the traceback; "
    f"an unexpected error prints its traceback); {EXIT_USAGE} usage or config error; "
    f"{EXIT_INTERRUPTED} stopped by SIGTERM/SIGUSR2 after saving a checkpoint (run the same "
    f"command to resume); {EXIT_CTRL_C} Ctrl-C."
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, as every other user error: `hicmae-dist <verb>: ...`."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (`{self.prog} --help` lists the options)\n")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hicmae-dist"


def cmd_synth(args: argparse.Namespace) -> int:
    from hicmae_dist.data.synth import write_corpus, write_downstream

    try:
        if args.downstream:
            summary = write_downstream(
                Path(args.out),
                args.clips,
                num_classes=args.classes,
                num_subjects=args.speakers,
                folds=args.folds,
                seed=args.seed,
                duration_s=args.duration,
                regression=args.regression,
                multilabel=args.multilabel,
                workers=args.workers,
            )
        else:
            summary = write_corpus(
                Path(args.out),
                args.clips,
                num_classes=args.classes,
                num_speakers=args.speakers,
                seed=args.seed,
                duration_s=args.duration,
                workers=args.workers,
            )
    except ValueError as err:  # arguments that cannot make a corpus
        print(f"hicmae-dist synth: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from hicmae_dist.data.prepare import format_summary, parse_size, prepare_shards

    if args.shard_size is not None and args.shard_size_mb is not None:
        raise ConfigError("--shard-size and --shard-size-mb (its older spelling) both given; use --shard-size")
    speakers = args.speakers
    if speakers is not None:
        speakers = int(speakers) if speakers.isdigit() else [s for s in speakers.split(",") if s]
    try:
        size = parse_size(args.shard_size) if args.shard_size is not None else None
    except ValueError as err:
        raise ConfigError(f"--shard-size: {err}") from None
    try:
        manifest = prepare_shards(
            Path(args.src),
            Path(args.out),
            shard_size=size,
            shard_size_mb=args.shard_size_mb,
            workers=args.workers,
            limit=args.limit,
            speakers=speakers,
            image_size=args.image_size,
            full_frame=args.full_frame,
            frames=args.frames,
            jpeg_quality=args.jpeg_quality,
            max_av_diff_s=args.max_av_diff,
            resample=not args.no_resample,
            shuffle_seed=None if args.no_shuffle else args.seed,
            progress=not args.no_progress,
            audio_form=args.audio_form,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # bad options, no clips, another prepare running
        print(f"hicmae-dist prepare: {err}", file=sys.stderr)
        return 1 if isinstance(err, RuntimeError) else 2
    print(format_summary(manifest), file=sys.stderr)
    keys = (
        "clips",
        "num_skipped",
        "skipped_by_kind",
        "shards",
        "bytes",
        "bytes_per_clip",
        "bytes_per_second",
        "full_set_estimate",
    )
    print(
        json.dumps({k: manifest[k] for k in keys if k in manifest}, indent=1, default=len)
        if not args.json
        else json.dumps(manifest)
    )
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from hicmae_dist.bench.data import bench_data, format_table

    workers = [int(w) for w in args.workers.split(",")] if args.workers else None
    result = bench_data(
        quick=args.quick,
        workers=workers,
        work_dir=args.work_dir,
        clips=args.clips,
        batches=args.batches,
        batch_size=args.batch_size,
    )
    table = format_table(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "results.md").write_text(table + "\n")
        print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"results: {args.json}")
    elif not args.out:
        print(json.dumps(result))
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    import torch

    from hicmae_dist.bench.model import bench_model, format_bench
    from hicmae_dist.models.info import model_config

    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_model(
        model_config(args.model), batch=args.batch, steps=args.steps, warmup=args.warmup, device=args.device
    )
    print(json.dumps(result) if args.json else format_bench(args.model, result))
    return 0


def _add_bench_verbs(sub: argparse._SubParsersAction) -> None:
    """bench model, data and kernels (hicmae_dist/bench)."""
    s = sub.add_parser("bench", help="benchmarks", description="Benchmarks; `bench model` times a model.")
    what = s.add_subparsers(dest="what", required=True, metavar="WHAT")
    for add_bench in (_add_bench_model, _add_bench_data, _add_bench_kernels):
        add_bench(what)


def _add_bench_model(what: argparse._SubParsersAction) -> None:
    from hicmae_dist.models.info import MODELS

    m = what.add_parser(
        "model",
        help="time forward + backward of a pretraining model and its peak memory",
        description="fp32 forward + backward of the pretraining model on random inputs with "
        "the spec's masks: median step time after warm-up, throughput and peak "
        "memory on the current device (CUDA if available).",
    )
    m.add_argument("model", choices=tuple(MODELS), help="model name")
    m.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    m.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    m.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    m.add_argument("--json", action="store_true", help="print the result as one JSON object")
    m.set_defaults(func=cmd_bench_model)


def _add_bench_data(what: argparse._SubParsersAction) -> None:
    d = what.add_parser(
        "data",
        help="clips per CPU core of the loader against the authors' data path, and "
        "the CPU cores per GPU each model needs",
        description="Write a synthetic corpus, then time `prepare` (1, 2, N threads), the HiCMAE "
        "release's per-sample path (decoded from the mp4) and the pretraining loader "
        "for HiCMAE and CAV-MAE inputs (in the main process, where CPU time gives "
        "clips per core, and with 1, 2, N DataLoader workers), the device-side "
        "normalise, and profile one core's work per clip; then the CPU cores per H100 "
        "each model needs. Prints a Markdown report, then the JSON.",
    )
    d.add_argument("--quick", action="store_true", help="a small run (8 clips, 1 and 2 workers): seconds, not minutes")
    d.add_argument("--workers", help="comma-separated worker counts (default 1,2,N; --quick 1,2)")
    d.add_argument("--clips", type=int, help="synthetic clips (default 48; --quick 8)")
    d.add_argument("--batches", type=int, help="timed batches per loader setting (default 12; --quick 4)")
    d.add_argument("--batch-size", type=int, help="batch size (default 8; --quick 4)")
    d.add_argument("--work-dir", help="keep the corpus and shards here (default: a temporary directory, removed)")
    d.add_argument("--json", metavar="FILE", help="write the results to FILE instead of printing the JSON")
    d.add_argument("--out", metavar="DIR", help="write results.json and results.md to DIR (as `bench kernels`)")
    d.set_defaults(func=cmd_bench_data)


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from hicmae_dist.bench.kernels.harness import run, shell_command

    return run(args, tuple(args.ops), shell_command("hicmae-dist", sys.argv[1:]))


def _add_bench_kernels(what: argparse._SubParsersAction) -> None:
    """`bench kernels`: the kernel microbenchmarks (hicmae_dist/bench/kernels)."""
    from hicmae_dist.bench.kernels.harness import add_arguments

    k = what.add_parser(
        "kernels",
        help="kernel microbenchmarks: attention backends, info_nce memory, token ops, "
        "patch_norm, the sm_90 compile report with an H100 roofline",
        description="Time every backend of the hot ops over the models' shapes and the standard "
        "grids (forward, backward, both), measure peak memory, record out-of-memory "
        "and unavailable backends as such, and add the static sm_90 report with an "
        "on-paper H100 roofline. Writes results.json, results.md and PNG plots to --out "
        "and prints the markdown. See kernels/README.md.",
    )
    add_arguments(k)
    k.set_defaults(func=cmd_bench_kernels)


def cmd_doctor(args: argparse.Namespace) -> int:
    from hicmae_dist.doctor import DEFAULT_OUT, run_doctor

    try:
        return run_doctor(args.out or DEFAULT_OUT, skip=args.skip)
    except ValueError as err:  # a --skip that names no check
        print(f"hicmae-dist doctor: {err}", file=sys.stderr)
        return 2


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "doctor",
        help="prove a machine: versions, GPUs, every kernel against its reference, "
        "training steps per attention backend, ZeRO over NCCL, bench kernels --quick",
        description="Record the versions and GPUs, then run every check this machine can run: "
        "attention backends and info_nce against their references (flash-attention's "
        "2x / 3x error rule), the native kernels, training steps of the models (bf16 "
        "per attention backend against fp32 on a GPU), 2-rank ZeRO-2/3 against 1 rank, "
        "`bench kernels --quick`. A check that cannot run here is listed as not run, "
        "with the reason. Writes OUT/doctor.json and OUT/doctor.md; exits 1 when a "
        "check failed or raised. Under a minute on a CPU, under 10 on one H100.",
    )
    d.add_argument("--out", default=None, help="report directory (default build/doctor)")
    d.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="NAME",
        help="skip a check: its name (attention, info_nce.global, train.bf16.hicmae-b, zero, "
        "bench-kernels, ...), a dotted prefix of names (info_nce, train), or NAME:BACKEND "
        "(attention:xformers); repeatable",
    )
    d.set_defaults(func=cmd_doctor)


def cmd_sync(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from hicmae_dist.tracking import sync_run_dir

    try:  # unreachable or no record: main() prints one line (TrackingUnavailable, FileNotFoundError)
        lines = sync_run_dir(Path(args.run_dir), args.tracking_uri)
    except MlflowException as err:  # the server refused: one line; nothing recorded is lost
        print(f"hicmae-dist sync: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def _add_sync(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "sync",
        help="send to MLflow what a tracking outage kept in a run directory",
        description="Send RUN_DIR's metric steps the MLflow run lacks (from metrics.jsonl, one value "
        "per step: steps the run holds are not sent again), and the params, artifacts "
        "and final status that RUN_DIR/tracking.json (and its folds') lists as not "
        "sent. Safe to run again.",
    )
    s.add_argument("run_dir", help="a pretraining or fine-tuning run directory")
    s.add_argument("--tracking-uri", help="send there instead of the URI the run was tracked at")
    s.set_defaults(func=cmd_sync)


_RUN_HELP = {
    "preset": "preset name or path to a YAML config",
    "run_dir": "where checkpoints, config, metrics and the MLflow store go",
    "resume": "auto: continue from the newest complete checkpoint in --run-dir (default); never: refuse a run dir "
    "that has one",
    "allow_config_change": "resume a checkpoint written with a different model/data/optimiser config",
}


def _run_options(
    *, preset_default: str | None = None, run_dir_required: bool = True, **help_text: str
) -> argparse.ArgumentParser:
    """The options of a run, declared once for pretrain, finetune and submit (parents=[...]);
    help_text replaces a verb's wording of _RUN_HELP's entries. Without preset_default,
    --preset is required."""
    text = {**_RUN_HELP, **help_text}
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preset", required=preset_default is None, default=preset_default, help=text["preset"])
    p.add_argument("--run-dir", required=run_dir_required, help=text["run_dir"])
    p.add_argument("--resume", choices=("auto", "never"), default="auto", help=text["resume"])
    p.add_argument("--allow-config-change", action="store_true", help=text["allow_config_change"])
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite file RUN_DIR/mlflow.db)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def dry_run_report(cfg, preset: str, world_size: int) -> str:
    """The resolved config, the generated DeepSpeed config, the per-rank memory estimate and the
    step budget: everything `pretrain` would do, decided without data or devices."""
    import torch

    from hicmae_dist.models import build_model
    from hicmae_dist.train.accounting import memory_estimate
    from hicmae_dist.train.engine import deepspeed_config, global_batch

    with torch.device("meta"):
        num_params = sum(p.numel() for p in build_model(cfg.model, cfg.execution).parameters())
    mem = memory_estimate(cfg, num_params, world_size)
    batch = global_batch(cfg, world_size)
    lines = [
        f"# resolved config (preset {preset}, hash {cfg.hash()})",
        cfg.to_yaml().rstrip(),
        f"# deepspeed config (world size {world_size})",
        json.dumps(deepspeed_config(cfg, world_size), indent=1),
        f"# per-rank memory estimate (ZeRO stage {cfg.train.zero_stage}, {world_size} ranks, "
        f"{num_params:,} parameters)",
    ]
    lines += [f"{k:<18} {v / 2**30:8.3f} GiB" for k, v in mem.items()]
    lines += [
        f"{'total':<18} {sum(mem.values()) / 2**30:8.3f} GiB",
        f"# steps {cfg.train.steps:,} x global batch {batch:,} = {cfg.train.steps * batch:,} clips",
    ]
    return "\n".join(lines)


def _world_size(text: str) -> int:
    """--world-size: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def cmd_pretrain(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.shards={Path(args.data).resolve()}")
    cfg = load_config(args.preset, overrides)
    if args.dry_run:
        print(dry_run_report(cfg, args.preset, args.world_size))
        return EXIT_OK
    if not args.run_dir:
        raise ConfigError("--run-dir is required unless --dry-run")
    if not cfg.data.shards:
        raise ConfigError("data.shards is empty: pass --data DIR (a directory of shards from `hicmae-dist prepare`)")
    from hicmae_dist.data.loader import find_shards

    find_shards(cfg.data.shards)  # a missing, empty or raw-corpus --data fails now, before any set-up
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_cache_dir() / "torch_extensions"))
    from hicmae_dist.train.pretrain import format_summary, pretrain
    from hicmae_dist.train.runtime import install_stop_signals

    install_stop_signals()  # SIGTERM / SIGUSR2: checkpoint at the next step, then exit
    summary = pretrain(
        cfg,
        Path(args.run_dir),
        resume=args.resume,
        tracking_uri=args.tracking_uri,
        progress=not args.no_progress,
        allow_config_change=args.allow_config_change,
    )
    if summary["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(summary))
    # A stop that came with the last step finished the run (as launch/job.py judges it too).
    return EXIT_INTERRUPTED if summary["interrupted"] and summary["steps"] < cfg.train.steps else EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    from hicmae_dist.models.convert import convert_file

    converted = convert_file(args.src, args.dst, arch=args.arch, to=args.to)  # ConversionError: main()
    cfg = converted.cfg
    size = f"width {cfg.width}, heads {cfg.heads}, {cfg.depth_summary()}"
    if converted.kind == "pretrain":
        size += f", decoder {cfg.decoder_width} / {cfg.decoder_heads} / {cfg.decoder_depth}"
    else:
        size += f", {converted.num_classes} classes"
    numel = sum(t.numel() for t in converted.state_dict.values())
    side = "the authors' layout" if args.to == "upstream" else "ours"
    print(
        f"{converted.arch} {converted.kind} ({size}): {len(converted.state_dict)} tensors, "
        f"{numel} parameters -> {args.dst} ({side})"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from hicmae_dist.models.info import info_report

    print(info_report(args.model, finetune=args.finetune, num_classes=args.num_classes))
    return 0


def _add_model_verbs(sub: argparse._SubParsersAction) -> None:
    """convert and info (the models layer's verbs)."""
    from hicmae_dist.models import model_specs
    from hicmae_dist.models.info import MODELS

    s = sub.add_parser(
        "convert",
        help="convert the authors' HiCMAE / CAV-MAE checkpoints to ours, or back",
        description="Map the authors' state-dict keys to ours (default) or ours to theirs "
        "(--to upstream), checking that every key is used, every tensor filled and "
        "every shape right. The model size is inferred from the keys and shapes. "
        "Our files hold the weights plus the model config; upstream CAV-MAE files "
        "get the `module.` prefix of the released ones, HiCMAE files {'model': ...}.",
    )
    s.add_argument("--from", dest="arch", required=True, choices=tuple(model_specs()), help="which model")
    s.add_argument("src", metavar="IN.pth", help="checkpoint to read (torch.load weights_only=True)")
    s.add_argument("dst", metavar="OUT", help="file to write")
    s.add_argument(
        "--to",
        choices=("ours", "upstream"),
        default="ours",
        help="ours: the authors' file -> ours (default); upstream: ours -> the authors' layout",
    )
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser(
        "info",
        help="parameter counts and multiply-accumulates of a model",
        description="Print total and trainable parameters, parameters per component, and "
        "multiply-accumulates per sample for pretraining and fine-tuning.",
    )
    s.add_argument("model", choices=tuple(MODELS), help="model name")
    s.add_argument("--finetune", action="store_true", help="count the fine-tuning model (default: pretraining)")
    s.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classifier outputs for --finetune (default: 6 for HiCMAE, 527 for CAV-MAE)",
    )
    s.set_defaults(func=cmd_info)


def _finetune_config(args: argparse.Namespace):
    """--preset, then the dataset's recipe (the authors' fine-tuning settings, where the preset
    has one), then the command line's overrides."""
    overrides = list(args.overrides)
    recipe: list[str] = []
    if args.dataset:
        from hicmae_dist.eval.datasets import get_dataset, recipe_overrides

        try:
            recipe, applied = recipe_overrides(args.dataset, overrides)
        except ValueError as err:
            raise ConfigError(f"--dataset: {err}") from None
        pending = get_dataset(args.dataset).recipe_pending
        if (applied or pending) and int(os.environ.get("RANK", "0")) == 0:
            print(
                f"dataset {args.dataset}: the authors' recipe applied (command-line overrides win): "
                f"{', '.join(recipe) or 'nothing'}" + (f"; not applied: {pending}" if pending else ""),
                file=sys.stderr,
            )
        overrides.append(f"finetune.dataset={args.dataset}")
    if getattr(args, "eval_modes", None):
        modes = [m.strip() for m in args.eval_modes.split(",") if m.strip()]
        overrides.append(f"finetune.eval_modes=[{', '.join(modes)}]")
    return load_config(args.preset, recipe + overrides)


def _pretrained(args: argparse.Namespace):
    """--pretrained (a run dir, our weights file or the authors' checkpoint), or None with
    --from-scratch; exactly one of the two."""
    if bool(args.pretrained) == bool(getattr(args, "from_scratch", False)):
        raise ConfigError(
            "give --pretrained RUN_DIR|FILE (our weights or the authors' checkpoint) "
            "or --from-scratch, not both and not neither"
        )
    if not args.pretrained:
        return None
    from hicmae_dist.train.export import load_pretrained

    return load_pretrained(args.pretrained)


def cmd_finetune(args: argparse.Namespace) -> int:
    cfg = _finetune_config(args)
    splits = Path(args.splits)
    if not splits.is_dir():
        raise ConfigError(f"--splits {splits}: not a directory (expected split01/{{train,val,test}}.csv or .json ...)")
    from hicmae_dist.data.downstream import select_folds

    folds = select_folds(args.folds, splits)
    if args.dry_run:
        from hicmae_dist.train.finetune.protocol import protocol_task

        task = protocol_task(cfg, splits, folds[0])
        print(cfg.to_yaml().rstrip())
        names = ", ".join(task.names[:12]) + (", ..." if task.num_outputs > 12 else "")
        print(
            f"# task {task.kind}, {task.num_outputs} outputs ({names}); folds {folds}; "
            f"epoch chosen on validation {task.select_metric}; config hash {cfg.hash(finetune=True)}"
        )
        return 0
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_cache_dir() / "torch_extensions"))
    from hicmae_dist.train.finetune.protocol import format_table, protocol_task, run_protocol
    from hicmae_dist.train.runtime import install_stop_signals

    pretrained = _pretrained(args)
    install_stop_signals()
    summary = run_protocol(
        cfg,
        splits,
        folds,
        Path(args.run_dir),
        pretrained=pretrained,
        resume=args.resume,
        tracking_uri=args.tracking_uri,
        progress=not args.no_progress,
        allow_config_change=args.allow_config_change,
    )
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if summary.get("interrupted"):  # every rank returns it: the fold is not finished
        if rank0:
            print(f"interrupted in fold {summary['fold']} ({summary['interrupted']}); run the same command to resume")
        return EXIT_INTERRUPTED
    if rank0:
        print(format_table(summary, protocol_task(cfg, splits, folds[0])))
        print(f"\nresults   {args.run_dir}/results.md, summary.json, foldNN/results.json + confusion PNGs")
        print(f"mlflow    {summary['tracking_uri']} (protocol run {summary['mlflow_run_id']}, folds nested)")
    return EXIT_OK


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from hicmae_dist.data.downstream import read_annotations
    from hicmae_dist.train.export import load_pretrained
    from hicmae_dist.train.probe import PAPER_SUBSETS, retrieval_eval, retrieval_subset

    items = read_annotations(args.annotations)[: args.limit]
    size = PAPER_SUBSETS[args.paper_subset] if args.paper_subset else args.subset
    try:
        items = retrieval_subset(items, size, args.seed)
    except ValueError as err:
        raise ConfigError(f"--subset / --paper-subset: {err} ({args.annotations})") from None
    result = retrieval_eval(
        load_pretrained(args.weights), items, batch_size=args.batch_size, progress=not args.no_progress
    )
    if size is not None:
        result.update(subset=size, subset_seed=args.seed, subset_of=args.paper_subset or "custom")
    _print_result(result, args.json)
    return 0


def cmd_eval_linear_probe(args: argparse.Namespace) -> int:
    from hicmae_dist.data.downstream import load_fold
    from hicmae_dist.train.finetune.task import resolve_task
    from hicmae_dist.train.probe import linear_probe

    cfg = _finetune_config(args)
    task = resolve_task(cfg)
    splits, how = load_fold(
        args.splits,
        args.fold,
        regression=task.regression,
        val_fraction=cfg.finetune.val_fraction,
        subject=task.subject,
        seed=cfg.train.seed,
    )
    result = linear_probe(
        _pretrained(args), splits, cfg, task, batch_size=args.batch_size, progress=not args.no_progress
    )
    result["val_split"] = how
    _print_result(result, args.json)
    return 0


def cmd_eval_datasets(args: argparse.Namespace) -> int:
    from hicmae_dist.eval.datasets import format_datasets

    print(format_datasets())
    return 0


def _print_result(result: dict, json_path: str | None) -> None:
    text = json.dumps(result, indent=1)
    if json_path:
        Path(json_path).write_text(text)
    print(text)


def _add_finetune_verbs(sub: argparse._SubParsersAction) -> None:
    """finetune and eval (retrieval, linear-probe, datasets)."""
    run = _run_options(
        preset_default="finetune-hicmae",
        preset="recipe preset or YAML (default finetune-hicmae)",
        run_dir="where the folds' checkpoints, results and MLflow store go",
        resume="auto: finished folds are skipped, an interrupted one continues (default)",
        allow_config_change="resume a fold written with another config",
    )
    s = sub.add_parser(
        "finetune",
        parents=[run],
        help="fine-tune and evaluate on a downstream set: k-fold, validation-selected "
        "and last epoch, tracked in MLflow",
        description="Fine-tune pretrained weights on each fold of SPLITS (split01/{train,val,test}"
        ".csv ...; without val.csv a validation split is carved from training by "
        "subject), choose the epoch on validation, evaluate the last and the chosen "
        "epoch on test once each, and print the per-fold table with mean and std. "
        "E.g. `hicmae-dist finetune --preset finetune-hicmae --dataset crema-d "
        "--splits crema-d/splits --folds 1-5 --pretrained runs/pretrain --run-dir "
        "runs/ft-cremad`.",
        epilog=EXIT_STATUS_HELP,
    )
    s.add_argument(
        "--splits",
        required=True,
        help="directory of split01/, split02/ ... annotation files ({train,val,test}.csv), or the CAV-MAE "
        "release's JSON datafiles ({train,val,test}.json) with class_labels_indices.csv beside them "
        "or in this directory (or finetune.label_csv=PATH)",
    )
    s.add_argument("--dataset", help="dataset preset (`hicmae-dist eval datasets`): classes, metrics, subjects")
    s.add_argument("--folds", default="1", help="1-5, 1,3 or all (default 1)")
    s.add_argument("--pretrained", help="pretraining run dir, our weights file, or the authors' checkpoint")
    s.add_argument("--from-scratch", action="store_true", help="random initialisation (a baseline)")
    s.add_argument(
        "--eval-modes",
        metavar="M1,M2",
        help="CAV-MAE: also test in these modes, e.g. audio_missing_video,video_missing_audio "
        "(finetune.eval_modes; a model fine-tuned on both modalities tested on one)",
    )
    s.add_argument("--dry-run", action="store_true", help="print the resolved config and task, then exit")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_finetune)
    _add_eval(sub)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate pretrained weights: retrieval, linear probe; list dataset presets")
    what = e.add_subparsers(dest="what", required=True, metavar="WHAT")
    r = what.add_parser(
        "retrieval",
        help="audio-visual retrieval R@1/5/10 and median rank, both directions",
        description="Mean-pooled single-modality features of every clip of ANNOTATIONS (centre "
        "view), cosine similarity, clip i's video against clip i's audio.",
    )
    r.add_argument("--weights", required=True, help="pretraining run dir, our weights file, or the authors'")
    r.add_argument("--annotations", required=True, help="annotation file (frame_dir wav_path label ...)")
    r.add_argument("--limit", type=int, default=None, help="only the first N clips")
    size = r.add_mutually_exclusive_group()
    size.add_argument("--subset", type=int, metavar="N", help="N clips drawn at random (seeded by --seed)")
    size.add_argument(
        "--paper-subset",
        choices=("audioset", "vggsound"),
        help="the CAV-MAE paper's subset size: 1725 (AudioSet eval) or 1545 (VGGSound test)",
    )
    r.add_argument("--seed", type=int, default=0, help="the subset's draw (default 0)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--json", metavar="FILE", help="also write the result to FILE")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=cmd_eval_retrieval)
    lp = what.add_parser(
        "linear-probe",
        help="linear classifier / regressor on frozen features of one fold",
        description="Frozen features of the fine-tuning model, a linear model per L2 "
        "strength, the strength chosen on validation, test evaluated once.",
    )
    lp.add_argument("--pretrained", help="pretraining run dir, our weights file, or the authors' checkpoint")
    lp.add_argument("--from-scratch", action="store_true", help="probe a randomly initialised encoder")
    lp.add_argument("--splits", required=True, help="directory of split01/ ...")
    lp.add_argument("--fold", type=int, default=1)
    lp.add_argument("--dataset", help="dataset preset")
    lp.add_argument("--preset", default="finetune-hicmae", help="config preset (model section for --from-scratch)")
    lp.add_argument("--batch-size", type=int, default=8)
    lp.add_argument("--json", metavar="FILE", help="also write the result to FILE")
    lp.add_argument("--no-progress", action="store_true")
    lp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    lp.set_defaults(func=cmd_eval_linear_probe)
    d = what.add_parser("datasets", help="the dataset presets: classes, folds, metrics, protocol")
    d.set_defaults(func=cmd_eval_datasets)


def cmd_infer(args: argparse.Namespace) -> int:
    """embed / predict: the work is hicmae_dist.infer.output.infer_files."""
    from hicmae_dist.infer.output import infer_files

    options = dict(
        faces=args.faces,
        hop_s=args.hop,
        segments=args.segments,
        crops=args.crops,
        short=args.short,
        workers=args.workers,
        progress=not args.no_progress,
    )
    if args.verb == "embed":
        options["feature"] = args.feature
    summary = infer_files(
        args.weights,
        args.inputs,
        Path(args.out),
        args.verb,
        fold=args.fold,
        dataset=getattr(args, "dataset", None),
        device=args.device,
        batch_size=args.batch_size,
        **options,
    )
    print(
        f"{summary['videos']} videos ({summary['skipped']} skipped), {summary['windows']} windows on "
        f"{summary['device']} -> {summary['out']}"
    )
    print(f"{summary['problems']} problem(s) -> {summary['problems_file']}")
    return EXIT_OK


def _add_infer_verbs(sub: argparse._SubParsersAction) -> None:
    for verb, help_, out_help in (
        (
            "embed",
            "features of your videos, per window and per video (Parquet or .npz)",
            "output file: .parquet or .npz",
        ),
        (
            "predict",
            "class probabilities (or regression outputs) of your videos, per window and per video",
            "output file: .csv or .json",
        ),
    ):
        s = sub.add_parser(
            verb,
            help=help_,
            description=f"{help_[0].upper()}{help_[1:]}. Videos are resampled "
            "to 25 fps and 16 kHz mono and cut into the model's windows (HiCMAE 2.56 s, CAV-MAE "
            "10.24 s); a video that cannot be used is a line in OUT's problems report "
            "(<out stem>.problems.csv) and its status column, and the others go on.",
        )
        s.add_argument(
            "--weights",
            required=True,
            help="fine-tuning run dir (or one foldNN), pretraining run dir, "
            "our weights file, or the authors' checkpoint",
        )
        s.add_argument(
            "inputs",
            nargs="+",
            metavar="INPUT",
            help="video files, folders of them, or .csv/.txt lists (a `path` and optional `id` column)",
        )
        s.add_argument("--out", required=True, help=out_help)
        if verb == "embed":
            s.add_argument(
                "--feature",
                choices=("fusion", "encoders"),
                default="fusion",
                help="fusion: the fine-tuning feature before the head; encoders: each encoder's pooled "
                "output (video, audio)",
            )
        else:
            s.add_argument("--dataset", help="dataset preset naming the classes of a fine-tuned weights file")
        s.add_argument(
            "--faces",
            choices=("none", "detect"),
            default="none",
            help="detect: track and crop the largest face (needs opencv-python-headless); none: "
            "frames as they are, centre crop (face-track videos)",
        )
        s.add_argument(
            "--hop",
            type=float,
            default=None,
            metavar="SECONDS",
            help="window hop (default: one window span, back to back)",
        )
        s.add_argument(
            "--segments",
            type=int,
            default=None,
            help="instead of --hop: N windows spread over each video, as the fine-tuning test pass",
        )
        s.add_argument(
            "--crops",
            type=int,
            default=1,
            help="spatial crops per window along the long side, averaged (the test pass's test_num_crop)",
        )
        s.add_argument(
            "--short",
            choices=("pad", "skip"),
            default="pad",
            help="a video shorter than one window: pad (flagged 'padded') or skip",
        )
        s.add_argument("--fold", type=int, default=None, help="fold of a fine-tuning run (default: the first)")
        s.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
        s.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
        s.add_argument("--workers", type=int, default=2, help="videos decoded in parallel")
        s.add_argument("--no-progress", action="store_true")
        s.set_defaults(func=cmd_infer)


def cmd_submit(args: argparse.Namespace) -> int:
    from hicmae_dist.launch.submission import dry_run_text, plan_submission, submit_planned, submitted_text
    from hicmae_dist.launch.submit import SubmitError

    plan = plan_submission(args)
    if args.dry_run:
        print(dry_run_text(plan), end="")
        return EXIT_OK
    try:
        job_id = submit_planned(plan)
    except SubmitError as err:
        print(f"hicmae-dist submit: {err}", file=sys.stderr)
        return EXIT_FAILURE
    print(submitted_text(plan, job_id))
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from hicmae_dist.launch.jobs import Registry, format_table, list_jobs

    statuses = list_jobs(
        Registry(args.registry), job_ids=args.job_ids, active_only=args.active, last=None if args.job_ids else args.last
    )
    if args.json:
        print(json.dumps([asdict(s) for s in statuses], indent=1))
    else:
        print(format_table(statuses, long=args.long or bool(args.job_ids)))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from hicmae_dist.launch.jobs import Registry, cancel

    registry = Registry(args.registry)
    unknown = [j for j in args.job_ids if registry.get(j) is None]
    if unknown and not args.force:
        print(
            f"hicmae-dist cancel: {', '.join(unknown)} not in {registry.path} (not submitted by "
            f"`hicmae-dist submit`?); --force cancels anyway",
            file=sys.stderr,
        )
        return 1
    try:
        cancel(args.job_ids)
    except (RuntimeError, OSError) as err:
        print(f"hicmae-dist cancel: {err}", file=sys.stderr)
        return 1
    print(
        f"cancelled {' '.join(args.job_ids)}: a running job gets SIGTERM, saves a checkpoint at the next "
        f"step if it can before Slurm's KillWait ends, and stops; `hicmae-dist submit` with the same "
        f"--run-dir resumes it"
    )
    return 0


def _add_slurm_verbs(sub: argparse._SubParsersAction) -> None:
    """submit, jobs and cancel (the launch layer's verbs)."""
    from hicmae_dist.launch.submit import list_clusters

    run = _run_options(
        preset="config preset name or path to a YAML config",
        run_dir="checkpoints, metrics, MLflow store; shared with the nodes",
        resume="auto: continue from the run dir's newest checkpoint (default); never: refuse one",
    )
    s = sub.add_parser(
        "submit",
        parents=[run],
        help="submit a pretraining run to Slurm (checkpoints and requeues itself)",
        description="Submit `pretrain` as a Slurm job through submitit: one task per GPU (or "
        "--tasks-per-node CPU tasks over gloo), torch.distributed from Slurm's "
        "environment. On USR2 (the time limit is near, or a preemption) the job "
        "saves a checkpoint at the next step, requeues itself and resumes the same "
        "MLflow run. Flags override the --cluster preset "
        f"(known: {', '.join(list_clusters()) or 'none'}).",
    )
    s.add_argument("--data", help="directory of .tar shards (sets data.shards), as the nodes see it")
    s.add_argument("--world-size", type=_world_size, default=1, help="ranks assumed by --dry-run's estimates")
    _add_job_shape(s.add_argument_group("job shape (default: the --cluster preset, else 1 node x 1 CPU task, 60 min)"))
    s.add_argument(
        "--registry", help="job registry file (default $HICMAE_DIST_JOBS or ~/.cache/hicmae-dist/jobs.jsonl)"
    )
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="print the sbatch script submitit would submit and exit (needs no data, no Slurm)",
    )
    f = s.add_argument_group("fine-tuning (with --splits the job runs `finetune` instead of `pretrain`)")
    f.add_argument("--splits", help="directory of split01/ ... annotation files, as the nodes see it")
    f.add_argument("--folds", default="1", help="1-5, 1,3 or all (default 1)")
    f.add_argument("--dataset", help="dataset preset")
    f.add_argument("--pretrained", help="pretraining run dir, our weights file, or the authors' checkpoint")
    f.add_argument("--from-scratch", action="store_true", help="random initialisation")
    s.set_defaults(func=cmd_submit)
    _add_job_verbs(sub)


def _add_job_shape(g: argparse._ArgumentGroup) -> None:
    """submit's job-shape flags (each overrides the --cluster preset's value)."""
    g.add_argument(
        "--cluster",
        help="cluster preset: a name from slurm/clusters/ (or $HICMAE_DIST_CLUSTERS, "
        "~/.config/hicmae-dist/clusters) or a YAML path",
    )
    g.add_argument("--nodes", type=int, help="nodes")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node, one task each; 0 = a CPU job")
    g.add_argument("--tasks-per-node", type=int, help="tasks (ranks) per node of a CPU job")
    g.add_argument("--cpus-per-task", type=int, help="CPUs per task (data workers + 1 is a good start)")
    g.add_argument("--mem", help="memory per node: 64G, 500M; 0 = all of it")
    g.add_argument("--time", help="time limit: minutes or [D-]HH:MM:SS")
    g.add_argument("--partition", help="partition")
    g.add_argument("--account", help="account to charge")
    g.add_argument("--qos", help="quality of service")
    g.add_argument("--constraint", help="node features, e.g. a100|h100")
    g.add_argument(
        "--sbatch",
        action="append",
        metavar="KEY[=VALUE]",
        help="extra sbatch option, repeatable: --sbatch exclusive --sbatch mail-type=END",
    )
    g.add_argument(
        "--signal-delay-s",
        type=int,
        help="USR2 this many seconds before the time limit (default 120): enough for a step plus a checkpoint save",
    )
    g.add_argument(
        "--max-timeouts", type=int, help="time-limit requeues allowed (default 3); preemptions always requeue"
    )
    g.add_argument("--job-name", help="Slurm job name (default hicmae-<run dir name>)")
    g.add_argument("--log-dir", help="submitit folder, one subdirectory per job (default RUN_DIR/slurm)")


def _add_job_verbs(sub: argparse._SubParsersAction) -> None:
    """jobs and cancel."""
    s = sub.add_parser(
        "jobs",
        help="list this user's hicmae-dist Slurm jobs: state, step, loss, MLflow run",
        description="Jobs from `hicmae-dist submit` (the registry), with Slurm's state "
        "(squeue, sacct), the run dir's step, last loss and MLflow run, requeues "
        "and, for a failed job, its error.",
    )
    s.add_argument("job_ids", nargs="*", metavar="JOB", help="only these jobs (shown in detail)")
    s.add_argument("--active", action="store_true", help="only queued and running jobs")
    s.add_argument("--last", type=int, default=20, help="the last N submissions (default 20)")
    s.add_argument("-l", "--long", action="store_true", help="log paths, MLflow store, attempts")
    s.add_argument("--json", action="store_true", help="one JSON list")
    s.add_argument("--registry", help="job registry file")
    s.set_defaults(func=cmd_jobs)

    s = sub.add_parser(
        "cancel",
        help="cancel hicmae-dist Slurm jobs",
        description="scancel: the job gets SIGTERM, saves a checkpoint at the next step if "
        "it can within Slurm's KillWait, and is not requeued.",
    )
    s.add_argument("job_ids", nargs="+", metavar="JOB", help="job ids (see `hicmae-dist jobs`)")
    s.add_argument("--force", action="store_true", help="also cancel jobs the registry does not know")
    s.add_argument("--registry", help="job registry file")
    s.set_defaults(func=cmd_cancel)


def cmd_export(args: argparse.Namespace) -> int:
    from hicmae_dist.train.export import export_weights

    converted = export_weights(Path(args.run_dir), Path(args.out), to=args.to)
    n = sum(t.numel() for t in converted.state_dict.values())
    print(
        f"wrote {args.out}: {converted.arch} {converted.kind} weights, {n:,} parameters, "
        f"{'the authors' if args.to == 'upstream' else 'our'} naming"
    )
    return 0


def cmd_ckpt_universal(args: argparse.Namespace) -> int:
    from hicmae_dist.train.checkpoint import ResumeError, to_universal, verify_checkpoint
    from hicmae_dist.train.rundir import RunDir

    run = RunDir(args.run_dir)
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        raise FileNotFoundError(
            f"{args.run_dir}: no checkpoint ({run.latest_pointer.relative_to(run.path)} is missing)"
        )
    problem = verify_checkpoint(ckpt)
    if problem is not None:  # never convert a torn checkpoint into one that loads
        raise ResumeError(
            f"{ckpt} does not verify ({problem[1]}); the next training start moves it aside and resumes from "
            f"the one before it"
        )
    print(f"universal checkpoint: {to_universal(ckpt)}")
    return 0


def version_text() -> str:
    """`--version`: the package, and what its native extension was built with (a plain
    `pip install .` may build it without CUDA kernels: this is where a user sees it)."""
    import platform

    import torch

    from hicmae_dist import __version__
    from hicmae_dist.ops import gather

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    text = (
        f"hicmae-dist {__version__}: {gather.native_build()}; torch {torch.__version__} ({cuda}); "
        f"Python {platform.python_version()}"
    )
    if torch.version.cuda and gather.native_available() and not gather.native_built_with_cuda():
        text += (
            "\nnote: torch is a CUDA build but hicmae_dist._C has no CUDA kernels (built without nvcc, or "
            "in an isolated build against another torch): `pip install --no-build-isolation .` where nvcc is"
        )
    return text


class _VersionAction(argparse.Action):
    """Like argparse's "version", but the text (which imports torch) is made only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hicmae-dist", description=__doc__, epilog=EXIT_STATUS_HELP)
    p.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version and the native extension's build (CPU or CUDA kernels), then exit",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument(
        "--debug", action="store_true", help="print the traceback of every error (a user error is one line without it)"
    )
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add_verbs in (
        _add_synth,
        _add_prepare,
        _add_pretrain,
        _add_weights_verbs,
        _add_model_verbs,
        _add_bench_verbs,
        _add_finetune_verbs,
        _add_infer_verbs,
        _add_doctor,
        _add_sync,
        _add_slurm_verbs,
    ):
        add_verbs(sub)
    _add_global_flags(p)
    return p


def _add_synth(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "synth",
        help="write a synthetic VoxCeleb2-like corpus of real mp4/m4a files",
        description="Write clips whose hidden class sets both a visual pattern and a sound, "
        "in VoxCeleb2's layout: OUT/dev/mp4/idNNNNN/VIDEO/NNNNN.mp4 and "
        "OUT/dev/aac/idNNNNN/VIDEO/NNNNN.m4a, plus OUT/labels.csv.",
    )
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--clips", type=int, required=True, help="number of clips")
    s.add_argument("--classes", type=int, default=4, help="hidden audio-visual classes (default 4)")
    s.add_argument("--speakers", type=int, default=None, help="speaker ids (default: clips / 4)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same corpus")
    s.add_argument("--duration", type=float, default=3.2, help="clip length in seconds (>= 2.56)")
    s.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel encoders")
    s.add_argument(
        "--downstream",
        action="store_true",
        help="write a fine-tuning set instead: face-frame folders, 16 kHz wavs and annotation files "
        "(frame_dir wav_path label) in subject-independent folds (OUT/splits/splitNN/"
        "{train,val,test}.csv); --speakers sets the subjects",
    )
    s.add_argument("--folds", type=int, default=5, help="with --downstream: folds (default 5)")
    s.add_argument(
        "--regression",
        action="store_true",
        help="with --downstream: two float labels (valence, arousal) per clip instead of the class",
    )
    s.add_argument(
        "--multilabel",
        action="store_true",
        help="with --downstream: 1-3 of the classes per clip (sounds summed, shapes overlaid), in the "
        "CAV-MAE release's layout: OUT/frames/frame_{0..9}/ID.jpg, OUT/audio/ID.wav, "
        "OUT/splits/class_labels_indices.csv, OUT/splits/splitNN/{train,val,test}.json",
    )
    s.set_defaults(func=cmd_synth)


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "prepare",
        help="decode a VoxCeleb2-layout corpus into tar shards, once",
        description="Decode every clip under SRC (dev/mp4 + dev/aac, or a .wav beside each mp4) "
        "once and write tar shards, an index beside each, and manifest.json to OUT. "
        "Bad clips are skipped, counted and listed with their reason. Resumable: run "
        "it again after a crash or a kill and it writes only the missing shards.",
    )
    s.add_argument("--src", required=True, help="corpus root (holds dev/mp4 and dev/aac)")
    s.add_argument("--out", required=True, help="shard directory")
    s.add_argument("--shard-size", default=None, help="target shard size: 1GB (default), 500MB, 64MiB, or bytes")
    s.add_argument("--shard-size-mb", type=float, default=None, help=argparse.SUPPRESS)  # the older spelling (MiB)
    s.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel decoders (threads)")
    s.add_argument("--limit", type=int, default=None, help="only the first N clips (sorted by key)")
    s.add_argument(
        "--speakers", default=None, help="only these speakers: N (the first N ids) or a comma-separated list of ids"
    )
    s.add_argument(
        "--image-size",
        type=int,
        default=160,
        choices=(160, 192, 224),
        help="stored frame side: 160 or 192 (the spec's face crops) or 224 (the whole frame)",
    )
    s.add_argument(
        "--full-frame",
        action="store_true",
        help="store the whole 224x224 frame (CAV-MAE's input; HiCMAE's loader cuts its crop from it)",
    )
    s.add_argument(
        "--frames",
        choices=("stride", "ten"),
        default="stride",
        help="stride: every 4th frame (HiCMAE, default); ten: CAV-MAE's 10 frames per clip",
    )
    s.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the stored frames (default 90)")
    s.add_argument(
        "--audio-form",
        choices=("wave", "fbank"),
        default="wave",
        help="wave: the clip's audio as int16 PCM (default); fbank: its 128-bin log-mel fbank as "
        "float16, which the loader slices instead of computing it (train with "
        "data.audio_form=fbank; see docs/data.md)",
    )
    s.add_argument(
        "--max-av-diff",
        type=float,
        default=0.5,
        help="skip clips whose audio and video durations differ by more seconds (default 0.5)",
    )
    s.add_argument("--no-resample", action="store_true", help="skip audio not at 16 kHz instead of resampling it")
    s.add_argument("--seed", type=int, default=0, help="seed of the clip order across shards (default 0)")
    s.add_argument("--no-shuffle", action="store_true", help="write clips in key order (speakers not mixed)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    s.set_defaults(func=cmd_prepare)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "pretrain",
        parents=[_run_options(run_dir_required=False)],
        help="pretrain a model on shards with DeepSpeed, tracked in MLflow",
        description="Pretrain with a preset plus dotted overrides, e.g. "
        "`hicmae-dist pretrain --preset tiny-cpu --data shards/ --run-dir runs/a "
        f"train.steps=50 model.width=128` (overrides may come anywhere on the "
        f"line). Presets: {', '.join(list_presets())}.",
        epilog=EXIT_STATUS_HELP,
    )
    s.add_argument("--data", help="directory of .tar shards (sets data.shards)")
    s.add_argument(
        "--dry-run", action="store_true", help="validate the preset and overrides, print the resolved config and exit"
    )
    s.add_argument("--world-size", type=_world_size, default=1, help="ranks assumed by --dry-run's estimates")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_pretrain)


def _add_weights_verbs(sub: argparse._SubParsersAction) -> None:
    """export and ckpt universal."""
    s = sub.add_parser(
        "export",
        help="write a run's consolidated fp32 weights for fine-tuning",
        description="Gather the fp32 weights of the latest checkpoint of RUN_DIR from all "
        "ZeRO partitions into one file (loads with weights_only=True).",
    )
    s.add_argument("run_dir", help="a pretraining run directory")
    s.add_argument("out", help="output .pth file")
    s.add_argument(
        "--to",
        choices=("ours", "upstream"),
        default="ours",
        help="ours: our names plus the model config (default); upstream: the authors' names",
    )
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("ckpt", help="checkpoint tools")
    ckpt_sub = s.add_subparsers(dest="ckpt_verb", required=True, metavar="TOOL")
    u = ckpt_sub.add_parser(
        "universal",
        help="convert the latest checkpoint to DeepSpeed's universal format",
        description="Convert RUN_DIR's latest checkpoint to a universal checkpoint under "
        "checkpoints/universal/ (loadable at any world size). `pretrain "
        "--resume auto` does this by itself when the world size changed.",
    )
    u.add_argument("run_dir", help="a pretraining run directory")
    u.set_defaults(func=cmd_ckpt_universal)


def _add_global_flags(parser: argparse.ArgumentParser, seen: set[int] | None = None) -> None:
    """-v and --debug after the verb too (`hicmae-dist pretrain ... --debug`). SUPPRESS: a verb's
    parser sets them only when given, so it never resets what came before the verb."""
    seen = set() if seen is None else seen
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in action.choices.values():
            if id(child) in seen:
                continue
            seen.add(id(child))
            child.add_argument(
                "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )
            child.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help="print the traceback of every error"
            )
            _add_global_flags(child, seen)


_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=.*", re.DOTALL)  # key=value


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, with key=value overrides accepted anywhere on the line: argparse fills a
    `nargs="*"` positional from the first run of positionals only and calls the rest
    unrecognized (`train.steps=50 --dry-run model.width=128`). They are appended in order."""
    args, extra = parser.parse_known_args(argv)
    late = [t for t in extra if _OVERRIDE.fullmatch(t)] if hasattr(args, "overrides") else []
    unknown = [t for t in extra if t not in late]
    if unknown:
        verb = f"hicmae-dist {args.verb}"
        parser.exit(
            EXIT_USAGE, f"{verb}: unrecognized arguments: {' '.join(unknown)} (`{verb} --help` lists the options)\n"
        )
    if late:
        args.overrides = [*args.overrides, *late]
    return args


# Failures whose message says it all, by the module that defines them: a raised one's module is
# loaded, so looking it up in sys.modules imports nothing (and keeps `--help` fast).
_FAILURES = [
    ("hicmae_dist.train.checkpoint", "ResumeError"),
    ("hicmae_dist.data.loader", "BadDataError"),
    ("hicmae_dist.models.convert", "ConversionError"),
    ("hicmae_dist.train.checkpoint", "DiskFullError"),
    ("hicmae_dist.tracking", "TrackingUnavailable"),
]


def _failure_types() -> tuple[type, ...]:
    found = (getattr(sys.modules.get(module), name, None) for module, name in _FAILURES)
    return tuple(t for t in found if isinstance(t, type))


def _disk_full(err: BaseException | None) -> OSError | None:
    """The ENOSPC error behind err (itself, or what it was raised from or while handling), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return err
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def user_error(err: BaseException) -> tuple[int, str] | None:
    """(exit status, one-line message) for an error the user can act on from its message: 2 for
    usage and config errors, 1 for failures (bad data, a checkpoint that cannot resume, a file
    that is missing or unreadable, a full disk, non-finite losses). None for anything else: a
    bug, whose traceback must stay visible."""
    if isinstance(err, ConfigError):
        return EXIT_USAGE, str(err)
    if isinstance(err, (FloatingPointError, *_failure_types())):  # DiskFullError included: its own words
        return EXIT_FAILURE, str(err)
    full = _disk_full(err)
    if full is not None:  # "[Errno 28] No space left on device: 'x'" -> "No space left on device while writing x"
        if not full.strerror:
            return EXIT_FAILURE, str(full)
        return EXIT_FAILURE, full.strerror + (f" while writing {full.filename}" if full.filename else "")
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        if err.strerror and err.filename:
            return EXIT_FAILURE, f"{err.filename}: {err.strerror}"
        return EXIT_FAILURE, str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"hicmae-dist {args.verb}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_CTRL_C
    except Exception as err:
        known = user_error(err)
        if known is None:
            raise  # a bug: the traceback, exit status 1
        if args.debug:
            traceback.print_exc()
        print(f"hicmae-dist {args.verb}: {known[1]}", file=sys.stderr)
        return known[0]


if __name__ == "__main__":
    sys.exit(main())
