"""The training loop on a tiny model: exact resume after SIGKILL, torchrun (gloo) equals one process,
atomic checkpoints, NaN stop, incompatible resume, and the bad-input exits of `tspeft-rt train`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tspeft_rt.checkpoint import latest_checkpoint
from tspeft_rt.config import build_config
from tspeft_rt.errors import CheckpointError, ConfigError, TrainingDiverged
from tspeft_rt.trainer import seed_step, train

BIN = Path(sys.executable).parent


def tiny_config(model_dir: Path, out: Path, **over) -> dict:
    cfg = dict(model=str(model_dir), output_dir=str(out), tasks=["arc_easy"], max_train_examples=64,
               steps=6, batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=1, tau_warmup_steps=2,
               target_skip=0.5, log_every=1, save_every=2, eval_examples=0, progress=False, max_seq_len=64)
    cfg.update(over)
    return cfg


def cli_args(cfg: dict) -> list[str]:
    return [f"--set={k}={json.dumps(v)}" for k, v in cfg.items()]


def final_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(out) / "adapter.safetensors")


def assert_same_adapter(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k] - b[k]).abs().max().item()
        assert err <= tol * max(1.0, b[k].abs().max().item()), f"{k}: max abs diff {err}"


@pytest.mark.parametrize("method", ["ts-lora", "ts-dora"])
def test_runs_and_gates(tiny_model_dir, tmp_path, method):
    result = train(build_config(tiny_config(tiny_model_dir, tmp_path / "run", method=method), "test"))
    assert 0.0 < result["train_skip"] < 1.0
    ckpt = latest_checkpoint(tmp_path / "run")
    adapter = load_file(ckpt / "adapter.safetensors")
    taus = [v for k, v in adapter.items() if k.endswith("token_gate.tau")]
    assert taus and all(float(t) > 0 for t in taus)
    assert any(k.endswith("lora_magnitude_vector") for k in adapter) == (method == "ts-dora")
    stats = [json.loads(l) for l in (tmp_path / "run" / "gate_stats.jsonl").read_text().splitlines()]
    module = next(iter(stats[-1]["modules"].values()))
    assert {"tau", "keep", "r_q10", "r_q50", "r_q90"} <= module.keys()
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(m["loss"]) and m["tokens_per_s"] > 0 for m in metrics)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def kill_after_checkpoint(cmd: list, out: Path, step: int, env: dict | None = None) -> None:
    """Start `cmd` in its own process group and SIGKILL the group once `out` holds the checkpoint of
    `step`, before the run ends."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    pointer = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (pointer.is_file() and pointer.read_text() >= f"step-{step:06d}") and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"


def test_resume_after_sigkill_is_exact(tiny_model_dir, tmp_path):
    """With dropout on: a resumed run draws the dropout masks the uninterrupted one drew."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "whole", steps=40, save_every=4, micro_batch_size=1, dropout=0.1)
    train(build_config(cfg, "test"))

    killed = dict(cfg, output_dir=str(tmp_path / "killed"))
    kill_after_checkpoint([BIN / "tspeft-rt", "train", *cli_args(killed)], tmp_path / "killed", 8)
    assert int(latest_checkpoint(tmp_path / "killed").name.split("-")[1]) < 40

    subprocess.run([BIN / "tspeft-rt", "train", *cli_args(killed), "--resume"], check=True,
                   stdout=subprocess.DEVNULL)
    assert_same_adapter(final_adapter(tmp_path / "killed"), final_adapter(tmp_path / "whole"), 1e-6)


def torchrun(cfg: dict, *extra: str) -> list:
    return [BIN / "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "tspeft_rt.cli", "train",
            *cli_args(cfg), *extra]


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_torchrun_two_processes_equal_one(tiny_model_dir, tmp_path, distributed):
    """DDP, and FSDP2 with the base sharded, at 2 processes = 1 process with accumulation after 10 steps
    (evaluations included: under FSDP every process takes part in their forwards)."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "one", steps=10, batch_size=4, micro_batch_size=2,
                      eval_examples=4, eval_every=5)
    one = train(build_config(cfg, "test"))
    two = dict(cfg, output_dir=str(tmp_path / "two"), distributed=distributed)
    subprocess.run(torchrun(two), check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                   timeout=600)
    assert_same_adapter(final_adapter(tmp_path / "two"), final_adapter(tmp_path / "one"), 1e-5)
    assert json.loads((tmp_path / "two" / "results.json").read_text())["eval"] == one["eval"]


def test_fsdp_resume_after_sigkill_is_exact(tiny_model_dir, tmp_path):
    """torchrun with FSDP2 and dropout, its process group killed after a checkpoint, resumed = uninterrupted."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cfg = tiny_config(tiny_model_dir, tmp_path / "whole", steps=16, save_every=2, distributed="fsdp", dropout=0.1)
    subprocess.run(torchrun(cfg), check=True, env=env, stdout=subprocess.DEVNULL, timeout=600)
    killed = dict(cfg, output_dir=str(tmp_path / "killed"))
    kill_after_checkpoint(torchrun(killed), tmp_path / "killed", 4, env)
    subprocess.run(torchrun(killed, "--resume"), check=True, env=env, stdout=subprocess.DEVNULL, timeout=600)
    assert_same_adapter(final_adapter(tmp_path / "killed"), final_adapter(tmp_path / "whole"), 1e-6)


def test_dropout_streams_per_step_and_process():
    """Each (step, process) draws its own dropout masks, the same ones whenever it runs again."""
    def mask(step: int, rank: int) -> torch.Tensor:
        seed_step(0, step, rank)
        return torch.nn.functional.dropout(torch.ones(256), 0.5)

    assert torch.equal(mask(3, 1), mask(3, 1))
    assert not torch.equal(mask(3, 0), mask(3, 1))
    assert not torch.equal(mask(3, 0), mask(4, 0))


def test_leftover_partial_checkpoint_is_ignored(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", steps=4)
    train(build_config(cfg, "test"))
    ckpts = tmp_path / "run" / "checkpoints"
    partial = ckpts / ".step-000006.abcd"  # what a kill during a checkpoint write leaves
    partial.mkdir()
    (partial / "adapter.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(tmp_path / "run").name == "step-000004"
    train(build_config(dict(cfg, steps=6), "test"), resume=True)
    assert latest_checkpoint(tmp_path / "run").name == "step-000006"
    assert not partial.exists()


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_model_dir, tmp_path):
    cfg = build_config(tiny_config(tiny_model_dir, tmp_path / "run", steps=4), "test")
    train(cfg)
    before = final_adapter(tmp_path / "run")
    from tspeft_rt.trainer import Trainer

    trainer = Trainer(build_config(dict(cfg.to_dict(), steps=8), "test"), resume=True)
    trainer.model.get_input_embeddings().weight.data.fill_(math.nan)
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        trainer.fit()
    assert latest_checkpoint(tmp_path / "run").name == "step-000004"
    assert_same_adapter(final_adapter(tmp_path / "run"), before, 0.0)


def test_resume_with_incompatible_config_is_refused(tiny_model_dir, tmp_path):
    train(build_config(tiny_config(tiny_model_dir, tmp_path / "run", steps=2), "test"))
    with pytest.raises(CheckpointError, match="rank: checkpoint 8 vs config 4"):
        train(build_config(tiny_config(tiny_model_dir, tmp_path / "run", steps=4, rank=4), "test"), resume=True)


def test_existing_run_needs_resume(tiny_model_dir, tmp_path):
    cfg = build_config(tiny_config(tiny_model_dir, tmp_path / "run", steps=2), "test")
    train(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dense_baselines_have_no_gate(tiny_model_dir, tmp_path, method):
    result = train(build_config(tiny_config(tiny_model_dir, tmp_path / "run", method=method, steps=2), "test"))
    assert "train_skip" not in result
    assert not any("token_gate" in k for k in final_adapter(tmp_path / "run"))


def test_bf16_and_chat_data(tiny_model_dir, tmp_path):
    """bf16 base weights with fp32 adapters, on a user's chat-format JSON-lines file."""
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}"}]} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", dtype="bf16", data_files=[str(data)], steps=4)
    result = train(build_config(cfg, "test"))
    adapter = final_adapter(tmp_path / "run")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in adapter.values())
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in adapter.items())
    assert 0.0 <= result["train_skip"] < 1.0
