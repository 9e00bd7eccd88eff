"""The CPU op `tspeft::gated_lora_cpu` against the PyTorch path it replaces (`gated_lora`).

Every case: mixed slots with tokens without an adapter, an ungated slot, a slot that lacks a slice,
thresholds in gaps of the tokens' ratios (no token at the threshold), fp32/bf16/fp16, batches below and
above the op's loop/matmul switch, x and output as strided views. Decisions and counters must be equal;
outputs within the dtype's rounding.
"""

from __future__ import annotations

import pytest
import torch

from tspeft_rt.kernels.gated_lora import PackedLoRA, gate_decisions, gated_lora
from tspeft_rt.kernels.gated_lora_cpu import LOOP_TOKENS, cpu_op_loaded, gated_lora_cpu

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module", autouse=True)
def op():
    assert cpu_op_loaded(), "the CPU op did not build"


def gap_tau(ratios: torch.Tensor, q: float) -> float:
    """tau with tau^2 midway (geometrically) in the widest gap around the q-quantile of squared ratios."""
    r = ratios.double().sort().values
    lo, hi = max(int(q * len(r)) - 3, 0), min(int(q * len(r)) + 3, len(r) - 1)
    gaps = r[lo + 1:hi + 1] / r[lo:hi].clamp_min(1e-30)
    k = lo + int(gaps.argmax())
    return float((r[k] * r[k + 1]).sqrt().sqrt())


def make_case(tokens: int, slices: list[int], dtype: torch.dtype, seed: int, max_loras: int = 3, rank: int = 8,
              in_features: int = 96):
    """(packed, x view, base view, slots [tokens + 5] with -1 padding) with each slot's taus in gaps."""
    g = torch.Generator().manual_seed(seed)
    packed = PackedLoRA(max_loras, rank, in_features, slices, dtype, "cpu")
    for slot in range(max_loras):
        covered = [not (slot == 1 and s == len(slices) - 1) for s in range(len(slices))]  # slot 1 lacks the last
        a = [(torch.randn(rank, in_features, generator=g) / in_features**0.5).to(dtype) for _ in slices]
        packed.set_slot(slot, a, [(torch.randn(n, rank, generator=g) / rank**0.5).to(dtype) for n in slices], covered)
    x = torch.randn(tokens, in_features + 7, generator=g).to(dtype)[:, 3:in_features + 3]
    base = (torch.randn(tokens, sum(slices) + 5, generator=g) * torch.randn(tokens, 1, generator=g).exp()).to(dtype)
    base = base[:, 2:sum(slices) + 2]
    slots = torch.full((tokens + 5,), -1, dtype=torch.int32)
    slots[:tokens] = torch.randint(-1, max_loras, (tokens,), generator=g, dtype=torch.int32)
    ratios = ratio_sq(packed, x, base, slots)
    for slot in range(1, max_loras):  # slot 0 stays ungated: plain LoRA
        mine = slots[:tokens] == slot
        packed.set_gate(slot, [gap_tau(ratios[mine, s], 0.5) if mine.sum() > 1 else 0.5 for s in range(len(slices))])
    return packed, x, base, slots


def ratio_sq(packed, x, base, slots) -> torch.Tensor:
    """[T, S] ||delta||^2 / ||base||^2 as the PyTorch path computes them (at tau = 0)."""
    from tspeft_rt.kernels.gated_lora import slice_sq_norms

    h, _, _, mine = gate_decisions(base, x, packed, slots)
    hf = h.float().flatten(2)
    d2 = (torch.einsum("tli,lij->tlj", hf, packed.gram) * hf).view(*h.shape[:3], -1).sum(3)
    return (d2 * mine.unsqueeze(2)).sum(1) / slice_sq_norms(base, packed.offsets).clamp_min(1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [1, 16, LOOP_TOKENS, LOOP_TOKENS + 1, 300])
@pytest.mark.parametrize("slices", [[80], [64, 16, 16]], ids=["one-slice", "qkv"])
def test_op_equals_pytorch_path(dtype, tokens, slices):
    packed, x, base, slots = make_case(tokens, slices, dtype, seed=tokens * 7 + len(slices))
    want, got = base.clone(), base.clone()
    want_counts, got_counts = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64)
    gated_lora(want, x, packed, slots, want_counts)
    gated_lora_cpu(got, x, packed, slots, got_counts)
    assert torch.equal(got_counts, want_counts)
    assert torch.equal(got != base, want != base), "a gate decision differs"
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    if tokens >= 16:  # the case decides something: some updates kept, some skipped, some not routed
        assert 0 < want_counts[1].sum() < want_counts[0].sum() < tokens * len(slices)


def test_op_without_counters_and_with_no_adapter_tokens():
    packed, x, base, slots = make_case(16, [64, 16, 16], torch.float32, seed=3)
    out = base.clone()
    gated_lora_cpu(out, x, packed, torch.full_like(slots, -1))
    assert torch.equal(out, base)
    gated_lora_cpu(out, x, packed, slots)
    want = base.clone()
    gated_lora(want, x, packed, slots)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_op_rejects_mismatched_shapes():
    packed, x, base, slots = make_case(4, [80], torch.float32, seed=4)
    with pytest.raises(RuntimeError, match="shapes of the packed layer"):
        gated_lora_cpu(base[:, :40].clone(), x, packed, slots)


def test_op_compiles_whole_with_inductor():
    """Under torch.compile(fullgraph=True, Inductor), as vLLM compiles the model on CPU: one graph, the
    eager op's results, and the next batch's slots and thresholds reach the compiled code."""
    packed, x, base, slots = make_case(24, [64, 16, 16], torch.float32, seed=5)

    def layer(out: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
        gated_lora_cpu(out, x, packed, slots, counters)
        return out

    compiled = torch.compile(layer, fullgraph=True)
    for change in (None, "slots", "tau"):
        if change == "slots":
            slots[:24] = torch.roll(slots[:24], 5)
        elif change == "tau":
            packed.set_gate(2, [0.0, 0.0, 1e6])
        eager_counts, compiled_counts = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64)
        eager = layer(base.clone(), eager_counts)
        got = compiled(base.clone(), compiled_counts)
        assert torch.equal(got, eager) and torch.equal(compiled_counts, eager_counts), change


def test_without_a_compiler_layers_fall_back_to_the_pytorch_path(monkeypatch):
    """Where the op cannot be built, a gated layer warns once and serves with the PyTorch path."""
    from tspeft_rt.kernels import gated_lora_cpu as cpu_op
    from tspeft_rt.serve.state import GatedSlots

    def no_compiler() -> None:
        raise RuntimeError("Error building extension: c++: command not found")

    a, b = [torch.zeros(2, 1, 8, 32)], [torch.zeros(2, 1, 16, 8)]
    monkeypatch.setattr(cpu_op, "load_op", no_compiler)
    cpu_op.cpu_op_loaded.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not be built.*command not found.*PyTorch path"):
            assert not GatedSlots(a, b, [16]).use_cpu_op
    finally:
        cpu_op.cpu_op_loaded.cache_clear()
    monkeypatch.undo()
    assert GatedSlots(a, b, [16]).use_cpu_op
