"""The launcher always cleans up: `Server.stop` is idempotent, a second signal cannot cut its escalation
short, and `tspeft-rt serve` stops vLLM's whole process group on SIGINT, SIGTERM and SIGHUP.

The fast tests stand a small process group in for vLLM (the launcher only sees a group it must stop);
the slow ones send real signals to a real `tspeft-rt serve` serving a tiny model.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from tspeft_rt.serve import launcher
from tspeft_rt.serve.launcher import Server, ServeError

psutil = pytest.importorskip("psutil")  # a dependency of vLLM, which the slow tests need anyway

HEALTHY_GROUP = """
import http.server, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited: neither this leader nor its child stops on SIGTERM
subprocess.Popen(["sleep", "600"])

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""
"""A stand-in server: healthy at once, and only SIGKILL stops it or its child."""


class StandIn(Server):
    """The launcher with `script` in place of vLLM's command line."""

    def __init__(self, script: str, **kwargs) -> None:
        super().__init__(port=free_port(), **kwargs)
        self.script = script

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.port)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running_members(pgid: int) -> list[psutil.Process]:
    """The group's processes that still run (zombies are dead, only waiting for their parent)."""
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.NoSuchProcess:
        return []


def kill_group(pgid: int) -> None:
    """Clean-up after a failed test: SIGKILL whatever still runs in the group."""
    if running_members(pgid):
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture
def killpg_calls(monkeypatch) -> list[tuple[int, int]]:
    """Records `os.killpg` calls (which still go through to the OS)."""
    calls: list[tuple[int, int]] = []
    real = os.killpg

    def spy(pgid: int, sig: int) -> None:
        calls.append((pgid, sig))
        real(pgid, sig)

    monkeypatch.setattr(os, "killpg", spy)
    return calls


def test_failed_start_stops_the_group_once(killpg_calls):
    """vLLM exiting during start-up leaves a child behind: `start` stops the group, and the caller's
    `stop` afterwards (as `tspeft-rt serve` does) signals nothing, as the group's id is no longer ours."""
    server = StandIn("import subprocess, sys; subprocess.Popen(['sleep', '600']); sys.exit(3)")
    with pytest.raises(ServeError, match="exited with code 3 during start-up"):
        server.start()
    pgid = server.process.pid
    try:
        assert running_members(pgid) == []
        assert (pgid, signal.SIGTERM) in killpg_calls
        killpg_calls.clear()
        server.stop()
        server.stop()
        assert killpg_calls == []
    finally:
        kill_group(pgid)


def test_second_signal_during_stop_goes_straight_to_sigkill(killpg_calls):
    """A signal while `stop` waits out its grace periods hurries it to SIGKILL instead of aborting it;
    the handler it was meant for (a KeyboardInterrupt here) runs once the group is gone."""
    server = StandIn(HEALTHY_GROUP).start()
    pgid = server.process.pid
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever earlier tests left
    handler = signal.getsignal(signal.SIGINT)
    try:
        def interrupt_twice_once_stopping() -> None:
            while signal.getsignal(signal.SIGINT) is handler:  # stop has not begun
                time.sleep(0.05)
            # Back to back: a signal after stop has returned would hit pytest outside `raises`.
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=interrupt_twice_once_stopping, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            server.stop(grace=60)
        assert time.monotonic() - t0 < 15, "the signals did not hurry stop past its 60 s grace periods"
        assert signal.getsignal(signal.SIGINT) is handler
        assert server.process.returncode == -signal.SIGKILL
        assert (pgid, signal.SIGKILL) in killpg_calls
        assert running_members(pgid) == []
        killpg_calls.clear()
        server.stop()
        assert killpg_calls == []
    finally:
        kill_group(pgid)
        signal.signal(signal.SIGINT, inherited)


def test_zombies_do_not_keep_a_group_alive():
    """A zombie answers killpg, but it is dead: an orphan's zombie under an init that does not reap
    (as in some containers) must not make `stop` wait out its grace periods."""
    leader = subprocess.Popen(["true"], start_new_session=True)
    try:
        while psutil.Process(leader.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        os.killpg(leader.pid, 0)  # the group still "exists"
        assert not launcher._group_alive(leader.pid)
    finally:
        leader.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act as another user")
def test_a_group_of_another_user_is_not_ours():
    """killpg's PermissionError means the group's processes are all another user's: ours (which run as
    us) are gone and the id was reused. Checked with real credentials: root's group, seen as nobody."""
    group = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: drop to nobody, probe root's group, report
            try:
                os.setgid(65534)
                os.setuid(65534)
                alive = launcher._group_alive(group.pid)
                launcher._signal_group(group.pid, signal.SIGKILL)  # must neither raise nor kill
                os.write(write, repr(alive).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read) as f:
            assert f.read() == "False"
        assert group.poll() is None
    finally:
        group.kill()
        group.wait()


def test_permission_error_reads_as_not_ours(monkeypatch):
    """The same branch where the tests cannot switch users: the OS call raising as it would."""
    def denied(pgid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "killpg", denied)
    assert not launcher._group_alive(12345)
    launcher._signal_group(12345, signal.SIGKILL)


# --- `tspeft-rt serve` itself, on a real vLLM -----------------------------------------------------------


@pytest.fixture(scope="module")
def servable_tiny_model(tmp_path_factory, bundled_dir) -> Path:
    """The tiny test Llama with head_dim 32 (vLLM's CPU attention takes 32 or 64; conftest's has 16)."""
    pytest.importorskip("vllm")
    from conftest import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny32") / "tiny-llama", bundled_dir,
                           num_attention_heads=2, num_key_value_heads=1)


class ServeRun:
    """`tspeft-rt serve` in its own session (as from a terminal), its output collected as it comes."""

    def __init__(self, model: Path, tmp: Path) -> None:
        cmd = [sys.executable, "-m", "tspeft_rt.cli", "serve", "--model", str(model), "--port", str(free_port()),
               "--log-file", str(tmp / "vllm.log"), "--", "--max-model-len", "256", "--max-num-seqs", "4",
               "--kv-cache-memory-bytes", str(64 << 20)]
        self.stderr = tmp / "serve.err"
        with open(self.stderr, "wb") as err:
            self.cli = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        self.stdout: list[str] = []
        threading.Thread(target=lambda: self.stdout.extend(self.cli.stdout), daemon=True).start()
        self.vllm_pgid: int | None = None

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """Poll `ready`, failing if serve exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.cli.poll() is None, f"serve exited while waiting for {what}: {self.stderr.read_text()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s"
            time.sleep(0.1)

    def vllm_started(self) -> bool:
        """Whether vLLM's API server runs (it leads its own group: start_new_session)."""
        servers = [p for p in psutil.Process(self.cli.pid).children() if "vllm.entrypoints" in " ".join(cmdline(p))]
        self.vllm_pgid = servers[0].pid if servers else None
        return self.vllm_pgid is not None

    def engine_core_started(self) -> bool:
        """Whether vLLM has spawned its engine core (a second process in the group)."""
        return any("EngineCore" in " ".join(cmdline(p)) for p in running_members(self.vllm_pgid))

    def serving(self) -> bool:
        """Whether serve has reported the server healthy."""
        return any(line.startswith("serving at") for line in self.stdout)

    def close(self) -> None:
        """Leave nothing running, whatever the test's outcome."""
        for pgid in (self.cli.pid, self.vllm_pgid):
            if pgid is not None:
                kill_group(pgid)
        self.cli.wait()


PHASES = {
    "vllm-importing": (ServeRun.vllm_started,),
    "engine-core-starting": (ServeRun.vllm_started, ServeRun.engine_core_started),
    "serving": (ServeRun.vllm_started, ServeRun.serving),
}
"""What to wait for before signalling, in order."""


CASES = [(signal.SIGINT, "vllm-importing"), (signal.SIGTERM, "vllm-importing"), (signal.SIGHUP, "vllm-importing"),
         (signal.SIGTERM, "engine-core-starting"), (signal.SIGHUP, "serving")]
"""Every signal where it is cheap (seconds in); the later phases cost most of a vLLM start-up each (one
to two minutes on 2 busy cores), so one signal each: the three share one handler. SIGHUP while serving
is the closed terminal."""


@pytest.mark.slow
@pytest.mark.parametrize("sig, phase", CASES, ids=[f"{sig.name}-{phase}" for sig, phase in CASES])
def test_serve_stops_the_whole_group_on_a_double_signal(servable_tiny_model, tmp_path, sig, phase):
    """The signal sent twice, the second while the first's clean-up runs: afterwards nothing of vLLM's
    group runs and `tspeft-rt serve` has exited cleanly."""
    run = ServeRun(servable_tiny_model, tmp_path)
    try:
        for step in PHASES[phase]:
            run.wait_until(partial(step, run), step.__name__)
        assert run.serving() == (phase == "serving"), f"the server was not in phase {phase!r}"
        started_members = len(running_members(run.vllm_pgid))
        os.kill(run.cli.pid, sig)
        time.sleep(0.3)
        assert run.cli.poll() is None, "serve had already stopped: the second signal would test nothing"
        os.kill(run.cli.pid, sig)
        assert run.cli.wait(timeout=60) == 0, run.stderr.read_text()
        assert running_members(run.vllm_pgid) == [], f"left running (of {started_members})"
        assert "Traceback" not in run.stderr.read_text()
    finally:
        run.close()
