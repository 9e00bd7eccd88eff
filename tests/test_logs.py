"""Run logs that survive kill -9: a kill while a line of metrics.jsonl or gate_stats.jsonl is being
appended leaves that line torn; every reader leaves it out, `--resume` rewrites the log without it
(atomically), and neither `--resume` nor `report` dies on it. Real `tspeft-rt` processes are killed with
SIGKILL at seeded random moments; the last good checkpoint always loads and the resumed run ends where
an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_cli import clean_env
from test_train import BIN, assert_same_adapter, cli_args, final_adapter, tiny_config

from tspeft_rt.checkpoint import latest_checkpoint, load_checkpoint, read_log, rewrite_log
from tspeft_rt.config import build_config
from tspeft_rt.errors import CheckpointError
from tspeft_rt.trainer import train

LOGS = ("metrics.jsonl", "gate_stats.jsonl")
RECORDS = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25, "eval": {"arc_easy": {"acc": 0.5}}}]
GOOD = "".join(json.dumps(r) + "\n" for r in RECORDS).encode()


# ---- reading and rewriting one log ---------------------------------------------------------------------

TORN = {
    "half-a-record": json.dumps({"step": 3, "loss": 2.0}).encode()[:9],
    "one-brace": b"{",
    "cut-inside-a-utf8-character": b'{"step": 3, "note": "\xe2\x82',
    "zero-filled": b"\0" * 16,  # what a crash of the whole machine can leave
}


@pytest.mark.parametrize("tail", list(TORN.values()), ids=list(TORN))
def test_read_log_leaves_out_a_torn_last_line(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD + tail)
    assert read_log(path) == (RECORDS, True)


def test_read_log_keeps_a_last_record_that_lacks_only_its_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD + b'{"step": 3}')
    assert read_log(path) == (RECORDS + [{"step": 3}], False)


@pytest.mark.parametrize("text", [b"", b"\n", GOOD + b"\n\n"], ids=["empty", "newline", "blank-lines"])
def test_read_log_of_empty_or_blank_lines(tmp_path, text):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(text)
    assert read_log(path) == (RECORDS if text.startswith(GOOD) else [], False)


@pytest.mark.parametrize("bad, expect", [(b'{"step": 3, "lo\n', "not valid JSON"),
                                         (b"[3]\n", "integer 'step'"),
                                         (b'{"step": "3"}\n', "integer 'step'"),
                                         (b"\xff\n", "UTF-8")],
                         ids=["torn-then-appended-to", "not-an-object", "step-a-string", "not-utf8"])
def test_read_log_refuses_damage_before_the_last_line(tmp_path, bad, expect):
    """Only the last line can be torn by a kill; a bad line before it is damage, reported, not skipped."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD + bad + b'{"step": 4}\n')
    with pytest.raises(CheckpointError) as err:
        read_log(path)
    assert f"{path}:3" in str(err.value) and expect in str(err.value)


def test_rewrite_log_killed_before_the_rename_keeps_the_old_log(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD)

    def killed(*_):
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this point runs

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        rewrite_log(path, RECORDS[:1])
    assert path.read_bytes() == GOOD


# ---- `report` and `--resume` on a torn log -------------------------------------------------------------

def run_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([BIN / "tspeft-rt", *map(str, args)], env=clean_env(), capture_output=True, text=True,
                       timeout=600)
    assert not check or r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r


def assert_whole_log(path: Path, steps: int) -> None:
    """Every line complete and parsed, and each step logged exactly once."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path} ends in a torn line"
    assert [json.loads(line)["step"] for line in data.splitlines()] == list(range(1, steps + 1))


def test_half_a_line_appended_then_report_and_resume(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=4, save_every=2)
    train(build_config(cfg, "test"))
    run = tmp_path / "run"
    keep = read_log(run / "gate_stats.jsonl").records[-1]["modules"]
    for name in LOGS:
        line = json.dumps({"step": 5, "modules": {m: {"keep": 0.0} for m in keep}, "loss": 1.0})
        with open(run / name, "a") as f:
            f.write(line[: len(line) // 2])

    report = run_cli("report", run)
    module, rate = next(iter(keep.items()))
    assert any(line.startswith(module) and f"{rate['keep']:.3f}" in line for line in report.stdout.splitlines())

    resumed = run_cli("train", *cli_args(dict(cfg, steps=6)), "--resume")
    assert "left out its last line" in resumed.stdout
    for name in LOGS:
        assert_whole_log(run / name, 6)
    run_cli("report", run)


def test_sigkill_at_random_moments_then_resume_and_report(tiny_model_dir, tmp_path):
    steps = 18
    cfg = tiny_config(tiny_model_dir, tmp_path / "killed", steps=steps, save_every=3, micro_batch_size=1)
    run = tmp_path / "killed"
    rng = random.Random(12)
    kills = 0
    for _ in range(4):
        done = _last_step(run)
        if done >= steps - 3:
            break
        proc = subprocess.Popen([BIN / "tspeft-rt", "train", *cli_args(cfg), "--resume"], env=clean_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if rng.random() < 0.25:  # during start-up: imports, model load, the log rewrite
            _wait(proc, lambda: False, rng.uniform(0.0, 8.0))
        else:  # after a seeded number of new records
            target = rng.randint(done + 1, steps - 3)  # early enough that the run cannot finish first
            _wait(proc, lambda: _last_step(run) >= target, 600)
            time.sleep(rng.uniform(0.0, 0.05))
        os.killpg(proc.pid, signal.SIGKILL)
        if proc.wait() != -signal.SIGKILL:
            break  # it finished first
        kills += 1
        ckpt = latest_checkpoint(run) if (run / "checkpoints").exists() else None
        if ckpt is not None:
            load_checkpoint(ckpt)  # the last good checkpoint is intact
            _tear_last_line(run, int(ckpt.name.split("-")[1]), rng)
            run_cli("report", run)
    assert kills >= 2, "the run finished before it could be killed"

    run_cli("train", *cli_args(cfg), "--resume")
    run_cli("report", run)
    for name in LOGS:
        assert_whole_log(run / name, steps)
    whole = dict(cfg, output_dir=str(tmp_path / "whole"))
    train(build_config(whole, "test"))
    assert_same_adapter(final_adapter(run), final_adapter(tmp_path / "whole"), 1e-6)


def _last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    records = read_log(path).records if path.exists() else []
    return records[-1]["step"] if records else 0


def _wait(proc: subprocess.Popen, until, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not until() and time.monotonic() < deadline:
        time.sleep(0.01)


def _tear_last_line(run: Path, checkpoint_step: int, rng: random.Random) -> None:
    """Cut each log inside its last line, as a kill in the middle of that append would: killing at that
    instant is rare, so the test makes it happen. Only a record past the checkpoint can be torn (the
    record of a checkpoint's step is complete before the checkpoint is written)."""
    for name in LOGS:
        path = run / name
        log = read_log(path)
        if log.torn or not log.records or log.records[-1]["step"] <= checkpoint_step:
            continue
        data = path.read_bytes()
        start = data.rstrip(b"\n").rfind(b"\n") + 1
        path.write_bytes(data[: start + rng.randrange(1, len(data) - start - 1)])
