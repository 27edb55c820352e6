"""Checkpoint converters between the authors' releases and our modules, both ways.

    ours = to_ours(torch_load_weights(path), arch="cavmae")    # Converted(arch, kind, cfg, ...)
    theirs = to_upstream(ours.state_dict, arch="cavmae")       # plain {their key: tensor}

The renaming tables below are the one place the upstream naming quirks live. Each row pairs a
key prefix of ours with the authors' prefix for the same tensors (a trailing "$" makes it a whole
key); the first row whose side matches renames the key, in either direction. Then single dotted
components are renamed (e.g. HiCMAE's cross_norm1 = our cross_norm_q). Tensors are never
reshaped or copied, so ours -> theirs -> ours is the identity.

Every source key must be consumed and every key of the target model filled with the right shape;
otherwise ConversionError names each key left over, missing or of the wrong shape. Which model
and size to build is inferred from the keys and shapes (depths, widths, classes, token grids) or
given as a ModelConfig; the head counts, which no shape shows, follow head_dim 64 (CAV-MAE's
decoder: 32, i.e. its 16 heads at width 512).

Released CAV-MAE files are DataParallel state dicts (keys prefixed `module.`); HiCMAE files wrap
the weights under "model" (or "module"); both are unwrapped. Files load with weights_only=True.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hicmae_dist.config import ModelConfig, model_config_from_dict
from hicmae_dist.models import build_finetune_model, build_model, get_spec, model_specs

KINDS = ("pretrain", "finetune")
OURS, THEIRS = 0, 1


class ConversionError(ValueError):
    """Keys left over or missing, shapes that differ, or a file that is not a checkpoint."""


@dataclass
class Converted:
    arch: str  # "hicmae" | "cavmae"
    kind: str  # "pretrain" | "finetune"
    cfg: ModelConfig
    num_classes: int | None  # fine-tune models only
    state_dict: dict[str, torch.Tensor]  # in the target naming

    def build(self, device: str | torch.device | None = None) -> nn.Module:
        """Our model of this kind and size (random init), without the weights."""
        return build(self.arch, self.kind, self.cfg, self.num_classes, device)

    def load_model(self) -> nn.Module:
        """Our model with these weights (state_dict must be in our naming), strictly loaded."""
        model = self.build()
        model.load_state_dict(self.state_dict, strict=True)
        return model


# --- renaming --------------------------------------------------------------------------------


@functools.cache
def _compile(arch: str, side: int) -> list[tuple[re.Pattern, str]]:
    """Row (ours, theirs) -> (regex on `side`, replacement prefix on the other side)."""
    rules = []
    for row in get_spec(arch).upstream.RENAMES:
        src, dst = row[side], row[1 - side]
        exact = src.endswith("$")
        pattern = "^" + re.escape(src.rstrip("$")) + ("$" if exact else "(?P<rest>.*)$")
        rules.append((re.compile(pattern), dst.rstrip("$")))
    return rules


def rename_key(key: str, arch: str, to: str) -> str | None:
    """Our key -> theirs (to="upstream") or theirs -> ours (to="ours"); None if no row matches."""
    components = get_spec(arch).upstream.COMPONENTS
    side = THEIRS if to == "ours" else OURS
    for pattern, replacement in _compile(arch, side):
        match = pattern.match(key)
        if match:
            out = replacement + match.groupdict().get("rest", "")
            break
    else:
        return None
    parts = {row[side]: row[1 - side] for row in components}
    return ".".join(parts.get(part, part) for part in out.split("."))


# --- unwrapping and loading ---------------------------------------------------------------------


def unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """The flat {key: tensor} of a checkpoint: under "model", "module" or "state_dict" if it is
    wrapped, with a DataParallel `module.` prefix (on every key) removed."""
    if not isinstance(obj, dict):
        raise ConversionError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for wrapper in ("model", "module", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ConversionError(f"no tensors found (top-level keys: {', '.join(map(str, list(obj)[:10]))})")
    if len(state) != len(obj):
        others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        raise ConversionError(f"entries that are not tensors: {', '.join(map(str, others[:10]))}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def torch_load_weights(path: str | Path) -> Any:
    """torch.load(weights_only=True). HiCMAE's training checkpoints also pickle the run's
    argparse.Namespace beside the weights: that one class is allowed (its contents still go
    through the restricted unpickler)."""
    if not Path(path).is_file():
        raise ConversionError(f"{path}: " + ("not a file" if Path(path).exists() else "no such file"))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # unreadable (permissions, I/O): the error names the file
    except Exception as err:  # noqa: BLE001  text, a cut file, another format: torch says it many ways
        detail = _first_sentence(str(err).split("WeightsUnpickler error:", 1)[-1])
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in detail:
            raise ConversionError(
                f"{path}: not loadable with weights_only=True (pickled code is never run): {detail}"
            ) from err
        raise ConversionError(
            f"{path}: not a PyTorch checkpoint (expected a file written by torch.save holding "
            f"a state dict, or a dict with one; torch.load: {type(err).__name__}: {detail})"
        ) from err


def _first_sentence(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line.split(". ", 1)[0][:300]


# --- what to build ---------------------------------------------------------------------------------


def detect_arch(state: dict[str, torch.Tensor]) -> str:
    """From the authors' or our keys: the family whose marker prefixes they hold."""
    for name, spec in model_specs().items():
        if any(k.startswith(spec.upstream.MARKERS) for k in state):
            return name
    markers = "; ".join(f"{name}: {', '.join(spec.upstream.MARKERS)}" for name, spec in model_specs().items())
    raise ConversionError(
        f"cannot tell the model from the keys (none of the families' marker prefixes: "
        f"{markers}); first keys: {', '.join(sorted(state)[:8])}"
    )


def key_depth(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many blocks `prefix`0., `prefix`1., ... the keys hold."""
    indices = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not indices:
        raise ConversionError(f"no blocks under {prefix!r}")
    return max(indices) + 1


def key_shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"missing key {key!r}, needed to infer the model's size")
    return tuple(state[key].shape)


def infer(
    arch: str, state: dict[str, torch.Tensor], cfg: ModelConfig | None = None, kind: str | None = None
) -> tuple[str, ModelConfig, int | None]:
    """(kind, config, num_classes) from a state dict in the authors' naming. A given cfg is
    used as is (only its arch is checked); a given kind is checked against the keys."""
    upstream = get_spec(arch).upstream
    found = upstream.upstream_kind(state)
    if kind is not None and kind != found:
        raise ConversionError(f"asked for a {kind} model but the keys are those of a {found} model")
    num_classes = key_shape(state, upstream.HEAD_KEY)[0] if found == "finetune" else None
    if cfg is not None:
        if cfg.arch != arch:
            raise ConversionError(f"config arch {cfg.arch!r} but the weights are {arch!r}")
        return found, cfg, num_classes
    cfg = upstream.infer_config(state, found)
    try:
        cfg.validate()
    except ValueError as err:
        raise ConversionError(f"inferred config is not valid ({err}); pass a ModelConfig") from err
    return found, cfg, num_classes


def build(
    arch: str, kind: str, cfg: ModelConfig, num_classes: int | None = None, device: str | torch.device | None = None
) -> nn.Module:
    with torch.device(device or "cpu"):
        return build_model(cfg) if kind == "pretrain" else build_finetune_model(cfg, num_classes)


def expected_shapes(arch: str, kind: str, cfg: ModelConfig, num_classes: int | None) -> dict[str, tuple[int, ...]]:
    """Our model's state-dict keys and shapes, from a model on the meta device (no memory)."""
    return {k: tuple(v.shape) for k, v in build(arch, kind, cfg, num_classes, "meta").state_dict().items()}


# --- conversion --------------------------------------------------------------------------------------


def _convert(
    state: dict[str, torch.Tensor], arch: str, to: str, expected: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Rename every key; check the result against the expected keys and shapes (target naming)."""
    out: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    left_over, collisions = [], []
    for key, tensor in state.items():
        new = rename_key(key, arch, to)
        if new is None or new not in expected:
            left_over.append(key if new is None else f"{key} (-> {new})")
        elif new in out:
            collisions.append(f"{key} and {source_of[new]} -> {new}")
        else:
            out[new], source_of[new] = tensor, key
    missing = [k for k in expected if k not in out]
    mismatched = [
        f"{source_of[k]} -> {k}: {tuple(out[k].shape)} in the file, {expected[k]} in the model"
        for k in out
        if tuple(out[k].shape) != expected[k]
    ]
    problems = []
    for title, items in (
        ("keys left over (no place in the model)", left_over),
        ("keys missing (not filled by the file)", missing),
        ("shape mismatches", mismatched),
        ("keys mapped twice", collisions),
    ):
        if items:
            shown = "\n  ".join(items[:20]) + (f"\n  ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"{len(items)} {title}:\n  {shown}")
    if problems:
        side = "the authors'" if to == "ours" else "our"
        raise ConversionError(f"{arch}: cannot convert {side} state dict:\n" + "\n".join(problems))
    return out


def to_ours(obj: Any, arch: str | None = None, cfg: ModelConfig | None = None, kind: str | None = None) -> Converted:
    """The authors' checkpoint (state dict, possibly wrapped) -> our state dict, with the config,
    kind and class count to build the model it loads into strictly."""
    state = unwrap(obj)
    found = detect_arch(state)
    if arch is not None and arch != found:
        raise ConversionError(f"--from {arch}, but the keys are those of a {found} checkpoint")
    kind, cfg, num_classes = infer(found, state, cfg, kind)
    ours = _convert(state, found, "ours", expected_shapes(found, kind, cfg, num_classes))
    return Converted(found, kind, cfg, num_classes, ours)


def to_upstream(
    obj: Any, arch: str | None = None, cfg: ModelConfig | None = None, kind: str | None = None
) -> Converted:
    """Our state dict (or a file written by save_ours, or a wrapped one) -> the authors' naming.
    The result's state_dict is plain (no `module.` prefix; see upstream_file_payload)."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        arch = arch or obj["arch"]
        kind = kind or obj["kind"]
        cfg = cfg or model_config_from_dict(obj["model_config"])
    state = unwrap(obj)
    found = detect_arch(state)
    if arch is not None and arch != found:
        raise ConversionError(f"--from {arch}, but the keys are those of our {found} model")
    renamed = {}
    for key, tensor in state.items():  # rename to infer the size from the authors' names
        new = rename_key(key, found, "upstream")
        if new is not None:
            renamed[new] = tensor
    kind, cfg, num_classes = infer(found, renamed, cfg, kind)
    expected_theirs = {
        rename_key(k, found, "upstream"): shape for k, shape in expected_shapes(found, kind, cfg, num_classes).items()
    }
    theirs = _convert(state, found, "upstream", expected_theirs)
    return Converted(found, kind, cfg, num_classes, theirs)


def _check_ours(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], arch: str) -> None:
    """Our keys must be exactly the model's, with its shapes."""
    identity = {k: k for k in state}
    left_over = [k for k in identity if k not in expected]
    missing = [k for k in expected if k not in state]
    mismatched = [
        f"{k}: {tuple(state[k].shape)} in the file, {expected[k]} in the model"
        for k in state
        if k in expected and tuple(state[k].shape) != expected[k]
    ]
    if left_over or missing or mismatched:
        raise ConversionError(
            f"{arch}: our state dict does not fit the model: "
            f"left over {left_over[:20]}, missing {missing[:20]}, shapes {mismatched[:20]}"
        )


# --- files ---------------------------------------------------------------------------------------------

FORMAT = "hicmae-dist/weights-v1"


def ours_file_payload(converted: Converted) -> dict[str, Any]:
    """What save writes for our side: weights plus what is needed to rebuild the model; plain
    types only, so it loads with weights_only=True."""
    return {
        "format": FORMAT,
        "arch": converted.arch,
        "kind": converted.kind,
        "num_classes": converted.num_classes,
        "model_config": dataclasses.asdict(converted.cfg),
        "state_dict": converted.state_dict,
    }


def upstream_file_payload(converted: Converted) -> dict[str, Any]:
    """The layout the authors' code loads (the family's upstream_payload)."""
    return get_spec(converted.arch).upstream.upstream_payload(converted.state_dict)


def load_ours(path: str | Path) -> Converted:
    """A file written by `hicmae-dist convert` (our side) -> Converted (use .load_model())."""
    return _ours_from_payload(torch_load_weights(path), path)


def load_weights(path: str | Path) -> Converted:
    """Our weights file, or the authors' checkpoint (converted to our names on the way)."""
    obj = torch_load_weights(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _ours_from_payload(obj, path)
    try:
        return to_ours(obj)
    except ConversionError as err:
        raise ConversionError(f"{path}: {err}") from None


def _ours_from_payload(obj: Any, path: str | Path) -> Converted:
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT):
        raise ConversionError(f"{path}: not a {FORMAT} file")
    converted = Converted(
        obj["arch"], obj["kind"], model_config_from_dict(obj["model_config"]), obj["num_classes"], obj["state_dict"]
    )
    _check_ours(
        converted.state_dict,
        expected_shapes(converted.arch, converted.kind, converted.cfg, converted.num_classes),
        converted.arch,
    )
    return converted


def convert_file(src: str | Path, dst: str | Path, arch: str | None = None, to: str = "ours") -> Converted:
    """The CLI's work: read src (weights_only), convert, check, write dst."""
    obj = torch_load_weights(src)
    if to not in ("ours", "upstream"):
        raise ValueError(f"to {to!r}: expected 'ours' or 'upstream'")
    try:
        converted = to_ours(obj, arch) if to == "ours" else to_upstream(obj, arch)
    except ConversionError as err:
        raise ConversionError(f"{src}: {err}") from None
    payload = ours_file_payload(converted) if to == "ours" else upstream_file_payload(converted)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, dst)
    return converted
