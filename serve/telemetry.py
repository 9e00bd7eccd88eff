"""Gate telemetry: the fraction of token updates skipped per adapter while serving.

The gated layers count, per adapter slot, the (token, module) updates routed to the slot and those
the gate kept. The counts only ever grow and only the forward adds to them: on the host (CPU path) or
in a [2, L] int64 tensor on the device that the Triton kernels add to (CUDA path). Between forwards
the worker's main thread copies the device counters to pinned host memory (`poll`, once per step,
asynchronously); nothing else touches the device. When a slot changes hands (`bind`), its counts so
far are attributed to the adapter that held it. A daemon thread reads (never writes) the counts,
writes per-adapter totals to a JSON file (`$TSPEFT_RT_GATE_STATS`) and logs a line per adapter
every `$TSPEFT_RT_GATE_LOG_INTERVAL` seconds (default 30) while they change. In the API server
process the plugin exports that file on vLLM's `/metrics` endpoint:

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
    """Per-slot counters (incremented by the layers) and per-adapter totals (read by operators)."""

    def __init__(self) -> None:
        self.routed: list[int] = []  # per slot, since start: the CPU path adds
        self.kept: list[int] = []
        self.device_counters: torch.Tensor | None = None  # [2, L] int64 (routed, kept): the kernels add
        self._pinned: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        self._device_seen: list[list[int]] | None = None  # the last complete host copy of device_counters
        self.slot_adapter: list[int | None] = []
        self._baseline: list[tuple[int, int]] = []  # each slot's counts when its adapter took it
        self.names: dict[int, str] = {}
        self.totals: dict[int, list[int]] = {}  # adapter id -> [routed, kept] of its closed tenures
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def ensure_slots(self, n: int, device: torch.device | str | None = None) -> None:
        """Room for n slots; `device`: the layers count on that device (Triton path)."""
        while len(self.routed) < n:
            self.routed.append(0)
            self.kept.append(0)
            self.slot_adapter.append(None)
            self._baseline.append((0, 0))
        if device is not None and self.device_counters is None:
            self.device_counters = torch.zeros(2, len(self.routed), dtype=torch.int64, device=device)
            self._device_seen = [[0] * len(self.routed), [0] * len(self.routed)]

    def record(self, slot: int, routed: int, kept: int) -> None:
        self.routed[slot] += routed
        self.kept[slot] += kept

    def poll(self) -> None:
        """Between forwards, on the thread that runs them: take the last finished device-to-host copy
        of the device counters and start the next one (no synchronisation)."""
        if self.device_counters is None or self.device_counters.device.type != "cuda":
            return
        if self._pinned is None:
            self._pinned = torch.empty_like(self.device_counters, device="cpu").pin_memory()
        elif self._copied is not None and self._copied.query():
            self._device_seen = self._pinned.tolist()
        self._pinned.copy_(self.device_counters, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def _counts(self, slot: int, seen: list[list[int]] | None) -> tuple[int, int]:
        routed, kept = self.routed[slot], self.kept[slot]
        if seen is not None:
            routed, kept = routed + seen[0][slot], kept + seen[1][slot]
        return routed, kept

    def bind(self, slot: int, adapter_id: int | None) -> None:
        """Attribute the slot's counts so far to its previous adapter; `adapter_id` holds it from now.
        Runs between forwards (an adapter taking a slot): reads the device counters synchronously."""
        with self._lock:
            if self.device_counters is not None:
                self._device_seen = self.device_counters.tolist()
                self._copied = None  # the copy in flight is older than this: never read it
            now = self._counts(slot, self._device_seen)
            self._add_tenure(self.totals, slot, now)
            self.slot_adapter[slot], self._baseline[slot] = adapter_id, now
        self._start_reporter()

    def _add_tenure(self, totals: dict[int, list[int]], slot: int, now: tuple[int, int]) -> None:
        """Add the counts of the slot's current adapter since it took the slot (up to `now`) to `totals`."""
        owner, (routed0, kept0) = self.slot_adapter[slot], self._baseline[slot]
        if owner is not None and now[0] > routed0:
            total = totals.setdefault(owner, [0, 0])
            total[0] += now[0] - routed0
            total[1] += now[1] - kept0

    def snapshot(self) -> dict[str, dict[str, float]]:
        """{adapter name: {updates, skipped, skip_rate}} over every token served so far (reads only)."""
        with self._lock:
            totals = {adapter: list(t) for adapter, t in self.totals.items()}
            seen = self._device_seen  # one complete copy (`poll` replaces it whole)
            for slot in range(len(self.slot_adapter)):
                self._add_tenure(totals, slot, self._counts(slot, seen))
        out = {}
        for adapter_id, (routed, kept) in totals.items():
            if adapter_id in self.names and routed > 0:
                out[self.names[adapter_id]] = {"updates": routed, "skipped": routed - kept,
                                               "skip_rate": (routed - kept) / routed}
        return out

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
    except (OSError, ValueError, RecursionError):
        return {}


TELEMETRY = GateTelemetry()
"""The worker process's counters (one model per worker)."""
