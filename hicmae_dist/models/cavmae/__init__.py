"""CAV-MAE (SPEC.md section 2): modality-specific blocks, shared blocks, a joint decoder.

config.py holds the family's model section (imported by hicmae_dist.config by name, so this
package imports nothing at import time), model.py the model classes, upstream.py the authors'
key names and file layout, macs.py the MACs count, spec.py the SPEC that hicmae_dist.models finds,
presets/ the shipped presets.
"""
from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # SPEC pulls in torch and the model classes: loaded on first use, not by `import config`
    if name == "SPEC":
        from hicmae_dist.models.cavmae.spec import SPEC

        return SPEC
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
