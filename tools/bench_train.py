"""Training-step cost of TS-LoRA against our dense LoRA and PEFT's LoRA, side by side in one run.

    python tools/bench_train.py                          # bundled SmolLM2-135M, batch 8 x 128 tokens
    python tools/bench_train.py --batch 4 --seq 256 --steps 12 --methods ts-lora,lora,peft-lora,ts-dora,peft-dora

All variants hold the same base weights and adapter weights (B random, so the gate has something to
decide) and train on the same batch of real ARC-Easy text. The gated variants' thresholds are set to
the --skip quantile of each module's ratios, so that fraction of token updates is skipped. Steps
run round-robin over the variants (A B C A B C ...) so that machine noise hits all alike; the
median step time is reported.

Memory: on CUDA, the peak allocated memory of a step. On CPU the allocator keeps no peak, so the
figure is the bytes autograd saves for backward during the step (unique storages; what differs
between adapter implementations), measured with saved-tensor hooks.

Prints a table and the ratios against PEFT's LoRA last.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from tspeft_rt.data import collate, load_task, mc_to_text, tokenize
from tspeft_rt.inject import AdapterSpec, adapted_layers, adapter_parameters, inject_adapters, load_base_model
from tspeft_rt.sparsity import ThresholdController


def make_batch(tokenizer, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Real text: concatenated ARC-Easy examples cut into `batch` rows of exactly `seq` tokens."""
    ids: list[int] = []
    for ex in load_task("arc_easy", "train", 400):
        ids += tokenize(tokenizer, mc_to_text(ex), "plain", 10_000)[0]
        if len(ids) >= batch * seq:
            break
    rows = [(ids[i * seq : (i + 1) * seq], ids[i * seq : (i + 1) * seq]) for i in range(batch)]
    return collate(rows, tokenizer.pad_token_id)


def ours(base, method: str, rank: int, skip: float, batch, target_modules) -> tuple:
    model = copy.deepcopy(base)
    inject_adapters(model, AdapterSpec(method=method, target_modules=target_modules, rank=rank, alpha=2 * rank))
    torch.manual_seed(1)
    for layer in adapted_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    weights, taus = adapter_parameters(model)
    controller = None
    if taus:  # thresholds at the --skip quantile of each module's ratios on this batch
        cfg = argparse.Namespace(sparsity_lambda=0.0, target_skip=None, tau_warmup_steps=0,
                                 tau_init_quantile=skip, tau_lr=0.0, tau_max_step=0.0, lambda_lr=0.0, lambda_p=0.0)
        gates = {n: l.token_gate for n, l in adapted_layers(model).items()}
        controller = ThresholdController(gates, cfg)
        next(iter(gates.values())).context.collect_ratios = True
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        controller.step(0)
        next(iter(gates.values())).context.collect_ratios = False
    return model, weights + taus, controller


def peft_lora(base, rank: int, dora: bool, target_modules) -> tuple:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=target_modules,
                                                           lora_dropout=0.0, use_dora=dora))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model, [p for p in model.parameters() if p.requires_grad], None


class SavedBytes:
    """Bytes of the unique storages autograd saves for backward while active."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def train_step(model, controller, optimizer, batch) -> tuple[float, int]:
    device = batch["input_ids"].device
    saved = SavedBytes()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                 batch["labels"][:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if controller is not None:
        for g in controller.gates.values():
            g.reset_stats()
            g.tau.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated()
    return time.perf_counter() - t0, saved.total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--skip", type=float, default=0.5, help="fraction of token updates the gated variants skip")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--methods", default="ts-lora,lora,peft-lora")
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    base, tok = load_base_model(args.model)
    base.to(args.device)
    batch = {k: v.to(args.device) for k, v in make_batch(tok, args.batch, args.seq).items()}
    variants = {}
    for name in args.methods.split(","):
        if name.startswith("peft-"):
            variants[name] = peft_lora(base, args.rank, name == "peft-dora", args.targets)
        else:
            variants[name] = ours(base, name, args.rank, args.skip, batch, args.targets)
    # lr 0: the full optimizer step runs, but the weights (and so the skip rate) stay as calibrated
    optimizers = {n: torch.optim.AdamW(v[1], lr=0.0) for n, v in variants.items()}
    times: dict[str, list[float]] = {n: [] for n in variants}
    memory: dict[str, int] = {}
    for i in range(args.steps + 2):
        for name, (model, _, controller) in variants.items():
            dt, mem = train_step(model, controller, optimizers[name], batch)
            if i >= 2:
                times[name].append(dt)
                memory[name] = max(memory.get(name, 0), mem)
    skips = {}
    for name, (model, _, controller) in variants.items():
        if controller is not None:  # the skip rate the gates take on the batch
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            stats = [g.reset_stats() for g in controller.gates.values()]
            skips[name] = 1 - sum(s.kept / s.valid for s in stats) / len(stats)

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    mem_kind = "peak allocated" if args.device == "cuda" else "saved for backward"
    ref = "peft-lora" if "peft-lora" in variants else next(iter(variants))
    print(f"\nbench_train: {args.model}, batch {args.batch} x {args.seq} tokens, rank {args.rank}, "
          f"targets {args.targets}, {device}, median of {args.steps} steps")
    print(f"{'variant':<11} {'skip':>6} {'step ms':>9} {'memory MiB':>11} {'time/' + ref:>15} {'mem/' + ref:>14}")
    t_ref, m_ref = statistics.median(times[ref]), memory[ref]
    for name in variants:
        t, m = statistics.median(times[name]), memory[name]
        skip = f"{skips[name]:.2f}" if name in skips else "-"
        print(f"{name:<11} {skip:>6} {1000 * t:>9.1f} {m / 2**20:>11.1f} {t / t_ref:>15.3f} {m / m_ref:>14.3f}")
    print(f"(memory: {mem_kind})")


if __name__ == "__main__":
    main()
