"""The reproduction study: TS-LoRA / TS-DoRA against LoRA / DoRA on the eight commonsense tasks.

    python tools/reproduce.py --out runs/reproduce                      # everything, cached and resumable
    python tools/reproduce.py --out runs/reproduce --configs base,lora,ts-lora-0.5   # a part of it
    python tools/reproduce.py --out runs/reproduce --report-only        # table and plot from what is done

The paper's protocol (DoRA's commonsense suite) scaled to the bundled SmolLM2-135M-Instruct: one mixed
training set with the same number of examples from each task's train split (written once to
OUT/train.jsonl), and the same steps, batch, rank, learning rate and seed for every configuration:

    lora, ts-lora-0.3, ts-lora-0.5, ts-lora-0.7, dora, ts-dora-0.5       (+ base: zero-shot)

Each configuration trains in its own process (`tspeft-rt train`, checkpoints every --save-every
steps) into OUT/<config>-s<seed>; a finished one (results.json) is skipped, an interrupted one
resumes from its last checkpoint. Validation accuracy (acc, first --eval-limit examples per task)
comes from the trainer's final evaluation, with the skip rate measured on the validation text;
training time and peak memory (max RSS of the training process) are recorded. Writes OUT/results.csv,
OUT/results.md (the README table: mean and spread over seeds) and OUT/accuracy_vs_skip.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASKS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
CONFIGS = {
    "base": None,
    "lora": {"method": "lora"},
    "ts-lora-0.3": {"method": "ts-lora", "target_skip": 0.3},
    "ts-lora-0.5": {"method": "ts-lora", "target_skip": 0.5},
    "ts-lora-0.7": {"method": "ts-lora", "target_skip": 0.7},
    "dora": {"method": "dora"},
    "ts-dora-0.5": {"method": "ts-dora", "target_skip": 0.5},
}
CLI = [sys.executable, "-m", "tspeft_rt.cli"]


def write_training_set(path: Path, per_task: int, seed: int) -> None:
    """`per_task` seeded picks from each task's train split, shuffled together (prompt/completion JSONL)."""
    from tspeft_rt.data import load_task, mc_to_text

    rng = random.Random(seed)
    examples = []
    for task in TASKS:
        docs = load_task(task, "train")
        examples += [mc_to_text(ex) for ex in rng.sample(docs, min(per_task, len(docs)))]
    rng.shuffle(examples)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": ex.prompt, "completion": ex.completion}) + "\n" for ex in examples))
    tmp.replace(path)


def train_settings(args, config: str, seed: int, run: Path) -> dict:
    common = {"model": args.model, "data_files": [str(args.out / "train.jsonl")], "eval_tasks": TASKS,
              "eval_examples": args.eval_limit, "steps": args.steps, "batch_size": args.batch_size,
              "micro_batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.steps // 10,
              "tau_warmup_steps": max(1, args.steps // 10), "rank": 8, "alpha": 16, "target_modules": "all-linear",
              "seed": seed, "save_every": args.save_every, "log_every": max(1, min(10, args.steps // 4)), "progress": False,
              "output_dir": str(run)}
    return {**common, **CONFIGS[config]}


def run_config(args, config: str, seed: int, name: str | None = None, overrides: dict | None = None) -> None:
    """Train (or resume) one configuration, into OUT/<name or config>-s<seed> with `overrides` of its
    settings where given, in a child process; time it and take its peak RSS."""
    run = args.out / f"{name or config}-s{seed}"
    if (run / "results.json").exists():
        return
    settings = {**train_settings(args, config, seed, run), **(overrides or {})}
    cmd = [*CLI, "train", *[f"--set={k}={json.dumps(v)}" for k, v in settings.items()]]
    if (run / "checkpoints" / "latest").exists():
        cmd.append("--resume")
    print(f"[{time.strftime('%H:%M:%S')}] {name or config} seed {seed}: "
          f"{'resuming' if '--resume' in cmd else 'training'}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name or config} seed {seed} failed (exit {os.waitstatus_to_exitcode(status)}); rerun to resume")
    timing = run / "timing.json"  # parts of an interrupted run add up
    previous = json.loads(timing.read_text()) if timing.exists() else {"train_eval_s": 0.0, "peak_rss_mb": 0.0}
    timing.write_text(json.dumps({"train_eval_s": previous["train_eval_s"] + seconds,
                                  "peak_rss_mb": max(previous["peak_rss_mb"], usage.ru_maxrss / 1024)}))


def run_base(args) -> None:
    """Zero-shot accuracy of the base model (cached)."""
    out = args.out / "base" / "results.json"
    if out.exists():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] base: zero-shot evaluation", flush=True)
    r = subprocess.run([*CLI, "eval", "--model", args.model, "--tasks", ",".join(TASKS), "--limit",
                        str(args.eval_limit), "--out", str(out.with_suffix(".tmp"))], stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        sys.exit("base evaluation failed")
    out.with_suffix(".tmp").replace(out)


def collect(args) -> list[dict]:
    rows = []
    base = args.out / "base" / "results.json"
    if base.exists():
        rows.append(_row("base", 0, json.loads(base.read_text()), {}))
    for config in CONFIGS:
        for seed in args.seeds:
            run = args.out / f"{config}-s{seed}"
            if config != "base" and (run / "results.json").exists():
                result = json.loads((run / "results.json").read_text())
                timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").exists() else {}
                rows.append(_row(config, seed, result["eval"], {**result, **timing}))
    return rows


def _row(config: str, seed: int, acc: dict, extra: dict) -> dict:
    return {"config": config, "seed": seed, **{t: acc[t]["acc"] for t in TASKS},
            "average": statistics.mean(acc[t]["acc"] for t in TASKS),
            "average_norm": statistics.mean(acc[t]["acc_norm"] for t in TASKS),
            "train_skip": extra.get("train_skip", 0.0), "eval_skip": extra.get("eval_skip", 0.0),
            "train_eval_s": extra.get("train_eval_s"), "peak_rss_mb": extra.get("peak_rss_mb")}


def cell(values: list[float], signed: bool = False, scale: float = 100.0, digits: int = 1) -> str:
    """Mean ± sample sd over seeds (in percent by default)."""
    mean = f"{scale * statistics.mean(values):{'+' if signed else ''}.{digits}f}"
    return mean + (f" ± {scale * statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def report(args, rows: list[dict]) -> None:
    if not rows:
        print("nothing finished yet")
        return
    with open(args.out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(row)

    def delta_vs_dense(config: str, group: list[dict]) -> str:
        """A TS run's average minus its dense method's (LoRA or DoRA) with the same seed: paired by seed,
        the noise the two runs share (initialisation, data order) cancels."""
        if not config.startswith("ts-"):
            return "-"
        dense = {r["seed"]: r["average"] for r in by_config.get(config.split("-")[1], [])}
        deltas = [r["average"] - dense[r["seed"]] for r in group if r["seed"] in dense]
        return cell(deltas, signed=True) if deltas else "-"

    head = ["config", "seeds", *TASKS, "average", "avg acc_norm", "Δ avg vs dense", "skip (val)", "train+eval min",
            "peak RSS GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, group in by_config.items():
        times = [r["train_eval_s"] for r in group if r["train_eval_s"]]
        mem = [r["peak_rss_mb"] for r in group if r["peak_rss_mb"]]
        lines.append("| " + " | ".join([config, str(len(group)), *[cell([r[t] for r in group]) for t in TASKS],
                                         cell([r["average"] for r in group]), cell([r["average_norm"] for r in group]),
                                         delta_vs_dense(config, group), cell([r["eval_skip"] for r in group]),
                                         f"{statistics.mean(times) / 60:.0f}" if times else "-",
                                         f"{max(mem) / 1024:.1f}" if mem else "-"]) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(args, by_config)


def plot(args, by_config: dict[str, list[dict]]) -> None:
    """Average accuracy against measured skip: each seed a faint point, the mean ± sd over seeds a bold
    one; the dashed line is dense LoRA's mean, the bar to beat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (config, group) in enumerate(by_config.items()):
        skip = [100 * r["eval_skip"] for r in group]
        avg = [100 * r["average"] for r in group]
        sd = statistics.stdev(avg) if len(avg) > 1 else 0.0
        # DoRA hollow, so that it does not hide LoRA where the two coincide
        style = {"marker": "s", "facecolors": "none", "edgecolors": f"C{i}"} if "dora" in config else \
            {"marker": "x" if config == "base" else "o", "color": f"C{i}"}
        ax.scatter(skip, avg, alpha=0.35, s=18, **style)
        ax.errorbar(statistics.mean(skip), statistics.mean(avg), yerr=sd, color=f"C{i}", capsize=3)
        ax.scatter(statistics.mean(skip), statistics.mean(avg), s=60, label=config, **style)
    if "lora" in by_config:
        ax.axhline(100 * statistics.mean(r["average"] for r in by_config["lora"]), ls="--", lw=0.8, color="grey")
    seeds = max(len(g) for g in by_config.values())
    ax.set_xlabel("skipped token updates on the validation text (%)")
    ax.set_ylabel("average accuracy, 8 tasks (%)")
    ax.set_title(f"SmolLM2-135M-Instruct, {seeds} seed{'s' if seeds > 1 else ''}: accuracy against skip")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out / "accuracy_vs_skip.png", dpi=120)


def check_settings(args) -> None:
    """Cached runs are only comparable under one set of settings: record them, refuse a mismatch."""
    settings = {k: getattr(args, k) for k in ("model", "per_task", "steps", "batch_size", "lr", "eval_limit")}
    path = args.out / "study.json"
    if path.exists() and json.loads(path.read_text()) != settings:
        sys.exit(f"{path} records other settings ({path.read_text().strip()}); use another --out")
    path.write_text(json.dumps(settings))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--per-task", type=int, default=100, help="training examples drawn from each task")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-limit", type=int, default=60, help="validation examples per task")
    ap.add_argument("--save-every", type=int, default=25)
    ap.add_argument("--report-only", action="store_true")
    return ap


def main() -> None:
    args = parser().parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        sys.exit(f"unknown configs {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    check_settings(args)
    if not args.report_only:
        if not (args.out / "train.jsonl").exists():
            write_training_set(args.out / "train.jsonl", args.per_task, seed=1234)
        for config in args.configs.split(","):
            if config == "base":
                run_base(args)
            else:
                for seed in args.seeds:
                    run_config(args, config, seed)
    report(args, collect(args))


if __name__ == "__main__":
    main()
