"""How many gate decisions serving takes differently from training, per (token, module).

    python tools/gate_agreement.py --adapter runs/demo/adapter [--model smollm2-135m-instruct] [--prompts 32]

Training decides with ||m||^2 computed from the delta itself (`tspeft_rt.layers`, fp32). Serving
decides before any expand, with ||B h||^2 = h^T (B^T B) h from the Gram matrix of the served dtype's
weights: the CPU path (`tspeft_rt.kernels.gated_lora`, run here) and the Triton kernels share that math.
Both compare against tau^2 ||W0 x + b||^2 with `tspeft_rt.gate`'s helpers. For each adapted module, on
the same inputs (the fp32 model's activations over validation prompts of the bundled tasks), this
counts the decisions that differ from training's:

    serving fp32: weights, activations and base output fp32 (what `tspeft-rt serve` runs on CPU)
    serving bf16: the same inputs, weights and base output rounded to bf16 (a bf16 deployment's gate
                  arithmetic; its activations would differ further, upstream of the gate)

Prints one line per precision: flips / decisions, and how many of the flips lie within 1% of tau.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from tspeft_rt.data import load_task
from tspeft_rt.gate import gate_keep, row_sq_norm
from tspeft_rt.generate import load_model_with_adapter
from tspeft_rt.inject import adapted_layers
from tspeft_rt.kernels.gated_lora import PackedLoRA, gate_decisions


def capture_inputs(model, tokenizer, texts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(x [N, in], base [N, out]) of every gated module over the texts, from one fp32 forward each."""
    inputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for name, layer in adapted_layers(model).items():
        if layer.gated and not layer.dora:
            def hook(module, args, _out, name=name):
                x = args[0].reshape(-1, args[0].shape[-1])
                inputs.setdefault(name, []).append((x, module.base_layer(x)))
            hooks.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        for text in texts:
            model(tokenizer(text, return_tensors="pt").input_ids)
    for h in hooks:
        h.remove()
    return {name: (torch.cat([x for x, _ in pairs]), torch.cat([b for _, b in pairs])) for name, pairs in inputs.items()}


def decisions(layer, x: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(where serving's decisions in `dtype` differ from training's, per token; the ratio / tau)."""
    a, b, tau = layer.lora_A.weight.float(), layer.lora_B.weight.float() * layer.scaling, layer.token_gate.tau
    with torch.no_grad():
        m = (x @ a.T) @ b.T
        train = gate_keep(row_sq_norm(m), row_sq_norm(base), tau)
        packed = PackedLoRA(1, a.shape[0], a.shape[1], [b.shape[0]], dtype, "cpu")
        packed.set_slot(0, [a.to(dtype)], [b.to(dtype)])
        packed.set_gate(0, [float(tau)])
        base = base.to(dtype)
        serving = gate_decisions(base, x.to(dtype), packed, torch.zeros(len(x), dtype=torch.long))[2][:, 0]
        closeness = (row_sq_norm(m) / row_sq_norm(base).clamp_min(1e-30)).sqrt() / tau.clamp_min(1e-30)
    return train != serving, closeness


def agreement(model, tokenizer, texts: list[str]) -> dict[str, dict[str, int]]:
    """{"serving <precision>": {decisions, flips, flips_within_1pct_of_tau}} over every gated module."""
    captured = capture_inputs(model, tokenizer, texts)
    layers = adapted_layers(model)
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for name, (x, base) in captured.items():
            f, closeness = decisions(layers[name], x, base, dtype)
            r = out.setdefault(f"serving {precision}", {"decisions": 0, "flips": 0, "flips_within_1pct_of_tau": 0})
            r["decisions"] += f.numel()
            r["flips"] += int(f.sum())
            r["flips_within_1pct_of_tau"] += int((f & ((closeness - 1).abs() < 0.01)).sum())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", required=True, help="an exported TS-LoRA adapter directory")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="its base model")
    ap.add_argument("--prompts", type=int, default=32, help="validation prompts (ARC-Easy questions with choices)")
    args = ap.parse_args(argv)
    model, tokenizer, _ = load_model_with_adapter(args.model, args.adapter)
    texts = [ex.choices[0].context + ex.choices[0].continuation for ex in load_task("arc_easy", "validation",
                                                                                    args.prompts)]
    result = agreement(model, tokenizer, texts)
    for label, r in result.items():
        print(f"{label}: {r['flips']} of {r['decisions']} gate decisions differ from training "
              f"({100 * r['flips'] / r['decisions']:.4f} %), {r['flips_within_1pct_of_tau']} of them within 1 % of tau")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
