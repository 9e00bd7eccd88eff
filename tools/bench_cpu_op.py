"""What the CPU op (`tspeft::gated_lora_cpu`) adds to a layer call, beside the base matmul it follows.

    python tools/bench_cpu_op.py [--tokens 16,2048] [--repeats 20] [--seed 0]

The four layer calls of a layer of the synthetic 1.1B Llama (`tools/synthetic_llama.py`: qkv, o, gate_up,
down; a rank-16 adapter, one slot, fp32), at each batch size of --tokens (16: a decode step of 16 streams;
2048: a prefill step of 16 x 128 tokens). Per call, the base matmul and each variant's op on a copy of its
output, each timed after 256 MiB of other data went through the caches (as in a forward, where a layer's
weights were last used a step ago; untimed, as is the copy), interleaved over --repeats, medians. Variants:

    gated  thresholds at each slice's median ratio ||B A x|| / ||W0 x||: half the updates kept
    plain  no gate (tau = 0): every update kept, as the plugin serves plain LoRA

Printed per batch size: each variant's cost as a share of the layer's base matmuls, and gated / plain.
Random weights (x ~ N(0, 1), W0 ~ N(0, 1/in), A ~ N(0, 1/in), B ~ N(0, 0.01/r)): the cost depends on the
shapes and the kept fraction, not on the values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from synthetic_llama import CONFIG
from tspeft_rt.kernels.gated_lora import PackedLoRA
from tspeft_rt.kernels.gated_lora_cpu import cpu_op_loaded, gated_lora_cpu

RANK = 16
VARIANTS = ("gated", "plain")


def layer_calls() -> dict[str, tuple[int, list[int]]]:
    """name -> (in features, output slices) of one Llama layer's four LoRA layer calls."""
    hidden, mlp = CONFIG["hidden_size"], CONFIG["intermediate_size"]
    kv = CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    return {"qkv": (hidden, [hidden, kv, kv]), "o": (hidden, [hidden]), "gate_up": (hidden, [mlp, mlp]),
            "down": (mlp, [hidden])}


def median_ratios(packed: PackedLoRA, x: torch.Tensor, base: torch.Tensor) -> list[float]:
    """Per slice, the median over tokens of ||B A x|| / ||W0 x||: the threshold that keeps half."""
    h = x @ packed.a.t()
    ratios = []
    for s in range(len(packed.offsets) - 1):
        lo, hi, cols = packed.offsets[s], packed.offsets[s + 1], slice(s * RANK, (s + 1) * RANK)
        delta = h[:, cols] @ packed.b_t[cols, lo:hi]
        ratios.append(float((delta.norm(dim=1) / base[:, lo:hi].norm(dim=1)).median()))
    return ratios


def packed_layer(x: torch.Tensor, w0: torch.Tensor, slices: list[int], variant: str) -> PackedLoRA:
    """One slot of random rank-16 weights; gated: each slice's threshold at its median ratio on x."""
    in_features = x.shape[1]
    packed = PackedLoRA(1, RANK, in_features, slices, torch.float32, "cpu")
    packed.set_slot(0, [torch.randn(RANK, in_features) / in_features**0.5 for _ in slices],
                    [torch.randn(n, RANK) * 0.1 / RANK**0.5 for n in slices], [True] * len(slices))
    if variant == "gated":
        packed.set_gate(0, median_ratios(packed, x, x @ w0.t()))
    return packed


def time_call(tokens: int, in_features: int, slices: list[int], repeats: int, evict: torch.Tensor) -> dict[str, float]:
    """Median seconds of the base matmul and of each variant's op on a copy of its output."""
    x = torch.randn(tokens, in_features)
    w0 = torch.randn(sum(slices), in_features) / in_features**0.5
    packed = {variant: packed_layer(x, w0, slices, variant) for variant in VARIANTS}
    slots = torch.zeros(tokens, dtype=torch.int32)
    base = x @ w0.t()
    times: dict[str, list[float]] = {name: [] for name in ("base", *VARIANTS)}
    for _ in range(repeats + 1):  # the first round warms up
        for name in times:
            out = base.clone()  # the op adds in place: every call starts from the base output
            evict.add_(1.0)  # caches full of other data, as after the rest of a forward
            start = time.perf_counter()
            if name == "base":
                torch.mm(x, w0.t(), out=out)
            else:
                gated_lora_cpu(out, x, packed[name], slots)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="16,2048", help="Comma-separated batch sizes (tokens per call).")
    parser.add_argument("--repeats", type=int, default=20, help="Timed rounds per call shape (median).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and inputs.")
    args = parser.parse_args()
    if not cpu_op_loaded():
        raise SystemExit("the CPU op could not be built (see the warning above)")
    torch.manual_seed(args.seed)
    evict = torch.zeros(64 << 20)  # 256 MiB, written before every timed call
    print(f"rank {RANK}, fp32, {torch.get_num_threads()} threads; op time as a share of the layer's base matmuls")
    print(f"{'tokens':>6}  {'base ms':>8}  {'gated':>6}  {'plain':>6}  {'gated/plain':>11}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        totals = {"base": 0.0, **{v: 0.0 for v in VARIANTS}}
        for in_features, slices in layer_calls().values():
            for name, seconds in time_call(tokens, in_features, slices, args.repeats, evict).items():
                totals[name] += seconds
        base = totals["base"]
        print(f"{tokens:>6}  {base * 1e3:>8.1f}  {totals['gated'] / base:>6.3f}  {totals['plain'] / base:>6.3f}  "
              f"{totals['gated'] / totals['plain']:>11.3f}")


if __name__ == "__main__":
    main()
