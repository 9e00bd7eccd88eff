"""Gate telemetry: the fraction of token updates skipped per adapter while serving.

The gated layers count, per adapter slot, the (token, module) updates they saw and kept. The worker
folds slot counts into per-adapter totals whenever a slot changes hands, and a daemon thread writes
the totals to a JSON file (`$TSPEFT_RT_GATE_STATS`) and logs a line per adapter every
`$TSPEFT_RT_GATE_LOG_INTERVAL` seconds (default 30) while they change. In the API server process the
plugin exports that file on vLLM's `/metrics` endpoint:

    tspeft_gate_token_updates_total{adapter="..."}          (token, module) updates routed to the adapter
    tspeft_gate_token_updates_skipped_total{adapter="..."}  of which the gate skipped
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

STATS_ENV = "TSPEFT_RT_GATE_STATS"
INTERVAL_ENV = "TSPEFT_RT_GATE_LOG_INTERVAL"
_FILE_PERIOD_S = 1.0

log = logging.getLogger("vllm.tspeft_rt")  # under vLLM's logger, so its handler prints it


class GateTelemetry:
    """Per-slot counters (written by the layers) and per-adapter totals (read by operators)."""

    def __init__(self) -> None:
        self.updates: list[int] = []
        self.kept: list[int] = []
        self.slot_adapter: list[int | None] = []
        self.names: dict[int, str] = {}
        self.totals: dict[int, list[int]] = {}
        self.device_counters: list[tuple] = []  # (updates [L], kept [L]) int64 CUDA tensors of the layers
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def ensure_slots(self, n: int) -> None:
        while len(self.updates) < n:
            self.updates.append(0)
            self.kept.append(0)
            self.slot_adapter.append(None)

    def record(self, slot: int, updates: int, kept: int) -> None:
        self.updates[slot] += updates
        self.kept[slot] += kept

    def bind(self, slot: int, adapter_id: int | None) -> None:
        """Attribute the slot's counts so far to its previous adapter; `adapter_id` holds it from now."""
        with self._lock:
            self._collect_device_counters()
            self._flush(slot)
            self.slot_adapter[slot] = adapter_id
        self._start_reporter()

    def _flush(self, slot: int) -> None:
        owner = self.slot_adapter[slot]
        if owner is not None and self.updates[slot]:
            total = self.totals.setdefault(owner, [0, 0])
            total[0] += self.updates[slot]
            total[1] += self.kept[slot]
        self.updates[slot] = self.kept[slot] = 0

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{adapter name: {updates, skipped, skip_rate}} over every token served so far."""
        with self._lock:
            self._collect_device_counters()
            for slot in range(len(self.updates)):
                self._flush(slot)
            out = {}
            for adapter_id, (updates, kept) in self.totals.items():
                if adapter_id in self.names and updates:
                    out[self.names[adapter_id]] = {"updates": updates, "skipped": updates - kept,
                                                   "skip_rate": (updates - kept) / updates}
            return out

    def _collect_device_counters(self) -> None:
        """Move the CUDA layers' counts to the host (one sync per report, never in the forward)."""
        for updates, kept in self.device_counters:
            u, k = updates.tolist(), kept.tolist()
            updates.sub_(torch.tensor(u, device=updates.device))  # the forward may add meanwhile
            kept.sub_(torch.tensor(k, device=kept.device))
            for slot, (du, dk) in enumerate(zip(u, k)):
                self.record(slot, du, dk)

    def _start_reporter(self) -> None:
        if self._thread is None and os.environ.get(STATS_ENV):
            self._thread = threading.Thread(target=self._report_forever, name="tspeft-gate-telemetry", daemon=True)
            atexit.register(self._stop.set)  # before the plugin's handler removes the file (atexit is LIFO)
            self._thread.start()

    def _report_forever(self) -> None:
        path = Path(os.environ[STATS_ENV])
        interval = float(os.environ.get(INTERVAL_ENV, "30"))
        last_written, last_logged, next_log = None, None, 0.0
        while not self._stop.wait(_FILE_PERIOD_S):
            stats = self.snapshot()
            if stats != last_written:
                write_stats(path, stats)
                last_written = stats
            if stats != last_logged and time.monotonic() >= next_log:
                for name, s in sorted(stats.items()):
                    log.info("tspeft-rt gate: adapter %r skipped %.1f%% of %d token updates",
                             name, 100 * s["skip_rate"], s["updates"])
                last_logged, next_log = stats, time.monotonic() + interval


def write_stats(path: Path, stats: dict) -> None:
    """Atomically replace the stats file (readers never see a partial one)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, path)


def read_stats(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


TELEMETRY = GateTelemetry()
"""The worker process's counters (one model per worker)."""
