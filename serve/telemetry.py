"""Gate telemetry: the fraction of token updates skipped per adapter while serving.

The gated layers count, per adapter slot, the (token, module) updates routed to the slot and those
the gate kept, in one [2, L] int64 tensor on the layers' device (`counters`). The counts only ever
grow and only the forward adds to them, inside the model's graph (the PyTorch path under vLLM's
compilation on CPU, the Triton kernels on CUDA). On CPU the reader takes them as they are (each count
is a monotonic int64 in host memory). On CUDA the worker's main thread copies them to pinned host
memory between forwards (`poll`, once per step, asynchronously); nothing else touches the device.
When a slot changes hands (`bind`), its counts so far are attributed to the adapter that held it. A
daemon thread reads (never writes) the counts, writes per-adapter totals to a JSON file
(`$TSPEFT_RT_GATE_STATS`) and logs a line per adapter every `$TSPEFT_RT_GATE_LOG_INTERVAL` seconds
(default 30) while they change. In the API server
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
        self.counters: torch.Tensor | None = None  # [2, L] int64 (routed, kept) per slot: the layers add
        self.counting = True  # False on tensor-parallel ranks after the first (same decisions, counted once)
        self._pinned: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        self._seen: list[list[int]] = [[], []]  # the last complete host copy of `counters`
        self.slot_adapter: list[int | None] = []
        self._baseline: list[tuple[int, int]] = []  # each slot's counts when its adapter took it
        self.names: dict[int, str] = {}
        self.totals: dict[int, list[int]] = {}  # adapter id -> [routed, kept] of its closed tenures
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def ensure_slots(self, n: int, device: torch.device | str) -> None:
        """Counters for at least n slots on the layers' `device`. A worker's layers all ask for the same
        n, so they are allocated once, before any graph is traced over them."""
        if self.counters is not None and self.counters.shape[1] >= n and self.counters.device == torch.device(device):
            return
        grown = torch.zeros(2, n, dtype=torch.int64, device=device)
        if self.counters is not None:
            kept = min(n, self.counters.shape[1])
            grown[:, :kept] = self.counters[:, :kept].to(device)
        self.counters = grown
        self._seen = [row + [0] * (n - len(row)) for row in self._seen]
        self.slot_adapter += [None] * (n - len(self.slot_adapter))
        self._baseline += [(0, 0)] * (n - len(self._baseline))

    def poll(self) -> None:
        """Between forwards, on the thread that runs them: on CUDA, take the last finished device-to-host
        copy of the counters and start the next one (no synchronisation)."""
        if self.counters is None or self.counters.device.type != "cuda":
            return
        if self._pinned is None:
            self._pinned = torch.empty_like(self.counters, device="cpu").pin_memory()
        elif self._copied is not None and self._copied.query():
            self._seen = self._pinned.tolist()
        self._pinned.copy_(self.counters, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    @staticmethod
    def _counts(seen: list[list[int]], slot: int) -> tuple[int, int]:
        return seen[0][slot], seen[1][slot]

    def bind(self, slot: int, adapter_id: int | None) -> None:
        """Attribute the slot's counts so far to its previous adapter; `adapter_id` holds it from now.
        Runs between forwards (an adapter taking a slot): reads the device counters synchronously."""
        with self._lock:
            if self.counters is not None:
                self._seen = self.counters.tolist()
                self._copied = None  # the copy in flight is older than this: never read it
            now = self._counts(self._seen, slot)
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
            on_host = self.counters is not None and self.counters.device.type == "cpu"
            seen = self.counters.tolist() if on_host else self._seen  # `poll` replaces `_seen` whole
            for slot in range(len(self.slot_adapter)):
                self._add_tenure(totals, slot, self._counts(seen, slot))
        out = {}
        for adapter_id, (routed, kept) in totals.items():
            if adapter_id in self.names and routed > 0:
                out[self.names[adapter_id]] = {"updates": routed, "skipped": routed - kept,
                                               "skip_rate": (routed - kept) / routed}
        return out

    def _start_reporter(self) -> None:
        if self._thread is None and self.counting and os.environ.get(STATS_ENV):
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
