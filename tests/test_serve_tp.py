"""The gated vLLM LoRA layers under tensor parallelism 2: two processes on vLLM's own distributed setup
(gloo, its CPU communicator), real vLLM layers loaded through their weight loaders from full weights,
adapters set through vLLM's `set_lora` (which shards them). Each rank's output is checked against the
one-device reference (base + per-token gated delta from `tspeft_rt.gate`, on the full layer), the gate
decisions counted as flips against it (tolerance: none; fp32), and against the other rank's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from tspeft_rt.gate import gate_keep, row_sq_norm  # noqa: E402

IN, SLOTS, TP = 64, [1, None, 2], 2  # slot -> adapter id, as in test_serve_layers
RANKS = {1: 8, 2: 4}
IDS = [1, 1, 2, 0, 2, 1, 0, 1, 2, 2, 1, 0, 1, 2, 1, 1, 2, 0, 1, 2, 2, 1, 1, 2] * 2  # 0: no adapter
# kind -> full output slices, and per rank the columns of the full output it holds
KINDS = {
    "column": [48],
    "merged_column": [40, 40],
    "merged_qkv": [64, 32, 32],  # 4 query heads, 2 KV heads of 16: one KV head per rank
    "merged_qkv_replicated": [64, 16, 16],  # 1 KV head: both ranks hold it (num_kv_head_replicas 2)
    "row": [64],  # input 48 split over the ranks, output whole
}


def local_columns(kind: str, rank: int) -> list[int]:
    """The columns of the full output that `rank` holds, in its output's order."""
    slices = KINDS[kind]
    if kind == "row":
        return list(range(slices[0]))
    cols, offset = [], 0
    for s, n in enumerate(slices):
        shard = n if kind == "merged_qkv_replicated" and s > 0 else n // TP
        start = 0 if shard == n else rank * shard
        cols += range(offset + start, offset + start + shard)
        offset += n
    return cols


def local_input(kind: str, x: torch.Tensor, rank: int) -> torch.Tensor:
    """What a rank's layer is given: the whole input, or (row-parallel, input_is_parallel as in vLLM's
    models) this rank's share of the input features."""
    if kind != "row":
        return x
    share = x.shape[1] // TP
    return x[:, rank * share:(rank + 1) * share].contiguous()


def problem(kind: str, seed: int = 0) -> dict:
    """Full weights, adapters, inputs and thresholds (between neighbouring ratios: no token on a boundary)."""
    g = torch.Generator().manual_seed(seed)
    in_features = 48 if kind == "row" else IN
    slices = KINDS[kind]
    p = {"W": torch.randn(sum(slices), in_features, generator=g) * 0.5,
         "b": torch.randn(sum(slices), generator=g) * 0.5 if kind != "merged_column" else None,
         "x": torch.randn(len(IDS), in_features, generator=g),
         "lora": {i: [(torch.randn(r, in_features, generator=g) * 0.3, torch.randn(n, r, generator=g) * 0.3)
                      for n in slices] for i, r in RANKS.items()}}
    base = p["x"] @ p["W"].T + (0 if p["b"] is None else p["b"])
    offsets = [sum(slices[:s]) for s in range(len(slices) + 1)]
    p["taus"] = {}
    for i in RANKS:
        rows = [t for t, a in enumerate(IDS) if a == i]
        taus = []
        for s, (a, b) in enumerate(p["lora"][i]):
            ratios = (row_sq_norm(p["x"][rows] @ a.T @ b.T) / row_sq_norm(base[rows, offsets[s]:offsets[s + 1]])).sqrt()
            r = ratios.sort().values
            k = len(r) // 2 + s  # a different split per slice
            taus.append(float((r[k - 1] + r[k]) / 2))
        p["taus"][i] = taus
    p["base"], p["offsets"] = base, offsets
    return p


def reference(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, decisions [T, S]) of the full layer on one device."""
    out, on = p["base"].clone(), torch.zeros(len(IDS), len(p["offsets"]) - 1, dtype=torch.bool)
    for t, i in enumerate(IDS):
        if i == 0:
            continue
        for s, (a, b) in enumerate(p["lora"][i]):
            lo, hi = p["offsets"][s], p["offsets"][s + 1]
            delta = p["x"][t:t + 1] @ a.T @ b.T
            if gate_keep(row_sq_norm(delta), row_sq_norm(p["base"][t:t + 1, lo:hi]), p["taus"][i][s]).item():
                out[t, lo:hi] += delta[0]
                on[t, s] = True
    return out, on


def build_layer(kind: str, p: dict):
    """The vLLM base layer at this process's rank, loaded from the full weights, wrapped by the gated class."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import (ColumnParallelLinearWithLoRA, MergedColumnParallelLinearWithLoRA,
                                  MergedQKVParallelLinearWithLoRA, RowParallelLinearWithLoRA)
    from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                                   QKVParallelLinear, RowParallelLinear)

    from tspeft_rt.serve.layers import GATED_CLASSES

    bias = p["b"] is not None
    if kind == "column":
        base, stock, shards = ColumnParallelLinear(IN, 48, bias=bias, params_dtype=torch.float32), \
            ColumnParallelLinearWithLoRA, [()]
    elif kind == "merged_column":
        base, stock, shards = MergedColumnParallelLinear(IN, [40, 40], bias=bias, params_dtype=torch.float32), \
            MergedColumnParallelLinearWithLoRA, [(0,), (1,)]
    elif kind.startswith("merged_qkv"):
        kv = 2 if kind == "merged_qkv" else 1
        base, stock, shards = QKVParallelLinear(IN, 16, 4, kv, bias=bias, params_dtype=torch.float32), \
            MergedQKVParallelLinearWithLoRA, [("q",), ("k",), ("v",)]
    else:
        base, stock, shards = RowParallelLinear(48, IN, bias=bias, params_dtype=torch.float32), \
            RowParallelLinearWithLoRA, [()]
    offsets = p["offsets"] if len(shards) > 1 else [0, sum(KINDS[kind])]
    for name in ("weight", "bias"):
        full = p["W"] if name == "weight" else p["b"]
        if full is None:
            continue
        param = getattr(base, name)
        for shard, lo, hi in zip(shards, offsets, offsets[1:]):
            param.weight_loader(param, full[lo:hi], *shard)
    base.quant_method.process_weights_after_loading(base)
    config = LoRAConfig(max_loras=len(SLOTS), max_lora_rank=8, lora_dtype=torch.float32)
    layer = GATED_CLASSES[stock](base)
    layer.create_lora_weights(len(SLOTS), config)
    return layer, config


def run_rank(rank: int, init_file: str, results: str) -> None:
    """One tensor-parallel rank: every kind's layer, forward on the mixed batch; saves its outputs and
    telemetry counts, then what building a gated layer as a pipeline stage says."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import destroy_model_parallel, init_distributed_environment, initialize_model_parallel
    from vllm.lora.layers import LoRAMapping

    from tspeft_rt.serve.punica import get_gated_punica_wrapper
    from tspeft_rt.serve.telemetry import TELEMETRY

    torch.set_num_threads(1)
    # Ranks that name different SHM groups make vLLM's CPU communicator fall back to torch.distributed
    # (gloo): the layer math is under test here, vLLM's shared-memory transport in the e2e test.
    os.environ["VLLM_DIST_IDENT"] = f"{Path(init_file).parent.name}-{rank}"
    out = {}
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(TP, rank, f"file://{init_file}", rank, backend="gloo")
        initialize_model_parallel(TP, 1)
        for kind in KINDS:
            p = problem(kind)
            layer, config = build_layer(kind, p)
            punica = get_gated_punica_wrapper(256, max_batches=256, device="cpu", lora_config=config)
            layer.set_mapping(punica)
            for slot, i in enumerate(SLOTS):
                if i is None:
                    layer.reset_lora(slot)
                    continue
                a, b = [pair[0] for pair in p["lora"][i]], [pair[1] for pair in p["lora"][i]]
                layer.set_lora(slot, a if len(a) > 1 else a[0], b if len(b) > 1 else b[0])
                layer.set_gate(slot, p["taus"][i])
            punica.update_metadata(LoRAMapping(tuple(IDS), tuple(IDS), is_prefill=True), SLOTS, len(SLOTS), 1000)
            before = TELEMETRY.counters.clone()
            y = layer(local_input(kind, p["x"], rank))
            out[kind] = {"y": y[0] if isinstance(y, tuple) else y, "counted": TELEMETRY.counters - before}
        destroy_model_parallel()
        initialize_model_parallel(1, TP)  # the same two processes as pipeline stages
        try:
            build_layer("column", problem("column"))
        except ValueError as e:
            out["pipeline"] = str(e)
    torch.save(out, f"{results}.{rank}")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("tp")
    mp.start_processes(run_rank, args=(str(d / "init"), str(d / "out")), nprocs=TP, start_method="spawn")
    return [torch.load(d / f"out.{r}") for r in range(TP)]


@pytest.mark.parametrize("kind", list(KINDS))
def test_tp2_equals_one_device_with_no_gate_flip(ranks, kind):
    p = problem(kind)
    expected, on = reference(p)
    assert 0 < on.sum() < on.numel() - on.shape[1] * IDS.count(0), "the gate kept all or none: tests nothing"
    decisions = []
    for rank, got in enumerate(ranks):
        cols = local_columns(kind, rank)
        y = got[kind]["y"]
        torch.testing.assert_close(y, expected[:, cols], rtol=1e-5, atol=1e-5)
        changed = (y - p["base"][:, cols]).abs() > 1e-3  # a kept delta, not the rounding of a summed base
        slice_of = torch.bucketize(torch.tensor(cols), torch.tensor(p["offsets"][1:]), right=True)
        mine = torch.stack([changed[:, slice_of == s].any(1) for s in range(len(KINDS[kind]))], 1)
        flips = int((mine != on).sum())
        assert flips == 0, f"rank {rank}: {flips} gate decisions differ from one device's"
        decisions.append(mine)
    assert torch.equal(decisions[0], decisions[1]), "the ranks took different decisions"


@pytest.mark.parametrize("kind", list(KINDS))
def test_tp2_counts_each_decision_once(ranks, kind):
    """Rank 0 counts what one device counts; rank 1 counts nothing."""
    _, on = reference(problem(kind))
    routed = [sum(a == i for a in IDS) * len(KINDS[kind]) for i in SLOTS if i is not None]
    kept = [int(on[[t for t, a in enumerate(IDS) if a == i]].sum()) for i in SLOTS if i is not None]
    counted = ranks[0][kind]["counted"]
    assert counted[0, [0, 2]].tolist() == routed and counted[1, [0, 2]].tolist() == kept
    assert not ranks[1][kind]["counted"].any()


def test_pipeline_parallelism_is_refused(ranks):
    for got in ranks:
        assert "do not support pipeline parallelism (--pipeline-parallel-size 2)" in got.get("pipeline", "")
