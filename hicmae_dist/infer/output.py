"""Files of embed (Parquet or .npz) and predict (CSV or JSON), and the problems report beside
them (<out stem>.problems.csv). Rows: one per window (level "window") and one per video (level
"video", the mean over its windows); a skipped video has only its video row, status = why."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from hicmae_dist.config import ConfigError
from hicmae_dist.infer.run import ClipResult

EMBED_SUFFIXES = (".parquet", ".npz")
PREDICT_SUFFIXES = (".csv", ".json")


def check_out(out: Path, what: str) -> None:
    allowed = EMBED_SUFFIXES if what == "embed" else PREDICT_SUFFIXES
    if out.suffix.lower() not in allowed:
        raise ConfigError(f"--out {out}: {what} writes {' or '.join(allowed)}")


def problems_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.problems.csv")


def write_problems(results: list[ClipResult], out: Path) -> Path:
    path = problems_path(out)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "path", "kind", "message"])
        writer.writerows([p.video_id, p.path, p.kind, p.message] for r in results for p in r.problems)
    return path


def _rows(results: list[ClipResult]):
    """(video_id, path, level, window, start_s, end_s, status, {name: vector or None})."""
    for r in results:
        for w in range(len(r.start_s)):
            yield (
                r.id,
                r.path,
                "window",
                w,
                float(r.start_s[w]),
                float(r.end_s[w]),
                r.window_status[w],
                {k: t[w].numpy() for k, t in r.outputs.items()},
            )
        end = float(r.end_s[-1]) if len(r.end_s) else float("nan")
        yield (
            r.id,
            r.path,
            "video",
            -1,
            0.0 if len(r.start_s) else float("nan"),
            end,
            r.status,
            {k: t.numpy() for k, t in r.pooled.items()},
        )


def write_embeddings(results: list[ClipResult], out: Path) -> None:
    rows = list(_rows(results))
    names = sorted({k for *_, feats in rows for k in feats})
    columns = {
        "video_id": [r[0] for r in rows],
        "path": [r[1] for r in rows],
        "level": [r[2] for r in rows],
        "window": [r[3] for r in rows],
        "start_s": [r[4] for r in rows],
        "end_s": [r[5] for r in rows],
        "status": [r[6] for r in rows],
    }
    if out.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = {k: pa.array(v) for k, v in columns.items()}
        for name in names:
            table[name] = pa.array(
                [r[7][name].tolist() if name in r[7] else None for r in rows], type=pa.list_(pa.float32())
            )
        pq.write_table(pa.table(table), out)
        return
    arrays = {k: np.asarray(v) for k, v in columns.items()}
    for name in names:
        dim = next(r[7][name].shape[0] for r in rows if name in r[7])
        arrays[name] = np.stack([r[7][name] if name in r[7] else np.full(dim, np.nan, np.float32) for r in rows])
    np.savez(out, **arrays)


def write_predictions(results: list[ClipResult], out: Path, names: tuple[str, ...], regression: bool) -> None:
    rows = list(_rows(results))
    if out.suffix.lower() == ".json":
        out.write_text(
            json.dumps({"names": list(names), "videos": [_video_json(r, names, regression) for r in results]}, indent=1)
        )
        return
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "video_id",
                "path",
                "level",
                "window",
                "start_s",
                "end_s",
                "status",
                *([] if regression else ["predicted"]),
                *names,
            ]
        )
        for vid, path, level, w, start, end, status, outs in rows:
            values = outs.get("output")
            label = [] if regression else [names[int(values.argmax())] if values is not None else ""]
            cells = [f"{x:.6g}" for x in values] if values is not None else [""] * len(names)
            writer.writerow([vid, path, level, w, f"{start:.3f}", f"{end:.3f}", status, *label, *cells])


def _video_json(r: ClipResult, names: tuple[str, ...], regression: bool) -> dict:
    def named(t) -> dict[str, float]:
        return {n: float(x) for n, x in zip(names, t.tolist())}

    video = {"id": r.id, "path": r.path, "status": r.status, "problems": [p.message for p in r.problems]}
    if "output" in r.pooled:
        video["outputs"] = named(r.pooled["output"])
        if not regression:
            video["predicted"] = names[int(r.pooled["output"].argmax())]
        video["windows"] = [
            {"start_s": float(s), "end_s": float(e), "status": st, "outputs": named(o)}
            for s, e, st, o in zip(r.start_s, r.end_s, r.window_status, r.outputs["output"])
        ]
    return video


def infer_files(
    weights: str | Path,
    inputs: list[str],
    out: Path,
    what: str,
    *,
    fold: int | None = None,
    dataset: str | None = None,
    device: str | None = None,
    batch_size: int = 8,
    **options,
) -> dict:
    """The work of `embed` / `predict`: every input video through the weights, written to out
    and its problems report. Returns a summary (videos, windows, problems, files)."""
    from hicmae_dist.infer.model import InferenceModel, load_model
    from hicmae_dist.infer.run import run_inputs
    from hicmae_dist.infer.sources import list_inputs

    check_out(out, what)
    items = list_inputs(inputs)
    if not items:
        raise FileNotFoundError(f"no videos found in {', '.join(map(str, inputs))}")
    model = InferenceModel(load_model(weights, fold=fold, dataset=dataset), device, batch_size)
    if what == "predict":
        model.require_head()  # before any video is decoded
    results = run_inputs(model, items, what, **options)
    out.parent.mkdir(parents=True, exist_ok=True)
    if what == "embed":
        write_embeddings(results, out)
    else:
        write_predictions(results, out, model.names, model.task.regression)
    problems = write_problems(results, out)
    return {
        "videos": len(results),
        "skipped": sum(not len(r.start_s) for r in results),
        "windows": sum(len(r.start_s) for r in results),
        "problems": sum(len(r.problems) for r in results),
        "out": str(out),
        "problems_file": str(problems),
        "device": str(model.device),
    }
