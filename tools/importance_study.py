"""The module-importance study: does token keep rate pick better modules than weight norm?

    python tools/importance_study.py                       # ARC-Easy, a quarter of the modules, ~40 min on 2 cores
    python tools/importance_study.py --steps 60 --eval-examples 200 --out runs/importance_small

1. Train TS-LoRA on every linear module of the bundled model (target skip 0.5), or reuse --ts-run.
2. Under a fixed budget of modules (--budget, default a quarter), choose modules by token keep rate,
   by weight norm ||s B A||_F, and at random (the same ranking code as `tspeft-rt export --max-modules`).
3. Retrain dense LoRA on each choice with the same steps, batch, learning rate and seed, and report
   validation accuracy. Every run has its own folder under --out and is skipped when its
   results.json exists, so the study can be run in parts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tspeft_rt.config import load_config
from tspeft_rt.export import choose_pruned
from tspeft_rt.report import module_scores
from tspeft_rt.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def run(overrides: list[str], out: Path) -> dict:
    """Train configs/ts_lora_arc_easy.yaml with overrides into `out`, unless it already finished."""
    done = out / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    resume = (out / "checkpoints" / "latest").is_file()
    cfg = load_config(ROOT / "configs" / "ts_lora_arc_easy.yaml", overrides + [f"output_dir={out}", "progress=false"])
    return train(cfg, resume=resume)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/importance"))
    ap.add_argument("--ts-run", type=Path, default=None, help="reuse a finished TS-LoRA all-linear run")
    ap.add_argument("--budget", type=float, default=0.25, help="modules kept: a count, or a fraction")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-examples", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    common = [f"steps={args.steps}", f"eval_examples={args.eval_examples}", f"seed={args.seed}"]

    ts_dir = args.ts_run or args.out / "ts_lora_all"
    ts = run(common + ["method=ts-lora"], ts_dir) if args.ts_run is None else json.loads(
        (ts_dir / "results.json").read_text())
    scores = module_scores(ts_dir)
    rows = [("TS-LoRA, all modules", len(scores), ts)]
    for rank_by in ("keep", "norm", "random"):
        pruned = choose_pruned(scores, None, args.budget, rank_by, args.seed)
        chosen = sorted(set(scores) - set(pruned))
        result = run(common + ["method=lora", f"target_modules={json.dumps(chosen)}"], args.out / f"lora_by_{rank_by}")
        rows.append((f"LoRA on modules by {rank_by}", len(chosen), result))

    task = load_config(ROOT / "configs" / "ts_lora_arc_easy.yaml").tasks[0]
    lines = [f"| run | modules | {task} acc | acc_norm |", "|---|---|---|---|"]
    for name, n, r in rows:
        lines.append(f"| {name} | {n} | {r['eval'][task]['acc']:.3f} | {r['eval'][task]['acc_norm']:.3f} |")
    table = "\n".join(lines)
    (args.out / "importance.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
