"""Progress of a long loop: a tqdm bar on a terminal; in a Slurm log or a pipe no bar (no
carriage returns) but one log line per window: step, loss, clips/s, step time, ETA."""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import timedelta

from tqdm import tqdm

log = logging.getLogger("hicmae_dist.progress")


def _on_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TQDM_DISABLE", "") in ("", "0")


class Progress:
    """`enabled`: this rank reports (rank 0). `bar`: a bar is wanted (and drawn only on a terminal)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, bar: bool = True, stream=None):
        stream = stream or sys.stderr
        self.enabled, self.total, self.desc = enabled, total, desc
        self.tty = enabled and bar and _on_terminal(stream)
        self._bar = tqdm(total=total, initial=initial, desc=desc, disable=not self.tty, dynamic_ncols=True, file=stream)
        self._start, self._start_step = time.perf_counter(), initial

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def window(self, step: int, metrics: dict[str, float], step_time_s: float | None = None) -> None:
        """Report a finished log window: the bar's postfix on a terminal, else one line."""
        if not self.enabled:
            return
        if self.tty:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
            return
        if step_time_s is None:
            step_time_s = (time.perf_counter() - self._start) / max(step - self._start_step, 1)
        eta = timedelta(seconds=round(max(self.total - step, 0) * step_time_s))
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        log.info("%s step %d/%d %s step_time %.3gs eta %s", self.desc, step, self.total, shown, step_time_s, eta)

    def close(self) -> None:
        self._bar.close()
