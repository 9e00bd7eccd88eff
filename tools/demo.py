"""`make demo`: train a TS-LoRA adapter on the bundled model and data, export it, serve it with vLLM.

    python tools/demo.py [--steps 40] [--port 8000]

Trains configs/demo.yaml into runs/demo (a fresh run each time), prints the base model's and the
adapter's ARC-Easy validation accuracy and the measured skip rate, exports the adapter to
runs/demo/adapter, prints `tspeft-rt inspect` of it, writes the keep-rate heatmap
(runs/demo/keep_rates.png), answers a question with the gated adapter on the Hugging Face path
(`tspeft-rt generate`), then serves the adapter with vLLM (`tspeft-rt serve`), asks the same question
through the `openai` client on the OpenAI-compatible endpoint, prints the answer and the skip rate the
server measured, and stops the server.
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
    ap.add_argument("--port", type=int, default=8000, help="port of the demo's vLLM server (127.0.0.1)")
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
    serve_and_ask(cfg.model, adapter.path, question, args.port)


def serve_and_ask(model: str, adapter_dir: Path, question: str, port: int) -> None:
    """`tspeft-rt serve --model MODEL demo=ADAPTER`, then the question through the openai client."""
    from openai import OpenAI

    from tspeft_rt.serve.launcher import Server

    print(f"\n$ tspeft-rt serve --model {model} demo={adapter_dir} --port {port}   (log: runs/demo/vllm.log)")
    with Server(model=model, adapters=[f"demo={adapter_dir}"], port=port, log_file=ROOT / "runs/demo/vllm.log") as server:
        print(f"vLLM serves {', '.join(m['id'] for m in server.served_models())} at {server.url}/v1")
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        answer = client.completions.create(model="demo", prompt=question, max_tokens=12, temperature=0)
        print(f"completions (model=demo): {answer.choices[0].text!r}")
        chat = client.chat.completions.create(model="demo", max_tokens=24, temperature=0,
                                              messages=[{"role": "user", "content": "Why is the sky blue?"}])
        print(f"chat (model=demo): {chat.choices[0].message.content!r}")
        print(f"token updates skipped while serving: {served_skip(server.url):.1%}")
    print("server stopped")


def served_skip(url: str) -> float:
    """The demo adapter's skip rate from the server's /metrics (gate telemetry, refreshed each second)."""
    import time
    import urllib.request

    for _ in range(20):
        with urllib.request.urlopen(f"{url}/metrics") as r:
            values = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines()
                          if line.startswith("tspeft_gate_token_updates"))
        updates = float(values.get('tspeft_gate_token_updates_total{adapter="demo"}', 0))
        if updates:
            return float(values['tspeft_gate_token_updates_skipped_total{adapter="demo"}']) / updates
        time.sleep(0.5)
    raise RuntimeError(f"{url}/metrics has no gate telemetry for the demo adapter")

if __name__ == "__main__":
    main()
