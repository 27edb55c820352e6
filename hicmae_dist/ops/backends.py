"""One registry of the hot ops' backends: which may run, in which `auto` order, and why not.

Each op (ops/attention.py, ops/info_nce.py) declares one `OpBackends`: its backend names, each
with an availability check (None when it runs on this input, else the reason it cannot), and
per device type the candidates `auto` tries in order. `OpBackends.resolve` turns "auto" or an
explicit name into the backend that will run:
  - "auto": the first available candidate of the device type. A candidate skipped on a device
    type in `warn_skips_on` (CUDA: a fall-back there costs speed) is a warning, once per
    reason: never a silent fall-back. The pick is logged once per (device type, backend).
  - an explicit name: that backend, or RuntimeError naming the op, the backend and the reason.
Messages go to the op's own logger, so `hicmae_dist.ops.attention` says what attention ran.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from hicmae_dist.ops import triton as triton_pkg

# (device, probe) -> None when the backend can run, else why not. The probe is the op's first
# input (shape, dtype); None when the caller only knows the device.
Check = Callable[[torch.device, "torch.Tensor | None"], "str | None"]
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_unavailable(t: torch.Tensor) -> str | None:
    """Why our Triton kernels cannot run on `t` (device, Triton install, dtype), or None."""
    ok, why = triton_pkg.available(t.device)
    if not ok:
        return why
    if t.dtype not in TRITON_DTYPES:
        return f"triton kernels take float16, bfloat16 or float32, got {t.dtype}"
    return None


@dataclasses.dataclass
class OpBackends:
    """The backends of one op. checks: every explicit backend name -> its availability check
    (None: runs everywhere). auto: device type -> candidates in order, "*" for any other type;
    the last candidate of each list must run everywhere. fallback_text: how the fall-back
    warning names a backend (default its name)."""

    op: str
    logger: logging.Logger
    checks: dict[str, Check | None]
    auto: dict[str, tuple[str, ...]]
    fallback_text: dict[str, str] = dataclasses.field(default_factory=dict)
    warn_skips_on: tuple[str, ...] = ("cuda",)
    logged_picks: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    logged_skips: set[str] = dataclasses.field(default_factory=set)

    def __post_init__(self):
        for device_type, candidates in self.auto.items():
            if self.checks[candidates[-1]] is not None:
                raise ValueError(
                    f"ops.{self.op}: auto on {device_type} ends with "
                    f"{candidates[-1]!r}, which may not run; end with one that always runs"
                )

    @property
    def names(self) -> tuple[str, ...]:
        return ("auto", *self.checks)

    def unavailable(self, backend: str, device: torch.device, probe: torch.Tensor | None) -> str | None:
        check = self.checks[backend]
        return None if check is None else check(device, probe)

    def resolve(self, backend: str, device: torch.device | str, probe: torch.Tensor | None = None) -> str:
        """The backend that will run on `probe` (on `device` when no probe is at hand: an
        explicit backend is then not checked)."""
        if backend not in self.checks and backend != "auto":
            raise ValueError(f"{self.op} backend {backend!r}: expected one of {', '.join(self.names)}")
        device = torch.device(device)
        if backend == "auto":
            return self._auto(device, probe)
        why = None if probe is None else self.unavailable(backend, device, probe)
        if why is not None:
            raise RuntimeError(f"ops.{self.op} backend {backend!r} cannot run: {why}")
        return backend

    def _auto(self, device: torch.device, probe: torch.Tensor | None) -> str:
        candidates = self.auto.get(device.type, self.auto["*"])
        skipped = []
        for pick in candidates:
            why = self.unavailable(pick, device, probe)
            if why is None:
                break
            skipped.append((pick, why))
        if device.type in self.warn_skips_on:
            for name, why in skipped:
                if why not in self.logged_skips:
                    self.logged_skips.add(why)
                    self.logger.warning(
                        "ops.%s: backend 'auto' on %s cannot run %s (%s); running %s instead",
                        self.op,
                        device.type,
                        name,
                        why,
                        self.fallback_text.get(pick, pick),
                    )
        if (device.type, pick) not in self.logged_picks:
            self.logged_picks.add((device.type, pick))
            self.logger.info("ops.%s: backend 'auto' on %s runs %s", self.op, device.type, pick)
        return pick
