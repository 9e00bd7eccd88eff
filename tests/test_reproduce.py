"""tools/reproduce.py on the tiny model: every output, caching, resuming and the settings guard."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def study(out: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "reproduce.py"), "--out", str(out), "--model", str(model),
           "--configs", "base,lora,ts-lora-0.5", "--per-task", "3", "--steps", "4", "--batch-size", "2",
           "--eval-limit", "2", "--save-every", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_study_outputs_cache_and_resume(tmp_path, tiny_model_dir):
    out = tmp_path / "study"
    r = study(out, tiny_model_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (out / "train.jsonl").read_text().splitlines()
    assert len(lines) == 8 * 3 and all({"prompt", "completion"} <= json.loads(l).keys() for l in lines)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["config"] for r in rows] == ["base", "lora", "ts-lora-0.5"]
    assert float(rows[2]["eval_skip"]) > 0 and float(rows[1]["eval_skip"]) == 0
    assert all(float(r["peak_rss_mb"]) > 100 for r in rows[1:])
    assert all(0 <= float(r["average_norm"]) <= 1 for r in rows)
    table = (out / "results.md").read_text()
    assert "| ts-lora-0.5 | 1 |" in table and "hellaswag" in table and "Δ avg vs dense" in table
    delta = 100 * (float(rows[2]["average"]) - float(rows[1]["average"]))  # paired with LoRA's seed 0
    ts_row = next(line for line in table.splitlines() if line.startswith("| ts-lora-0.5 "))
    assert f"| {delta:+.1f} |" in ts_row
    assert (out / "accuracy_vs_skip.png").read_bytes()[:4] == b"\x89PNG"

    # cached: nothing retrains
    done = (out / "lora-s0" / "results.json").stat().st_mtime_ns
    assert study(out, tiny_model_dir).returncode == 0
    assert (out / "lora-s0" / "results.json").stat().st_mtime_ns == done

    # an interrupted run resumes from its checkpoint and ends with the same weights
    run = out / "ts-lora-0.5-s0"
    final = (run / "checkpoints" / "latest").read_text().strip()
    reference = load_file(run / "checkpoints" / final / "adapter.safetensors")
    (run / "results.json").unlink()
    shutil.rmtree(run / "checkpoints" / final)
    (run / "checkpoints" / "latest").write_text("step-000002")
    r = study(out, tiny_model_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stdout
    resumed = load_file(run / "checkpoints" / final / "adapter.safetensors")
    assert resumed.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=0, atol=1e-6)


def test_other_settings_are_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"steps": 999}))
    r = study(out, tiny_model_dir, "--report-only")
    assert r.returncode != 0 and "other settings" in r.stderr
