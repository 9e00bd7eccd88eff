"""Gate a LoRA that PEFT trained: calibrate only the thresholds, then compare with the ungated adapter.

    python tools/gate_peft_lora.py                      # ARC-Easy, bundled SmolLM2-135M, ~26 min on 2 cores
    python tools/gate_peft_lora.py --steps 40 --calib-steps 10 --eval-examples 100 --out runs/gate_peft_small

1. Train a plain LoRA on every linear module with PEFT itself (get_peft_model, its own layers, a plain
   AdamW loop over the same tokenized batches `tspeft-rt train` would use) and save it with
   `save_pretrained`: an adapter from outside tspeft-rt. Skipped when --out/peft_lora exists.
2. Score it ungated on the validation split (`tspeft_rt.evaluate`, the Hugging Face path).
3. `tspeft-rt train` with init_adapter = that folder, train_weights = false, target_skip: only the
   thresholds learn (the weights stay bit for bit); its final evaluation reports the accuracy with the
   gates and the skip rate measured on the validation tokens. Export to --out/gated.
Prints one table and writes --out/results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tspeft_rt.adapter import attach_adapter, load_adapter
from tspeft_rt.config import load_config
from tspeft_rt.data import IGNORE, batch_indices, collate, tokenize, training_examples
from tspeft_rt.evaluate import evaluate_tasks
from tspeft_rt.export import export_checkpoint
from tspeft_rt.inject import load_base_model
from tspeft_rt.trainer import lr_factor, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ts_lora_arc_easy.yaml"


def train_with_peft(out: Path, steps: int, seed: int) -> None:
    """A rank-8 LoRA on all linear modules, trained by PEFT's layers with the recipe of CONFIG."""
    from peft import LoraConfig, get_peft_model

    cfg = load_config(CONFIG, [f"steps={steps}", f"seed={seed}", "method=lora"])
    torch.manual_seed(seed)
    model, tok = load_base_model(cfg.model)
    model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules="all-linear"))
    examples = [tokenize(tok, ex, cfg.prompt_format, cfg.max_seq_len) for ex in training_examples(cfg)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s))
    model.train()
    for step in range(steps):
        batch = collate([examples[i] for i in batch_indices(len(examples), cfg.seed, step, cfg.batch_size)],
                        tok.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0:
            print(f"peft step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gate_peft_lora"))
    ap.add_argument("--steps", type=int, default=150, help="PEFT training steps")
    ap.add_argument("--calib-steps", type=int, default=30, help="threshold-only steps of the calibration")
    ap.add_argument("--target-skip", type=float, default=0.5)
    ap.add_argument("--eval-examples", type=int, default=500, help="validation examples (ARC-Easy has 570)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    peft_dir, run_dir, gated_dir = args.out / "peft_lora", args.out / "calibrate", args.out / "gated"
    cfg = load_config(CONFIG)
    t0 = time.perf_counter()
    if not (peft_dir / "adapter_model.safetensors").is_file():
        train_with_peft(peft_dir, args.steps, args.seed)
    model, tok = load_base_model(cfg.model)
    attach_adapter(model, load_adapter(peft_dir))
    ungated = evaluate_tasks(model, tok, cfg.tasks, args.eval_examples, cfg.eval_batch_size)
    calib = load_config(CONFIG, [f"init_adapter={peft_dir}", "train_weights=false", f"target_skip={args.target_skip}",
                                 "tau_warmup_steps=0", f"steps={args.calib_steps}", f"eval_examples={args.eval_examples}",
                                 f"seed={args.seed}", f"output_dir={run_dir}", "save_every=0", "progress=false"])
    gated = train(calib, resume=(run_dir / "checkpoints").is_dir())
    export_checkpoint(run_dir, gated_dir)
    task = cfg.tasks[0]
    result = {"task": task, "eval_examples": ungated[task]["n"], "target_skip": args.target_skip,
              "ungated_acc": ungated[task]["acc"], "gated_acc": gated["eval"][task]["acc"],
              "measured_skip": gated["eval_skip"], "train_skip": gated["train_skip"],
              "peft_steps": args.steps, "calib_steps": args.calib_steps, "minutes": (time.perf_counter() - t0) / 60}
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\n{task}, {result['eval_examples']} validation examples; PEFT LoRA ({args.steps} steps) gated by "
          f"{args.calib_steps} threshold-only steps at target skip {args.target_skip}")
    print(f"{'':24s}{'acc':>8s}{'skip':>8s}")
    print(f"{'PEFT LoRA, ungated':24s}{100 * result['ungated_acc']:8.1f}{0.0:8.1%}")
    print(f"{'same weights, gated':24s}{100 * result['gated_acc']:8.1f}{result['measured_skip']:8.1%}")
    print(f"gated - ungated: {100 * (result['gated_acc'] - result['ungated_acc']):+.1f} points; "
          f"measured skip - target: {100 * (result['measured_skip'] - args.target_skip):+.1f} points; "
          f"adapter: {gated_dir}")


if __name__ == "__main__":
    main()
