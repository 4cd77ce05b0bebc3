"""Peak memory of a span of training (one SFT phase): CUDA allocator peak, or sampled process RSS.

On CPU there is no allocator peak to ask for, and ``resource.getrusage`` only gives the peak
since the process started (it never goes down), so a thread samples the resident set size from
``/proc/self/statm`` every few milliseconds. Short-lived spikes between samples can be missed;
allocations that matter here (gradients, optimizer state, weight copies) live for a whole step.
Without ``/proc`` (macOS) it falls back to ``getrusage``, a monotonic peak.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path

import torch

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process (peak-so-far where /proc is missing)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """``start()`` ... ``stop() -> MiB``: the highest memory use in between, on ``device``."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.running = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._peak = 0

    def start(self) -> None:
        self.stop()
        self.running = True
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="xlpeft-peak-rss", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def stop(self) -> float:
        """End the span; its peak in MiB (0.0 if it was not running)."""
        if not self.running:
            return 0.0
        self.running = False
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return max(self._peak, rss_bytes()) / 2**20
