"""tools/frontier.py on the tiny model (accuracy part; the serving part is bench_serve.py's harness, run by
hand): every configuration exported and evaluated, pruned to its budget or retrained on its modules,
cached; the table's pairing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


BUDGETS = [f"ts-{r}-{b}" for b in ("half", "quarter") for r in ("keep", "norm", "random")]
RETRAINED = ["ts-keep-quarter-retrained", "ts-random-quarter-retrained"]  # two of six: a tiny training takes ~15 s


def frontier(out: Path, model: Path, configs: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "frontier.py"), "--out", str(out), "--model", str(model),
           "--configs", ",".join(configs), "--seeds", "0", "--steps", "4", "--per-task", "3", "--batch-size", "2",
           "--eval-limit", "2", "--no-bench"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_the_configurations_and_an_unknown_one(tmp_path):
    from frontier import configurations

    assert list(configurations()) == ["lora", "ts-lora-0.5", *BUDGETS, *(b + "-retrained" for b in BUDGETS)]
    r = frontier(tmp_path, tmp_path, ["lora", "ts-keep-third"])
    assert r.returncode != 0 and "--configs: unknown ['ts-keep-third']" in r.stderr


def test_frontier_accuracy_part(tmp_path, tiny_model_dir):
    out = tmp_path / "frontier"
    configs = ["lora", "ts-lora-0.5", *BUDGETS, *RETRAINED]
    r = frontier(out, tiny_model_dir, configs)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"training", "evaluate", "export"} <= set(r.stdout.split())
    rows = list(csv.DictReader(open(out / "frontier.csv")))
    assert [row["config"] for row in rows] == configs
    modules = {row["config"]: int(row["modules"]) for row in rows}
    assert modules["lora"] == modules["ts-lora-0.5"] == 14  # 2 layers x 7 projections
    assert {modules[f"ts-{r}-half"] for r in ("keep", "norm", "random")} == {7}
    assert {modules[f"ts-{r}-quarter"] for r in ("keep", "norm", "random")} == {4}  # round(3.5)
    for name in RETRAINED:  # TS-LoRA trained anew on exactly the modules the export kept, nothing else changed
        exported = name.removesuffix("-retrained")
        targets = [json.loads((out / "adapters" / f"{n}-s0" / "adapter_config.json").read_text())["target_modules"]
                   for n in (exported, name)]
        assert targets[0] == targets[1] and modules[name] == 4
        trained, retrained = (yaml.safe_load((out / "train" / f"{run}-s0" / "config.yaml").read_text())
                              for run in ("ts-lora-0.5", name))
        assert retrained.pop("target_modules") == targets[0] and trained.pop("target_modules") == "all-linear"
        assert {k: v for k, v in retrained.items() if k != "output_dir"} == \
               {k: v for k, v in trained.items() if k != "output_dir"}
    for row in rows:  # the stored accuracy is the evaluation of that exported adapter
        acc = json.loads((out / "eval" / f"{row['config']}-s0.json").read_text())
        assert float(row["boolq"]) == acc["boolq"]["acc"]
    # an adapter exported whole: its accuracy, taken from its training run, is what evaluating the export gives
    from reproduce import TASKS
    from tspeft_rt.evaluate import evaluate_tasks
    from tspeft_rt.generate import load_model_with_adapter

    for config in ("lora", "ts-lora-0.5", RETRAINED[0]):
        model, tokenizer, _ = load_model_with_adapter(str(tiny_model_dir), str(out / "adapters" / f"{config}-s0"))
        stored = json.loads((out / "eval" / f"{config}-s0.json").read_text())
        assert evaluate_tasks(model, tokenizer, TASKS, 2) == stored
    table = (out / "frontier.md").read_text()
    keep, norm = (float(next(r["average"] for r in rows if r["config"] == c))
                  for c in ("ts-keep-quarter", "ts-norm-quarter"))
    assert f"a quarter of the modules: keep-rate ranking minus weight-norm ranking, average accuracy " \
           f"(paired by seed, points): {100 * (keep - norm):+.1f}" in table
    assert "| lora | 1 | 14 |" in table and "| - | - |" in table  # no serving figures without the bench

    # cached: a second run exports and evaluates nothing again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "eval").iterdir()}
    r = frontier(out, tiny_model_dir, configs)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not {"training", "evaluate", "export"} & set(r.stdout.split())
    assert {p: p.stat().st_mtime_ns for p in (out / "eval").iterdir()} == stamps


def test_base_ratio_takes_the_base_measured_around_the_adapter_in_its_pass():
    from frontier import base_ratio

    bases = [{"time": 1.0, "prefill": 100.0}, {"time": 3.0, "prefill": 300.0}, {"time": 5.0, "prefill": 50.0}]
    assert base_ratio({"time": 2.0, "prefill": 100.0}, bases, "prefill") == pytest.approx(0.5)  # mean 200
    assert base_ratio({"time": 6.0, "prefill": 100.0}, bases, "prefill") == pytest.approx(2.0)  # last only
    later = bases + [{"time": 6.0 + 3600, "prefill": 1.0}]  # a pass resumed an hour later is not a pair
    assert base_ratio({"time": 6.0, "prefill": 100.0}, later, "prefill") == pytest.approx(2.0)
    assert base_ratio({"time": 6.0 + 2 * 3600, "prefill": 100.0}, bases, "prefill") is None


def test_bench_order_measures_the_base_around_every_four_adapters():
    from frontier import bench_order

    assert bench_order(["a"]) == ["base", "a", "base"]
    keys = [f"k{i}" for i in range(6)]
    assert bench_order(keys) == ["base", "k0", "k1", "k2", "k3", "base", "k4", "k5", "base"]


def test_bench_pass_writes_each_result_and_the_base_around_them(tmp_path, monkeypatch):
    """bench()'s bookkeeping, the engine runs replaced by a counter (bench_serve.py's harness has its own
    tests): the base around the adapters, each adapter's config by its files, nothing measured twice."""
    import argparse

    import frontier

    calls = []

    def engine(args, label, config, model, adapter):
        calls.append((label, config))
        return {"prefill": 1.0 + len(calls), "decode": 2.0, "time": float(len(calls))}

    monkeypatch.setattr(frontier, "bench_one", engine)
    adapters = {}
    for key, gated in (("lora-s0", False), ("ts-keep-half-s0", True)):
        adapters[key] = tmp_path / "adapters" / key
        adapters[key].mkdir(parents=True)
        if gated:
            (adapters[key] / "token_gate.safetensors").touch()
    args = argparse.Namespace(out=tmp_path / "out", model=str(tmp_path))  # a folder: the engine never reads it
    frontier.bench(args, adapters)
    assert calls == [("base", "base-default"), ("lora-s0", "plugin-lora"), ("ts-keep-half-s0", "gated"),
                     ("base", "base-default")]
    assert len((args.out / "bench" / "base.jsonl").read_text().splitlines()) == 2
    assert json.loads((args.out / "bench" / "ts-keep-half-s0.json").read_text())["prefill"] == 4.0
    frontier.bench(args, adapters)  # all measured: no engine starts
    assert len(calls) == 4


def test_report_with_serving_figures_plots_every_configuration(tmp_path):
    """The table and the plot from rows with serving ratios, one per configuration and seed (the plot's
    colour and marker come from the configuration's name: every name must map)."""
    import argparse

    from frontier import configurations, report

    rows = [{"config": name, "seed": seed, "modules": 52, "average": 0.4 + 0.01 * i + 0.001 * seed,
             "prefill_vs_base": 0.9, "decode_vs_base": 0.8 + 0.01 * seed, "served_skip": 0.5}
            for i, name in enumerate(configurations()) for seed in (0, 1)]
    args = argparse.Namespace(out=tmp_path, eval_limit=60)
    report(args, rows)
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "frontier.md").read_text()
    for i, name in enumerate(configurations()):
        assert f"| {name} | 2 | 52 |" in table
        assert i == 0 or f"| {i:+.1f} ± 0.0 |" in table  # paired with dense LoRA by seed
    assert "| 0.90 ± 0.00 | 0.81 ± 0.01 | 50.0 ± 0.0 |" in table
