"""GPU check of the Triton kernels: correctness at real shapes, kernel timings, a training step vs PEFT.

    python tools/gpu_check.py [--out gpu_check.json]    # on a CUDA machine, from the repo root
    python tools/gpu_check.py --dry-run-cpu              # the same code paths, tiny shapes, CPU interpreter

Installs nothing and needs no network (torch, triton, transformers, peft). The repo need not be
pip-installed (`tools/repo.py`: the root goes on sys.path, kernels/ and serve/ load under their
package names). The Triton modules are imported only once --dry-run-cpu has set TRITON_INTERPRET.

1. Correctness (exit code 1 if a case fails): `gated_lora_triton` against the PyTorch path
   (`gated_lora`) at hidden 4096 and 8192, ranks 16/64, 1..8192 tokens over 4 slots and no-adapter
   tokens, 1 and 3 slices, fp16/bf16, gates at each slot's median ratio; tokens within 2% of the
   threshold may flip (rounding); DoRA too (a scale per slot and column, a bias in the base). The
   plugin's serving path without vLLM (`SlotBatch`, `GatedSlots`) captured in a CUDA graph and
   replayed for adapter, base-only, padded and adapter batches, one slot's adapter pruned on some
   slices. `TritonGatedLoraFn` against `_GatedLoraFn` (outputs and gradients).
2. Timings, CUDA events, median of --reps replays of a captured CUDA graph (which checks the ops
   capture) after warm-up: the whole gated LoRA op (shrink + fused gate and expand) at skip
   0/30/50/70/90% and with the module pruned from every slot, against the dense op (tau = 0) and a
   cuBLAS matmul LoRA, and the dense op's bandwidth against a device-to-device copy's.
3. A training step (forward + backward) of a Llama-shaped model (random weights, LlamaConfig):
   TS-LoRA (GatedLinear with TritonGatedLoraFn; gates at 50% skip) against PEFT's LoRA, and
   against the PyTorch TS-LoRA path; the backward's two strategies forced.

Goals reported (largest T): the whole op at 50% skip <= 0.85x dense, at 0% <= 1.05x, at 90% <= 0.75x;
TS-LoRA step at 50% skip <= PEFT's LoRA step. The full numbers go to --out (JSON); a short table
prints last. An exception fails its own case or measurement only (progress lines say which), so one
broken case does not cost the rest of a short GPU lease.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from repo import import_repo  # tools/repo.py, beside this script

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


import_repo()

from tspeft_rt.gate import gate_keep, row_sq_norm  # noqa: E402
from tspeft_rt.kernels.gated_lora import (UNCOVERED, PackedLoRA, gate_decisions, gated_lora, gram,  # noqa: E402
                                          lora_segments, own_lora_delta, slice_sq_norms)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="where the full numbers go (JSON)")
    ap.add_argument("--reps", type=int, default=50, help="timed repetitions per measurement (median)")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="run every part at tiny shapes on CPU under TRITON_INTERPRET=1 (tests the script)")
    return ap.parse_args(argv)


def kernels():
    """The Triton modules (triton_gated_lora, triton_train), imported on first use, after main() has
    set TRITON_INTERPRET for a dry run (tspeft_rt.layers is imported late too: it may import them)."""
    from tspeft_rt.kernels import triton_gated_lora, triton_train

    return triton_gated_lora, triton_train


@contextmanager
def lora_fn(fn):
    """Make GatedLinear's TS-LoRA use the autograd function `fn`, whichever name layers.py takes
    it by (`_GatedLoraFn`, or `TritonGatedLoraFn` imported from the kernels module or into layers)."""
    from tspeft_rt import layers

    _, triton_train = kernels()
    owners = [(layers, "_GatedLoraFn"), (triton_train, "TritonGatedLoraFn")]
    owners += [(layers, "TritonGatedLoraFn")] if hasattr(layers, "TritonGatedLoraFn") else []
    saved = [getattr(module, name) for module, name in owners]
    for module, name in owners:
        setattr(module, name, fn)
    try:
        yield
    finally:
        for (module, name), value in zip(owners, saved):
            setattr(module, name, value)


# --------------------------------------------------------------------------- timing


class Timer:
    """Median milliseconds of a callable: CUDA events around `inner` replays of a captured graph
    (falls back to eager calls if capture fails, and records why), wall clock on CPU."""

    def __init__(self, device: str, reps: int, warmup: int = 3, inner: int = 10) -> None:
        self.cuda, self.reps, self.warmup, self.inner = device == "cuda", reps, warmup, inner
        self.capture_errors: list[str] = []

    def __call__(self, fn, graph: bool = True) -> float:
        for _ in range(self.warmup):
            fn()
        run, inner = fn, 1
        if self.cuda and graph:
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    fn()
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                run, inner = g.replay, self.inner  # replays back to back: the launch gaps are not timed
            except Exception as e:  # noqa: BLE001 - any capture failure is reported, then timed eagerly
                self.capture_errors.append(f"{type(e).__name__}: {e}"[:300])
                torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / inner)
            else:
                t0 = time.perf_counter()
                run()
                times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)


# --------------------------------------------------------------------------- serving problems


def serving_problem(T: int, K: int, slices: list[int], rank: int, L: int, dtype, device: str, seed: int,
                    no_adapter: bool = True, dora: bool = False) -> dict:
    """Weights of L slots, tokens over the slots (some without an adapter), a base output; with `dora`
    a DoRA scale per slot and output column (slot 0 a LoRA adapter: 1) and a bias in the base."""
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device)
    p = {"T": T, "slices": slices, "L": L, "dtype": dtype}
    p["x"] = rand(T, K).to(dtype)
    p["A"] = [(rand(L, 1, rank, K) / K**0.5).to(dtype) for _ in slices]
    p["B"] = [(rand(L, 1, n, rank) / (4 * rank**0.5)).to(dtype) for n in slices]
    p["G"] = torch.stack([gram(b[:, 0]) for b in p["B"]])
    p["base"] = (rand(T, sum(slices)) * rand(T, 1).exp()).to(dtype)
    p["slots"] = torch.randint(-1 if no_adapter else 0, L, (T,), generator=g, device=device)
    p["taus"] = torch.zeros(len(slices), L, device=device)
    if dora:
        p["scale"] = 1 + 0.2 * rand(L, sum(slices))
        p["scale"][0] = 1.0
        p["bias"] = rand(sum(slices)).to(dtype)
    return p


def reference_norms(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(||delta||^2, ||base||^2), each [S, T] fp32, per token and slice as the PyTorch path computes them."""
    off = [0]
    for n in p["slices"]:
        off.append(off[-1] + n)
    packed = packed_reference(p)
    h, delta, _, mine = gate_decisions(p["base"], p["x"], packed, p["slots"])
    if delta is None:  # LoRA decides from h; its delta is built here only to set the taus
        delta = own_lora_delta(h, mine, packed)
    return slice_sq_norms(delta, off).T, slice_sq_norms(p["base"], off).T


def set_median_taus(p: dict, d2: torch.Tensor, b2: torch.Tensor) -> None:
    """tau^2 at the median ratio of each slot and slice: about half of each slot's tokens skipped."""
    for slot in range(p["L"]):
        rows = p["slots"] == slot
        if rows.any():
            p["taus"][:, slot] = (d2[:, rows] / b2[:, rows].clamp_min(1e-12)).median(dim=1).values.sqrt()


def packed_reference(p: dict):
    """The PyTorch path's per-layer state (`PackedLoRA`) holding the problem's weights and taus."""
    packed = PackedLoRA(p["L"], p["A"][0].shape[-2], p["x"].shape[1], p["slices"], p["dtype"], p["x"].device,
                        dora="scale" in p, bias=p.get("bias"))
    covered = p.get("covered", [None] * p["L"])  # None: the slot's adapter has every slice
    for slot in range(p["L"]):
        packed.set_slot(slot, [a[slot, 0] for a in p["A"]], [b[slot, 0] for b in p["B"]], covered[slot])
        if "scale" in p:
            packed.set_scale(slot, p["scale"][slot])
        packed.set_gate(slot, p["taus"][:, slot].tolist())
    return packed


def serving_errors(p: dict, out: torch.Tensor, ref: torch.Tensor, counters: torch.Tensor,
                   counters_ref: torch.Tensor) -> tuple[list[str], int]:
    """Kernel output vs the PyTorch path's on problem p: on pairs match, off pairs keep the base bit
    for bit; tokens within 2% of their threshold may flip (rounding). (errors, near-threshold count)"""
    d2, b2 = reference_norms(p)
    tol = 2e-3 if p["dtype"] == torch.float16 else 1.6e-2
    taus = p["taus"][:, p["slots"].clamp_min(0)]
    on = gate_keep(d2, b2, taus) & (p["slots"] >= 0) & (taus >= 0)  # tau < 0: the slot's adapter lacks the slice
    thresholds = taus.square() * b2.clamp_min(1e-12)
    near = ((d2 - thresholds).abs() < 2e-2 * thresholds) & (p["slots"] >= 0) & (taus > 0)
    errors, off = [], 0
    for s, n in enumerate(p["slices"]):
        cols = slice(off, off + n)
        rows_on, rows_off = on[s] & ~near[s], ~on[s] & ~near[s]
        if not torch.equal(out[rows_off, cols], p["base"][rows_off, cols]):
            errors.append(f"slice {s}: off rows written")
        if rows_on.any():
            diff = (out[rows_on, cols].float() - ref[rows_on, cols].float()).abs()
            bound = tol * (1 + ref[rows_on, cols].float().abs())
            if not bool((diff <= bound).all()):
                errors.append(f"slice {s}: on rows differ by up to {float(diff.max()):.3g}")
        off += n
    if counters[0].tolist() != counters_ref[0].tolist():
        errors.append(f"routed {counters[0].tolist()} vs {counters_ref[0].tolist()}")
    if int((counters[1].cpu() - counters_ref[1]).abs().sum()) > int(near.sum()):
        errors.append(f"kept {counters[1].tolist()} vs {counters_ref[1].tolist()}")
    return errors, int(near.sum())


def pytorch_path(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, counters [2, L]) of the PyTorch path (`gated_lora`) on problem p."""
    ref = p["base"].clone()
    counters = torch.zeros(2, p["L"], dtype=torch.int64, device=ref.device)
    gated_lora(ref, p["x"], packed_reference(p), p["slots"], counters)
    return ref, counters.cpu()


def check_serving(p: dict, name: str) -> dict:
    """gated_lora_triton vs gated_lora: on pairs match, off pairs keep the base, nothing written outside."""
    tg, _ = kernels()
    set_median_taus(p, *reference_norms(p))
    ref, counters_ref = pytorch_path(p)
    T, N = p["base"].shape
    buf = torch.full((T + 2, N + 5), float("nan"), device=ref.device).to(p["dtype"])
    out = buf[1:T + 1, 2:N + 2]
    out.copy_(p["base"])
    counters = torch.zeros(2, p["L"], dtype=torch.int64, device=ref.device)
    weights = tg.LoRAWeights.from_buffers(p["A"], p["B"], p["slices"])
    tg.gated_lora_triton(out, p["x"], weights, p["G"], p["taus"], lora_segments(p["slots"], p["L"]), counters,
                         p.get("scale"), p.get("bias"))
    errors, near = serving_errors(p, out, ref, counters, counters_ref)
    inner = torch.zeros_like(buf, dtype=torch.bool)
    inner[1:T + 1, 2:N + 2] = True
    if not bool(buf[~inner].isnan().all()):
        errors.append("wrote outside the output")
    return {"name": name, "passed": not errors, "errors": errors, "near_threshold": near}


def check_serving_path(T: int, K: int, slices: list[int], rank: int, dtype, device: str, name: str) -> dict:
    """The plugin's serving path without vLLM (`SlotBatch` + `GatedSlots`, as the gated layers use
    them), captured once in a CUDA graph over T rows and replayed for a sequence of batches: adapters
    (slot 0 ungated), base-only, padded (fewer mapped tokens than rows), adapters again. Each replay
    against the PyTorch path; base-only and padding rows must keep the base bit for bit. Slot 3's
    adapter is pruned on every other slice (on the only one of a single-slice layer): its weights stay
    in the buffers, and its tokens must keep the base there and not be counted."""
    from tspeft_rt.serve.state import GatedSlots, SlotBatch
    from tspeft_rt.serve.telemetry import GateTelemetry

    L = 4
    p = serving_problem(T, K, slices, rank, L, dtype, device, seed=T + rank)
    set_median_taus(p, *reference_norms(p))
    p["covered"] = [[True] * len(slices)] * (L - 1) + [[s % 2 == 1 for s in range(len(slices))]]
    gated = GatedSlots(p["A"], p["B"], slices, use_triton=True)
    for slot in range(L):
        gated.set_slot(slot, p["covered"][slot])
        gated.set_gate(slot, [None] * len(slices) if slot == 0 else p["taus"][:, slot].tolist())
    p["taus"][:, 0] = 0.0
    p["taus"][~torch.tensor(p["covered"], device=device).T] = UNCOVERED
    batch, telemetry = SlotBatch(T, L, device), GateTelemetry()
    telemetry.ensure_slots(L, device)
    x, out = torch.zeros_like(p["x"]), torch.zeros_like(p["base"])
    step = lambda: gated.apply(x, out, batch, telemetry.counters)
    batch.update(p["slots"])
    x.copy_(p["x"])
    out.copy_(p["base"])
    step()  # eager warm-up (compiles the kernels), then capture
    replay = step
    if device == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        replay = graph.replay
    g = torch.Generator(device=device).manual_seed(T)
    sequence = [("adapters", p["slots"]), ("base-only", torch.full_like(p["slots"], -1)),
                ("padded", p["slots"][: max(1, T // 2)]), ("adapters again", torch.randint(-1, L, (T,), generator=g,
                                                                                          device=device))]
    errors = []
    for what, slots in sequence:
        n = slots.numel()
        batch.update(slots)
        x.copy_(p["x"])
        out.copy_(p["base"])
        telemetry.counters.zero_()
        replay()
        q = dict(p, slots=slots, x=p["x"][:n], base=p["base"][:n], T=n)
        ref, counters_ref = pytorch_path(q)
        errs, _ = serving_errors(q, out[:n], ref, telemetry.counters, counters_ref)
        if not torch.equal(out[n:], p["base"][n:]):
            errs.append("padding rows written")
        errors += [f"{what}: {e}" for e in errs]
    return {"name": name, "passed": not errors, "errors": errors}


def check_train(N: int, K: int, OUT: int, rank: int, adapter_dtype, device: str, name: str) -> dict:
    """TritonGatedLoraFn vs _GatedLoraFn at a median tau: relative errors of outputs and gradients."""
    g = torch.Generator(device=device).manual_seed(N + rank)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device)
    x = rand(N, K).to(adapter_dtype)
    base = (rand(N, OUT) * rand(N, 1).exp()).to(torch.bfloat16)
    A, B = (rand(rank, K) / K**0.5).to(adapter_dtype), (rand(OUT, rank) / rank**0.5).to(adapter_dtype)
    scale, weights = 2.0, rand(N, OUT)
    with torch.no_grad():  # tau^2 in the widest gap between ratios of the middle 20%: no token at the threshold
        q = (row_sq_norm((x @ A.t()) @ B.t() * scale) / row_sq_norm(base)).double().sort().values
        lo, hi = int(0.4 * N), int(0.6 * N) + 1
        k = lo + int((q[lo + 1:hi] / q[lo:hi - 1]).argmax())
        tau = (q[k] * q[k + 1]).sqrt().sqrt().reshape(1).float()
    results = []
    from tspeft_rt.layers import _GatedLoraFn

    for fn in (_GatedLoraFn, kernels()[1].TritonGatedLoraFn):
        leaves = [t.clone().requires_grad_(True) for t in (x, base, A, B, tau)]
        out, delta_sq = fn.apply(*leaves[:5], row_sq_norm(base), scale, 1.0)
        (out.float() * weights).sum().backward()
        results.append([out.detach(), delta_sq] + [t.grad for t in leaves])
    names = ["out", "delta_sq", "grad_x", "grad_base", "grad_A", "grad_B", "grad_tau"]
    rel = {n: float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
           for n, a, b in zip(names, results[1], results[0])}
    bound = 2e-2 if adapter_dtype == torch.bfloat16 else 1e-2
    errors = [f"{n}: relative error {e:.3g}" for n, e in rel.items() if not e <= bound]
    keep, keep_ref = (gate_keep(r[1], row_sq_norm(base), tau) for r in (results[1], results[0]))
    if not torch.equal(keep, keep_ref):
        errors.append(f"the gate differs on {int((keep != keep_ref).sum())} tokens")
    return {"name": name, "passed": not errors, "errors": errors, "rel_errors": rel}


# --------------------------------------------------------------------------- timings


def time_serving(timer: Timer, T: int, rank: int, slices: list[int], K: int, device: str) -> dict:
    """The whole gated LoRA op (shrink + fused gate and expand) at skip 0/30/50/70/90% (tau at each
    slot and slice's quantile of the ratios; at 0% below every ratio, so the gate runs and keeps all)
    and with the module pruned from every slot, against the dense op (tau = 0: no gate, every row
    expanded) and a cuBLAS matmul LoRA. Each timed call first restores the output (the gate must see
    the same base every time); that copy is timed alone and subtracted."""
    tg, _ = kernels()
    p = serving_problem(T, K, slices, rank, 4, torch.float16, device, seed=T + rank, no_adapter=False)
    weights = tg.LoRAWeights.from_buffers(p["A"], p["B"], slices)
    seg = lora_segments(p["slots"], p["L"])
    d2, b2 = reference_norms(p)
    ratios = d2 / b2.clamp_min(1e-12)
    out, counters = p["base"].clone(), torch.zeros(2, p["L"], dtype=torch.int64, device=device)
    op = lambda taus: (out.copy_(p["base"]), tg.gated_lora_triton(out, p["x"], weights, p["G"], taus, seg))
    reset_ms = timer(lambda: out.copy_(p["base"]))
    row = {"T": T, "rank": rank, "slices": slices, "hidden": K, "reset_ms": reset_ms}
    row["dense_ms"] = timer(lambda: op(torch.zeros_like(p["taus"]))) - reset_ms
    for skip in (0.0, 0.3, 0.5, 0.7, 0.9):
        taus = torch.zeros_like(p["taus"])
        for slot in range(p["L"]):
            r = ratios[:, p["slots"] == slot]
            if r.numel():
                taus[:, slot] = (r.min(dim=1).values / 4 if skip == 0 else r.quantile(skip, dim=1)).sqrt()
        counters.zero_()
        out.copy_(p["base"])
        tg.gated_lora_triton(out, p["x"], weights, p["G"], taus, seg, counters)
        k = int(100 * skip)
        row[f"measured_skip{k}"] = 1 - float(counters[1].sum()) / float(counters[0].sum())
        row[f"op_ms_skip{k}"] = timer(lambda taus=taus: op(taus)) - reset_ms
        row[f"op_over_dense_skip{k}"] = row[f"op_ms_skip{k}"] / row["dense_ms"]
    pruned = torch.full_like(p["taus"], UNCOVERED)  # no slot has the module: no LoRA work at all
    row["op_ms_pruned"] = timer(lambda: op(pruned)) - reset_ms
    row["op_over_dense_pruned"] = row["op_ms_pruned"] / row["dense_ms"]
    at = [p["A"][s][0, 0].T for s in range(len(slices))]
    bt = [b[0, 0].T for b in p["B"]]
    offs = [sum(slices[:s]) for s in range(len(slices))]

    def torch_lora():  # one adapter for every token: cuBLAS shrink and expand + add per slice
        out.copy_(p["base"])
        for s, n in enumerate(slices):
            out[:, offs[s]:offs[s] + n].addmm_(p["x"] @ at[s], bt[s])

    row["cublas_lora_ms"] = timer(torch_lora) - reset_ms
    moved = (p["x"].numel() + 2 * p["base"].numel()) * 2  # x in, output in and out (fp16)
    row["dense_GBps"] = moved / row["dense_ms"] / 1e6
    packed = packed_reference(dict(p, taus=taus))
    row["pytorch_path_ms"] = timer(lambda: gated_lora(out, p["x"], packed, p["slots"]), graph=False)
    return row


def loaded_kernel_stats() -> list[dict]:
    """Registers, spills and shared memory of every variant of the serving kernels loaded so far
    (what the driver reports for the loaded binaries; empty in a dry run)."""
    tg, _ = kernels()
    rows = []
    for kernel in (tg._shrink_kernel, tg._gated_expand_kernel):
        for device_cache in getattr(kernel, "device_caches", {}).values():
            for compiled in device_cache[0].values():
                compiled._init_handles()
                meta = compiled.metadata
                rows.append({"kernel": kernel.__name__, "num_warps": meta.num_warps, "registers": compiled.n_regs,
                             "spills": compiled.n_spills, "shared_bytes": meta.shared,
                             "constants": constants(kernel, compiled)})
    return rows


def constants(kernel, compiled) -> dict:
    """A compiled variant's constexpr values by argument name (Triton 3.6+ keys them by (index,))."""
    items = compiled.src.constants.items() if hasattr(compiled, "src") else []
    name = lambda k: kernel.arg_names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k)
    return {name(k): v for k, v in items if isinstance(v, (int, bool, str))}


def copy_bandwidth(timer: Timer, nbytes: int, device: str) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6  # read + write, GB/s


def time_training(timer: Timer, cfg: dict, batch: int, seq: int, rank: int, device: str) -> dict:
    """fwd + bwd of a random-weight Llama: PEFT LoRA vs TS-LoRA (Triton / PyTorch fn) at 50% skip."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    from tspeft_rt.inject import AdapterSpec, adapted_layers, inject_adapters
    from tspeft_rt.layers import GateContext, _GatedLoraFn

    _, triton_train = kernels()
    torch.manual_seed(0)
    with torch.device(device):
        base = LlamaModel(LlamaConfig(**cfg)).to(torch.bfloat16)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device)

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=MODULES,
                                                                lora_dropout=0.0))
    ts_model = copy.deepcopy(base)
    context = GateContext(collect=True, collect_ratios=True)
    inject_adapters(ts_model, AdapterSpec(method="ts-lora", target_modules=MODULES, rank=rank, alpha=2 * rank), context)
    for model in (peft_model, ts_model):
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    with torch.no_grad():  # tau at each module's median ratio: 50% of its token updates skipped
        ts_model(input_ids=ids)
        for layer in adapted_layers(ts_model).values():
            ratios = torch.cat(layer.token_gate.reset_stats().log_ratios)
            layer.token_gate.tau.fill_(float(ratios.float().quantile(0.5).exp()))
        context.collect_ratios = False
        ts_model(input_ids=ids)
        stats = [layer.token_gate.reset_stats() for layer in adapted_layers(ts_model).values()]
    context.collect = False  # the per-module statistics sync the host: not part of the kernels' cost
    skip = 1 - sum(s.kept for s in stats) / sum(s.valid for s in stats)

    def step(model):
        def run():
            model(input_ids=ids).last_hidden_state.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        return run

    triton_fn, default_gather = triton_train.TritonGatedLoraFn, triton_train.GATHER_BELOW_KEEP
    row = {"peft_lora": timer(step(peft_model), graph=False)}
    with lora_fn(_GatedLoraFn):
        row["ts_lora_pytorch"] = timer(step(ts_model), graph=False)
    with lora_fn(triton_fn):
        for name, gather_below in [("ts_lora_triton", default_gather), ("ts_lora_triton_gather", 2.0),
                                   ("ts_lora_triton_mask", 0.0)]:
            triton_train.GATHER_BELOW_KEEP = gather_below  # 2: always compact the kept rows, 0: always mask
            try:
                row[name] = timer(step(ts_model), graph=False)
            finally:
                triton_train.GATHER_BELOW_KEEP = default_gather
    row.update(skip=skip, tokens=batch * seq, rank=rank, config=cfg)
    row["ts_triton_over_peft"] = row["ts_lora_triton"] / row["peft_lora"]
    return row


# --------------------------------------------------------------------------- main


def guarded(name: str, run: Callable[[], dict]) -> dict:
    """One case or measurement: an exception fails it alone (recorded with its traceback), so one broken
    case cannot lose the rest of a short device lease. Prints a progress line."""
    t0 = time.perf_counter()
    try:
        row = run()
    except Exception as e:  # noqa: BLE001 - any failure is this case's result
        row = {"name": name, "passed": False, "errors": [f"{type(e).__name__}: {e}"[:400]],
               "traceback": traceback.format_exc()[-4000:]}
    ok = row.get("passed", "errors" not in row)
    print(f"  {'ok  ' if ok else 'FAIL'} {name} ({time.perf_counter() - t0:.1f} s)"
          + ("" if ok else f": {'; '.join(row['errors'])}\n{row.get('traceback', '')[-1500:]}"), flush=True)
    return row


def correctness(device: str, tiny: bool) -> list[dict]:
    if tiny:
        grid = [(3, 64, [24, 8, 16], 16, torch.float16), (20, 64, [40], 8, torch.bfloat16)]
        dora_grid = [(20, 64, [24, 8, 16], 8, torch.bfloat16)]
        train_grid = [(24, 48, 40, 8)]
    else:
        shapes = [[4096, 1024, 1024], [4096], [14336, 14336]]  # qkv, o (or down), gate_up
        combos = [(T, r, d) for T in (1, 7, 64, 1000, 8192) for r in (16, 64) for d in (torch.float16, torch.bfloat16)]
        grid = [(T, 4096, shapes[i % 3], rank, dtype) for i, (T, rank, dtype) in enumerate(combos)]
        grid += [(T, 8192, [8192], 64, torch.bfloat16) for T in (16, 2048)]
        dora_grid = [(7, 4096, shapes[0], 16, torch.bfloat16), (8192, 4096, shapes[2], 64, torch.bfloat16),
                     (1000, 4096, shapes[1], 16, torch.float16)]
        train_grid = [(4096, 4096, 4096, 16), (8192, 4096, 1024, 64)]
    checks = []
    for i, (T, K, slices, rank, dtype) in enumerate(grid):
        name = f"serve T={T} K={K} slices={slices} r={rank} {str(dtype)[6:]}"
        checks.append((name, lambda a=(T, K, slices, rank, 4, dtype, device), i=i, name=name: check_serving(
            serving_problem(*a, seed=i), name)))
    for i, (T, K, slices, rank, dtype) in enumerate(dora_grid):
        name = f"serve DoRA T={T} K={K} slices={slices} r={rank} {str(dtype)[6:]}"
        checks.append((name, lambda a=(T, K, slices, rank, 4, dtype, device), i=i, name=name: check_serving(
            serving_problem(*a, seed=100 + i, dora=True), name)))
    path_grid = [(24, 64, [24, 8, 16], 16, torch.float16)] if tiny else [
        (T, K, slices, rank, dtype) for T in (8, 512) for K, slices in ((4096, [4096, 1024, 1024]), (8192, [8192]))
        for rank, dtype in ((16, torch.bfloat16), (64, torch.float16))]
    for a in path_grid:
        name = f"serving path (graph replays) T={a[0]} K={a[1]} slices={a[2]} r={a[3]} {str(a[4])[6:]}"
        checks.append((name, lambda a=a, name=name: check_serving_path(*a, device, name)))
    for N, K, OUT, rank in train_grid:
        for dtype in (torch.float32, torch.bfloat16):
            name = f"train N={N} K={K} out={OUT} r={rank} adapter {str(dtype)[6:]}"
            checks.append((name, lambda a=(N, K, OUT, rank, dtype), name=name: check_train(*a, device, name)))
    return [guarded(name, run) for name, run in checks]


def timings(timer: Timer, device: str, tiny: bool) -> dict:
    if tiny:
        serving = [(8, 8, [24, 8, 16], 32)]
        cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}
        batch, seq, rank = 2, 8, 8
    else:
        serving = [(T, rank, [4096, 1024, 1024], 4096) for T in (16, 256, 8192) for rank in (16, 64)]
        serving += [(8192, rank, [8192], 8192) for rank in (16, 64)]
        cfg = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 2, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 1024, "max_position_embeddings": 4096}
        batch, seq, rank = 4, 2048, 16
    copy_gbps = copy_bandwidth(timer, 1 << (16 if tiny else 30), device)
    rows = [guarded(f"timing T={T} K={K} r={r}", lambda a=(T, r, slices, K): time_serving(timer, *a, device))
            for T, r, slices, K in serving]
    for row in rows:
        if "dense_GBps" in row:
            row["dense_bw_over_copy"] = row["dense_GBps"] / copy_gbps
    train = guarded("timing train step", lambda: time_training(timer, cfg, batch=batch, seq=seq, rank=rank,
                                                               device=device))
    kernel_stats = [] if tiny else guarded("kernel stats", lambda: {"rows": loaded_kernel_stats()}).get("rows", [])
    return {"serving": rows, "copy_GBps": copy_gbps, "train": train, "kernels": kernel_stats,
            "cuda_graph_capture_errors": timer.capture_errors}


def report(result: dict, out: str) -> None:
    """The short table, last."""
    print(f"\ngpu_check: {result['device']}, torch {result['torch']}, triton {result['triton']}"
          f"{' (dry run: tiny shapes, timings meaningless)' if result['dry_run'] else ''}")
    cases = result["correctness"]["cases"]
    for c in cases:
        if not c["passed"]:
            print(f"FAIL {c['name']}: {'; '.join(c['errors'])}")
    print(f"correctness: {sum(c['passed'] for c in cases)}/{len(cases)} cases passed")
    t = result["timings"]
    if t["cuda_graph_capture_errors"]:
        errors = t["cuda_graph_capture_errors"]
        print(f"CUDA graph capture failed {len(errors)}x (timed eagerly instead): {errors[0]}")
    print(f"{'T':>5} {'K':>5} {'r':>3} | dense ms | whole op / dense at skip 0/30/50/70/90% (measured skip 50%) "
          f"| pruned / dense | cuBLAS LoRA ms | dense bw / copy")
    for r in t["serving"]:
        if "errors" in r:
            print(f"{r['name']}: {r['errors'][0]}")
            continue
        ratios = " ".join(f"{r[f'op_over_dense_skip{k}']:.2f}" for k in (0, 30, 50, 70, 90))
        print(f"{r['T']:>5} {r['hidden']:>5} {r['rank']:>3} | {r['dense_ms']:8.4f} | {ratios} "
              f"({100 * r['measured_skip50']:.0f}%) | {r['op_over_dense_pruned']:14.2f} | {r['cublas_lora_ms']:14.4f} "
              f"| {r['dense_bw_over_copy']:.2f}")
    print(f"device-to-device copy {t['copy_GBps']:.0f} GB/s")
    if t["kernels"]:
        spilling = [k for k in t["kernels"] if k["spills"]]
        print(f"loaded kernel variants: {len(t['kernels'])}, max registers "
              f"{max(k['registers'] for k in t['kernels'])}, spilling {len(spilling)}"
              + "".join(f"\n  spills: {k['kernel']} {k['spills']} ({k['constants']})" for k in spilling[:6]))
    train = t["train"]
    names = ("peft_lora", "ts_lora_triton", "ts_lora_triton_gather", "ts_lora_triton_mask", "ts_lora_pytorch")
    if "errors" in train:
        print(f"train step: {train['errors'][0]}")
    else:
        print(f"train step ms at skip {train['skip']:.2f}: " + ", ".join(f"{k} {train[k]:.2f}" for k in names)
              + f"; ts_lora_triton / peft_lora {train['ts_triton_over_peft']:.2f}")
    print("goals: " + ", ".join(f"{k} {({True: 'met', False: 'NOT met', None: 'not measured'})[v]}"
                                for k, v in result["goals"].items()))
    print(f"full numbers: {out} ({result['seconds']:.0f} s)")


def goals(t: dict) -> dict[str, bool | None]:
    """The goals at the largest T (None where a measurement failed)."""
    rows = [r for r in t["serving"] if "errors" not in r]
    big = [r for r in rows if r["T"] == max(x["T"] for x in rows)] if rows else []
    whole_op = lambda key, bound: all(r[key] <= bound for r in big) if big else None
    return {
        "whole_op_at_50pct_skip_le_0.85x_dense": whole_op("op_over_dense_skip50", 0.85),
        "whole_op_at_0pct_skip_le_1.05x_dense": whole_op("op_over_dense_skip0", 1.05),
        "whole_op_at_90pct_skip_le_0.75x_dense": whole_op("op_over_dense_skip90", 0.75),
        "ts_lora_step_le_peft_lora_step": t["train"]["ts_triton_over_peft"] <= 1.0 if "errors" not in t["train"]
        else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run_cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import triton

    device, tiny = ("cpu", True) if args.dry_run_cpu else ("cuda", False)
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (--dry-run-cpu exercises the script on CPU)", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    result: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
                    "torch": torch.__version__, "triton": triton.__version__, "dry_run": tiny}
    print("correctness:", flush=True)
    cases = correctness(device, tiny)
    result["correctness"] = {"passed": all(c["passed"] for c in cases), "cases": cases}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))  # kept if the timings die
    print("timings:", flush=True)
    result["timings"] = t = timings(Timer(device, reps=1 if tiny else args.reps, warmup=1 if tiny else 3), device, tiny)
    result["goals"] = goals(t)
    result["seconds"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    report(result, args.out)
    return 0 if result["correctness"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
