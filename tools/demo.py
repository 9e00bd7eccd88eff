"""`make demo`: train a TS-LoRA adapter on the bundled model and data, evaluate it, print the result.

    python tools/demo.py [--steps 40]

Trains configs/demo.yaml into runs/demo (a fresh run each time), then prints the base model's and
the adapter's ARC-Easy validation accuracy, the measured skip rate, and the modules that kept the
most and the fewest token updates.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tspeft_rt.config import load_config
from tspeft_rt.evaluate import evaluate_tasks
from tspeft_rt.inject import load_base_model
from tspeft_rt.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="override the config's steps")
    args = ap.parse_args()
    overrides = [f"steps={args.steps}"] if args.steps else []
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)

    base, tok = load_base_model(cfg.model)
    zero_shot = evaluate_tasks(base, tok, cfg.tasks, cfg.eval_examples, cfg.eval_batch_size)
    del base
    result = train(cfg)

    stats = [json.loads(line) for line in (Path(cfg.output_dir) / "gate_stats.jsonl").read_text().splitlines()]
    modules = sorted(stats[-1]["modules"].items(), key=lambda kv: kv[1]["keep"])
    print("\n=== tspeft-rt demo: TS-LoRA on ARC-Easy, SmolLM2-135M-Instruct ===")
    for task in cfg.tasks:
        print(f"{task} validation accuracy (first {cfg.eval_examples}): base {zero_shot[task]['acc']:.3f} -> "
              f"TS-LoRA {result['eval'][task]['acc']:.3f}")
    print(f"token updates skipped: {result['train_skip']:.1%} in training (target {cfg.target_skip:.0%}), "
          f"{result['eval_skip']:.1%} on the validation text")
    print("modules keeping the fewest / most token updates:")
    for name, s in modules[:3] + modules[-3:]:
        print(f"  {name:<40} keep {s['keep']:.2f}  tau {s['tau']:.4f}")
    print(f"run folder: {cfg.output_dir} (metrics.jsonl, gate_stats.jsonl, checkpoints/)")


if __name__ == "__main__":
    main()
