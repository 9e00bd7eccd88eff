"""`make demo`: train a TS-LoRA adapter on the bundled model and data, evaluate, export, inspect, report.

    python tools/demo.py [--steps 40]

Trains configs/demo.yaml into runs/demo (a fresh run each time), prints the base model's and the
adapter's ARC-Easy validation accuracy and the measured skip rate, exports the adapter to
runs/demo/adapter, prints `tspeft-rt inspect` of it, writes the keep-rate heatmap
(runs/demo/keep_rates.png) and answers a question with the gated adapter (`tspeft-rt generate`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from tspeft_rt.config import load_config
from tspeft_rt.evaluate import evaluate_tasks
from tspeft_rt.export import export_checkpoint
from tspeft_rt.inject import load_base_model
from tspeft_rt.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "tspeft_rt.cli"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="override the config's steps")
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"steps={args.steps}"] if args.steps else [])
    run = Path(cfg.output_dir)
    shutil.rmtree(run, ignore_errors=True)

    base, tok = load_base_model(cfg.model)
    zero_shot = evaluate_tasks(base, tok, cfg.tasks, cfg.eval_examples, cfg.eval_batch_size)
    del base
    result = train(cfg)
    adapter = export_checkpoint(run, run / "adapter")

    print("\n=== tspeft-rt demo: TS-LoRA on ARC-Easy, SmolLM2-135M-Instruct ===")
    for task in cfg.tasks:
        print(f"{task} validation accuracy (first {cfg.eval_examples}): base {zero_shot[task]['acc']:.3f} -> "
              f"TS-LoRA {result['eval'][task]['acc']:.3f}")
    print(f"token updates skipped: {result['train_skip']:.1%} in training (target {cfg.target_skip:.0%}), "
          f"{result['eval_skip']:.1%} on the validation text")
    print(f"\n$ tspeft-rt inspect {adapter.path}   (first lines)")
    inspect = subprocess.run([*CLI, "inspect", str(adapter.path)], check=True, capture_output=True, text=True)
    lines = inspect.stdout.splitlines()
    print("\n".join(lines[:9] + ["  ..."] + lines[-1:]))
    print(f"\n$ tspeft-rt report {run}   (last lines)")
    report = subprocess.run([*CLI, "report", str(run)], check=True, capture_output=True, text=True)
    print("\n".join(report.stdout.splitlines()[-5:]))
    question = "Question: Which gas do plants take in from the air to make food?\nAnswer:"
    print(f"\n$ tspeft-rt generate --adapter {adapter.path} {question!r}")
    subprocess.run([*CLI, "generate", "--model", cfg.model, "--adapter", str(adapter.path), "--max-new-tokens",
                    "12", question], check=True)


if __name__ == "__main__":
    main()
