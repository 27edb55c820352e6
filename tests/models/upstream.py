"""The authors' state-dict layouts, as facts the model and converter tests check against.

upstream_keys/<name>.txt was dumped from each release's model (key, shape, dtype per line; a
header with the per-top-module parameter counts and, for CAV-MAE, its frozen parameters).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

KEYS_DIR = Path(__file__).parent / "upstream_keys"


@dataclass(frozen=True)
class KeyFile:
    shapes: dict[str, tuple[int, ...]]  # key -> shape, in the release's order
    per_module: dict[str, int]  # top-level module -> parameter count
    frozen: list[str]  # parameters with requires_grad=False


def read_key_file(name: str) -> KeyFile:
    path = KEYS_DIR / f"{name}.txt"
    if not path.exists():
        raise FileNotFoundError(f"no key list {path}: expected one of {sorted(p.stem for p in KEYS_DIR.glob('*.txt'))}")
    shapes, per_module, frozen = {}, {}, []
    for line in path.read_text().splitlines():
        if line.startswith("# per-top-module params="):
            per_module = ast.literal_eval(line.split("=", 1)[1])
        elif line.startswith("# frozen (requires_grad=False) params:"):
            frozen = ast.literal_eval(line.split(":", 1)[1].strip())
        elif line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            if dtype != "float32":
                raise ValueError(f"{path}: {key} is {dtype}, the releases store float32")
            shapes[key] = tuple(ast.literal_eval(shape))
    return KeyFile(shapes, per_module, frozen)
