"""Integration on the bundled SmolLM2-135M-Instruct (real pretrained weights) and the bundled data."""

from __future__ import annotations

import json

import pytest
import torch

from tspeft_rt.config import build_config
from tspeft_rt.evaluate import evaluate_tasks
from tspeft_rt.inject import load_base_model
from tspeft_rt.trainer import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundled(bundled_dir):
    return load_base_model(str(bundled_dir))


def test_bundled_model_is_the_pretrained_one(bundled):
    model, tok = bundled
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Paris")


def test_zero_shot_accuracy_is_above_chance(bundled):
    model, tok = bundled
    result = evaluate_tasks(model, tok, ["arc_easy"], limit=60)
    assert result["arc_easy"]["acc"] > 0.4  # chance is 0.25; SmolLM2-135M scores about 0.55


def test_target_skip_is_held_on_the_bundled_model(bundled_dir, tmp_path):
    """The controller brings the measured skip rate to the target within a few steps of gating."""
    cfg = build_config(dict(model=str(bundled_dir), output_dir=str(tmp_path / "run"), tasks=["arc_easy"],
                            steps=28, batch_size=4, micro_batch_size=4, lr=5e-4, warmup_steps=2,
                            tau_warmup_steps=4, target_skip=0.5, log_every=7, save_every=0,
                            eval_examples=0, progress=False, max_seq_len=96), "test")
    result = train(cfg)
    windows = [json.loads(l)["skip_window"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(windows[-1] - 0.5) <= 0.05, windows  # steps 22-28, i.e. 18 to 24 steps after gating began
    assert result["train_skip"] == pytest.approx(windows[-1])
