"""Triton kernels (tspeft_rt.kernels.triton_gated_lora, .triton_train) against the PyTorch paths.

Without CUDA the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set here
before triton is first imported) on tiny shapes; with CUDA the GPU-only tests run them compiled at
larger shapes. Every case draws fresh inputs from its own seed. (The interpreter rounds fp32 to bf16
toward zero where GPUs round to nearest: bf16 outputs are compared within a few ulps; the gate sets
stay exact because tau sits in a wide gap between the tokens' ratios.)

- lora_segments: the stable sort by slot, per-slot counts and starts; slot -1 excluded.
- Serving, against `gated_lora` (the PyTorch path): S = 1, 2, 3 slices of unequal widths, ranks 8/16/64,
  fp32, fp16 and bf16, all on (tau = 0), all off (huge tau), mixed gates (tau in a wide gap between
  two tokens' ratios, so rounding cannot flip a token), slots without tokens, tokens without an
  adapter, decode-sized batches (split-K shrink, columns split over programs), strided inputs. The
  shrink's h and the fused gate's `on` must equal the reference exactly as sets; the output lives in
  a NaN-filled larger buffer that must stay NaN around it; off (token, slice) pairs must keep the
  base bit for bit, on pairs match the reference delta; the counters get the reference's routed and
  kept counts added.
- The comparison catches a wrong slot, a missed row and a flipped gate (mutants must fail it).
- Gate edge cases: zero deltas (on only at tau = 0), zero base rows (the EPS floor).
- The custom ops are opaque to Dynamo (fullgraph compile), with working fake implementations; their
  mutated arguments have no defaults (torch < 2.13 cannot call them otherwise).
- Training: TritonGatedLoraFn against _GatedLoraFn (out, delta_sq, grad of x, base, A, B, tau) for
  all-on, all-off and mixed gates, both backward strategies, fp32 and bf16 adapters, bf16 base.
- tools/gpu_check.py: --help, and --dry-run-cpu (its correctness and timing paths at tiny shapes).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, at their first import

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from tspeft_rt.gate import gate_keep, row_sq_norm  # noqa: E402
from tspeft_rt.kernels import triton_gated_lora as tg  # noqa: E402
from tspeft_rt.kernels import triton_train as tt  # noqa: E402
from tspeft_rt.kernels.gated_lora import PackedLoRA, gate_decisions, gated_lora, gram, lora_segments  # noqa: E402
from tspeft_rt.layers import _GatedLoraFn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 2e-3, "atol": 2e-3},
       torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2}}
MIN_GAP = 1.05  # mixed gates: tau^2 sits in a gap where the two ratios differ at least this much


@pytest.fixture(autouse=True)
def _interpreted():
    """On CPU, triton must have been imported after TRITON_INTERPRET was set (its own library functions
    are decorated at import): nothing may import triton, or the kernel modules, at import time before
    this module (e.g. tspeft_rt.layers must import the training kernels lazily, on CUDA)."""
    if not CUDA:
        import triton.language as tl

        for fn in (tl.zeros, tg._shrink_kernel):  # triton's own library, and ours
            assert type(fn).__name__ == "InterpretedFunction", "triton was imported before this module"


def seed(case: str) -> None:
    torch.manual_seed(zlib.crc32(case.encode()))


def offsets(slices: list[int]) -> list[int]:
    out = [0]
    for n in slices:
        out.append(out[-1] + n)
    return out


def gap_tau(q: torch.Tensor, lo: float = 0.0, hi: float = 1.0, min_gap: float = MIN_GAP) -> float:
    """tau with tau^2 in the widest gap between the sorted squared ratios q whose ranks lie in the
    [lo, hi] quantiles (so some tokens are on, some off, and none sits at the threshold)."""
    q = q.double().sort().values
    if q.numel() < 2:
        return float(q.sqrt().mean()) * 2 if q.numel() else 1.0
    first, last = int(lo * (q.numel() - 1)), max(int(hi * (q.numel() - 1)), int(lo * (q.numel() - 1)) + 1)
    gaps = q[first + 1:last + 1] / q[first:last].clamp_min(1e-30)
    k = first + int(gaps.argmax())
    assert float(gaps.max()) >= min_gap, f"no gap wide enough: {float(gaps.max()):.4f}"
    return float((q[k] * q[k + 1]).sqrt().sqrt())


# --------------------------------------------------------------------------- serving


class Case:
    """One serving problem: weights of L slots and S slices, tokens and their slots, base output."""

    def __init__(self, name: str, slices: list[int], rank: int, dtype: torch.dtype, mode: str, T: int = 24,
                 L: int = 3, K: int = 64, device: str = DEVICE) -> None:
        seed(name)
        self.slices, self.off, self.L, self.dtype, self.rank, self.mode = slices, offsets(slices), L, dtype, rank, mode
        S = len(slices)
        # x and the base are strided views (rows wider than the data), the weights plain buffers
        self.x = torch.randn(T, K + 8, device=device).to(dtype)[:, 3:K + 3]
        self.A = [(torch.randn(L, 1, rank, K, device=device) / K**0.5).to(dtype) for _ in slices]
        self.B = [(torch.randn(L, 1, n, rank, device=device) / rank**0.5).to(dtype) for n in slices]
        self.G = torch.stack([gram(b[:, 0]) for b in self.B])
        self.weights = tg.LoRAWeights.from_buffers(self.A, self.B, slices)
        # rows of very different norms: the ratios spread out, and the gaps between them are wide
        self.base = (torch.randn(T, self.off[-1], device=device) * torch.randn(T, 1, device=device).exp()).to(dtype)
        self.slots = torch.randint(-1, L, (T,), device=device)
        if L > 2:
            self.slots[self.slots == L - 1] = 0  # the last slot has no tokens
        self.taus = torch.zeros(S, L, device=device)
        self.h_ref, q = self.reference_h()
        for s in range(S):
            for slot in range(L):
                if mode == "off":
                    self.taus[s, slot] = 1e6
                elif mode == "mixed" and slot > 0:  # slot 0 stays at tau = 0: an ungated adapter
                    self.taus[s, slot] = gap_tau(q[s][self.slots == slot])

    def reference_h(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """h [S, T, r] fp32 as the PyTorch path computes it, and each token's ||B h||^2 / ||base||^2."""
        S, T = len(self.slices), self.x.shape[0]
        h = torch.zeros(S, T, self.rank, device=self.x.device)
        q = [torch.zeros(T, device=self.x.device) for _ in range(S)]
        for slot in range(self.L):
            rows = self.slots == slot
            for s in range(S):
                hs = (self.x[rows].to(self.dtype) @ self.A[s][slot, 0].T).float()
                h[s, rows] = hs
                d2 = ((hs @ self.G[s, slot]) * hs).sum(-1)
                q[s][rows] = d2 / row_sq_norm(self.base[rows, self.off[s]:self.off[s + 1]])
        return h, q

    def delta_terms(self) -> torch.Tensor:
        """[T, sum N] fp32: sum_j |B_ij| |h_j| over each token's own slot's B (0 without an adapter), the
        size of the terms its delta sums."""
        terms = torch.zeros(self.base.shape, device=self.x.device)
        for slot in range(self.L):
            rows = self.slots == slot
            for s in range(len(self.slices)):
                terms[rows, self.off[s]:self.off[s + 1]] = self.h_ref[s, rows].abs() @ self.B[s][slot, 0].float().abs().T
        return terms

    def on_ref(self) -> torch.Tensor:
        """on [S, T] bool straight from tspeft_rt.gate (slot -1: off)."""
        h, _ = self.reference_h()
        on = torch.zeros(len(self.slices), self.x.shape[0], dtype=torch.bool, device=self.x.device)
        for s in range(len(self.slices)):
            d2 = torch.einsum("tr,trk,tk->t", h[s], self.G[s, self.slots.clamp_min(0)], h[s])
            b2 = row_sq_norm(self.base[:, self.off[s]:self.off[s + 1]])
            on[s] = gate_keep(d2, b2, self.taus[s, self.slots.clamp_min(0)]) & (self.slots >= 0)
        return on

    def packed(self) -> PackedLoRA:
        """The PyTorch path's state: slot 0 of a mixed case has no gate (plain LoRA)."""
        packed = PackedLoRA(self.L, self.rank, self.x.shape[1], self.slices, self.dtype, self.x.device)
        for slot in range(self.L):
            packed.set_slot(slot, [a[slot, 0] for a in self.A], [b[slot, 0] for b in self.B])
            ungated = self.mode == "mixed" and slot == 0
            packed.set_gate(slot, [None if ungated else float(t) for t in self.taus[:, slot]])
        return packed

    def reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output of `gated_lora`, on [S, T] from the gate math, counters [2, L] (routed, kept) of
        `gated_lora`)."""
        out = self.base.clone()
        counters = torch.zeros(2, self.L, dtype=torch.int64, device=self.x.device)
        gated_lora(out, self.x, self.packed(), self.slots, counters)
        on = self.on_ref()
        assert counters[1].tolist() == [int(on[:, self.slots == slot].sum()) for slot in range(self.L)]
        return out, on, counters

    def shrink(self) -> torch.Tensor:
        return tg.lora_shrink(self.x, self.A, self.weights.a_table, self.taus, *lora_segments(self.slots, self.L))

    def run(self, slots: torch.Tensor | None = None, counters: torch.Tensor | None = None,
            grams: torch.Tensor | None = None, taus: torch.Tensor | None = None):
        """gated_lora_triton on a poisoned buffer: (output view, the whole buffer)."""
        T, N = self.base.shape
        buf = torch.full((T + 2, N + 5), float("nan"), device=self.x.device).to(self.dtype)
        out = buf[1:T + 1, 2:N + 2]
        out.copy_(self.base)
        slots = self.slots if slots is None else slots
        grams, taus = (self.G, self.taus) if grams is None else (grams, taus)
        tg.gated_lora_triton(out, self.x, self.weights, grams, taus, lora_segments(slots, self.L), counters)
        return out, buf

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """on [S, T] int8 of the fused gate (written for tokens with an adapter; 0 elsewhere)."""
        on = torch.zeros(len(self.slices), self.x.shape[0], dtype=torch.int8, device=self.x.device)
        tg.gated_expand(self.base.clone(), h, self.B, self.weights.b_table, self.G, self.taus,
                        *lora_segments(self.slots, self.L), self.slices, None, on)
        return on


def assert_matches(out: torch.Tensor, ref: torch.Tensor, case: Case, on: torch.Tensor,
                   skip: torch.Tensor | None = None) -> None:
    """Per slice: pairs on in the reference match it, the others keep the base bit for bit.
    `skip` [S, T]: pairs not checked (GPU tests: tokens at the threshold within rounding).
    The relative tolerance applies to the operands, |base| + sum_j |B_ij h_j| (`Case.delta_terms`), not
    to the result: where they cancel, one rounding more or less (the kernel keeps h and the sum in fp32,
    the reference rounds h and the delta to the dtype) moves the result by an ulp of the operands (seen
    on an H200: 1 fp16 ulp at 4..8 on results near 0; 2 of 4M fp16 values at 4096 tokens beyond a
    bound on |base| + |delta|)."""
    base, off, terms = case.base, case.off, case.delta_terms()
    for s in range(on.shape[0]):
        cols = slice(off[s], off[s + 1])
        keep = ~skip[s] if skip is not None else torch.ones_like(on[s])
        rows_on, rows_off = on[s] & keep, ~on[s] & keep
        assert torch.equal(out[rows_off, cols], base[rows_off, cols]), f"slice {s}: an off row was written"
        got, want, b = (t[rows_on, cols].float() for t in (out, ref, base))
        bound = TOL[out.dtype]["atol"] + TOL[out.dtype]["rtol"] * (b.abs() + terms[rows_on, cols])
        excess = (got - want).abs() - bound
        assert not bool((excess > 0).any()) and not got.isnan().any(), \
            f"slice {s}: {int((excess > 0).sum())} on values beyond tolerance, worst by {float(excess.max()):.3g}"


def assert_pad_untouched(buf: torch.Tensor) -> None:
    T, N = buf.shape[0] - 2, buf.shape[1] - 5
    inner = torch.zeros_like(buf, dtype=torch.bool)
    inner[1:T + 1, 2:N + 2] = True
    assert buf[~inner].isnan().all(), "the kernel wrote outside the output"


def test_lora_segments():
    slots = torch.tensor([2, -1, 0, 2, 0, -1, 2, 1], device=DEVICE)
    sorted_idx, counts, starts = lora_segments(slots, 4)
    assert sorted_idx.dtype == counts.dtype == starts.dtype == torch.int32
    assert counts.tolist() == [2, 1, 3, 0]
    for slot in range(4):
        rows = sorted_idx[starts[slot]:starts[slot] + counts[slot]].tolist()
        assert rows == (slots == slot).nonzero().squeeze(1).tolist()  # stable: token order kept


SERVING = [  # name, slice widths, rank, dtype, gate mode, T, L, K
    ("s1-r8-f32-mixed", [40], 8, torch.float32, "mixed", 24, 3, 64),
    ("s2-r16-f32-mixed", [32, 16], 16, torch.float32, "mixed", 24, 4, 64),
    ("s3-r64-f32-mixed", [24, 8, 16], 64, torch.float32, "mixed", 24, 3, 48),
    ("s3-r16-bf16-mixed", [24, 8, 16], 16, torch.bfloat16, "mixed", 24, 3, 64),
    ("s2-r64-bf16-mixed", [48, 40], 64, torch.bfloat16, "mixed", 20, 3, 32),
    ("s3-r8-f16-mixed", [16, 24, 8], 8, torch.float16, "mixed", 24, 3, 64),
    ("s1-r8-bf16-on", [40], 8, torch.bfloat16, "on", 24, 3, 64),
    ("s3-r16-f32-on", [24, 8, 16], 16, torch.float32, "on", 17, 2, 64),
    ("s3-r16-bf16-off", [24, 8, 16], 16, torch.bfloat16, "off", 24, 3, 64),
    ("s2-r8-f32-off", [32, 16], 8, torch.float32, "off", 24, 3, 64),
    ("s2-r16-f32-decode-splitk", [32, 16], 16, torch.float32, "mixed", 4, 3, 256),
    ("s1-r8-bf16-one-token", [40], 8, torch.bfloat16, "on", 1, 2, 64),
    ("s2-r8-f16-decode-column-chunks", [300, 136], 8, torch.float16, "mixed", 10, 2, 64),
    ("s1-r16-f32-prefill-column-chunks", [200], 16, torch.float32, "mixed", 40, 2, 64),
]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "gate-then-split-expand"])
@pytest.mark.parametrize("name,slices,rank,dtype,mode,T,L,K", SERVING, ids=[c[0] for c in SERVING])
def test_serving_matches_pytorch(monkeypatch, name, slices, rank, dtype, mode, T, L, K, fused):
    """Both launch plans of the gated expand (the shape picks one; here both are forced)."""
    monkeypatch.setattr(tg, "FUSE_MIN_TILES", 1 if fused else 1 << 30)
    case = Case(name, slices, rank, dtype, mode, T, L, K)
    ref, on_ref, counters_ref = case.reference()
    if mode == "mixed":
        assert on_ref.any() and not on_ref[:, case.slots >= 0].all()
    # the pieces: h and on exactly as the reference (as sets of rows)
    h = case.shrink()
    torch.testing.assert_close(h.to(dtype).float(), case.h_ref, **TOL[dtype])
    assert torch.equal(h[:, case.slots < 0], torch.zeros_like(h[:, case.slots < 0]))
    assert torch.equal(case.gate(h).bool(), on_ref)
    # the whole op, into a poisoned buffer; the counters add to what is there
    counters = torch.full((2, L), 5, dtype=torch.int64, device=DEVICE)
    out, buf = case.run(counters=counters)
    assert_pad_untouched(buf)
    assert_matches(out, ref, case, on_ref)
    assert counters.tolist() == (counters_ref + 5).tolist()


def test_tokens_without_adapter_get_nothing():
    case = Case("no-adapter", [24, 8], 8, torch.float32, "on")
    slots = torch.full_like(case.slots, -1)
    counters = torch.zeros(2, case.L, dtype=torch.int64, device=DEVICE)
    out, buf = case.run(slots=slots, counters=counters)
    assert torch.equal(out, case.base) and counters.tolist() == [[0] * case.L] * 2
    assert_pad_untouched(buf)


def test_uncovered_slices_are_not_routed_read_or_written():
    """k of a q,v adapter (slot 1) and a layer an adapter has no weights in (slot 2, every slice):
    tau < 0, the same on both paths: those rows keep the base bit for bit and count nothing."""
    case = Case("uncovered", [24, 8, 16], 8, torch.float32, "mixed", T=30, L=4)
    covered = {0: [True] * 3, 1: [True, False, True], 2: [False] * 3}
    packed = PackedLoRA(case.L, case.rank, case.x.shape[1], case.slices, case.dtype, case.x.device)
    for slot, cover in covered.items():
        packed.set_slot(slot, [a[slot, 0] for a in case.A], [b[slot, 0] for b in case.B], cover)
        packed.set_gate(slot, [None if slot == 0 else float(t) for t in case.taus[:, slot]])
    ref, counts = case.base.clone(), torch.zeros(2, case.L, dtype=torch.int64, device=DEVICE)
    gated_lora(ref, case.x, packed, case.slots, counts)
    grams, taus = tg.packed_gate_views(packed.gram, packed.tau)
    counters = torch.zeros(2, case.L, dtype=torch.int64, device=DEVICE)
    out, buf = case.run(counters=counters, grams=grams, taus=taus)
    assert_pad_untouched(buf)
    for slot, cover in covered.items():
        rows = case.slots == slot
        assert rows.sum() > 1
        for s, c in enumerate(cover):
            cols = slice(case.off[s], case.off[s + 1])
            if not c:
                assert torch.equal(out[rows, cols], case.base[rows, cols])
                assert torch.equal(ref[rows, cols], case.base[rows, cols])
        assert counters[0, slot] == counts[0, slot] == int(rows.sum()) * sum(cover)
        assert counters[1, slot] == counts[1, slot]
    torch.testing.assert_close(out, ref, **TOL[case.dtype])


def test_comparison_catches_wrong_slot_missed_row_and_flipped_gate():
    case = Case("mutants", [24, 8, 16], 16, torch.float32, "mixed")
    ref, on_ref, _ = case.reference()
    out, _ = case.run()
    assert_matches(out, ref, case, on_ref)  # the unmutated kernel passes
    # a wrong slot: two tokens of slot 0 (tau = 0, always on) and slot 1 swap adapters
    a, b = int((case.slots == 0).nonzero()[0]), int((case.slots == 1).nonzero()[0])
    swapped = case.slots.clone()
    swapped[a], swapped[b] = case.slots[b], case.slots[a]
    with pytest.raises(AssertionError):
        assert_matches(case.run(slots=swapped)[0], ref, case, on_ref)
    # a missed row: one token of slot 0 loses its adapter
    dropped = case.slots.clone()
    dropped[a] = -1
    with pytest.raises(AssertionError):
        assert_matches(case.run(slots=dropped)[0], ref, case, on_ref)
    # a flipped gate, each way: one (token, slice) of the kernel's output with the other decision
    h = case.shrink()
    for value in (False, True):
        s, t = [int(i) for i in ((on_ref == (not value)) & (case.slots >= 0)).nonzero()[0]]
        cols = slice(case.off[s], case.off[s + 1])
        flipped = out.clone()
        delta = h[s, t].to(case.dtype) @ case.B[s][int(case.slots[t]), 0].T
        flipped[t, cols] = case.base[t, cols] + (delta if value else 0)
        with pytest.raises(AssertionError):
            assert_matches(flipped, ref, case, on_ref)


DORA = [  # name, slice widths, rank, dtype, T, L, K
    ("dora-s3-r8-f32", [24, 8, 16], 8, torch.float32, 24, 3, 64),
    ("dora-s2-r16-bf16", [32, 16], 16, torch.bfloat16, 24, 3, 64),
    ("dora-s1-r8-f32-decode-column-chunks", [200], 8, torch.float32, 12, 2, 64),
]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "gate-then-split-expand"])
@pytest.mark.parametrize("name,slices,rank,dtype,T,L,K", DORA, ids=[c[0] for c in DORA])
def test_dora_serving_matches_pytorch(monkeypatch, name, slices, rank, dtype, T, L, K, fused):
    """DoRA slots (c per output column, a bias in the base) beside an ungated LoRA slot (slot 0, c = 1)
    and tokens without adapter: the kernels against the PyTorch path, decisions and counters exact."""
    monkeypatch.setattr(tg, "FUSE_MIN_TILES", 1 if fused else 1 << 30)
    case = Case(name, slices, rank, dtype, "on", T, L, K)
    n = case.off[-1]
    bias = torch.randn(n, device=DEVICE).to(dtype)
    packed = PackedLoRA(L, rank, K, slices, dtype, case.x.device, dora=True, bias=bias)
    for slot in range(L):
        packed.set_slot(slot, [a[slot, 0] for a in case.A], [b[slot, 0] for b in case.B])
        if slot > 0:
            packed.set_scale(slot, 1 + 0.3 * torch.randn(n, device=DEVICE))
    # thresholds in gaps of each DoRA slot's ratios ||delta|| / ||base||, from the PyTorch path's own deltas
    _, delta, _, _ = gate_decisions(case.base, case.x, packed, case.slots)
    for slot in range(1, L):
        rows = case.slots == slot
        ratios = [row_sq_norm(delta[rows, lo:hi]) / row_sq_norm(case.base[rows, lo:hi])
                  for lo, hi in zip(case.off, case.off[1:])]
        packed.set_gate(slot, [gap_tau(q) for q in ratios])
    ref = case.base.clone()
    counters_ref = torch.zeros(2, L, dtype=torch.int64, device=DEVICE)
    gated_lora(ref, case.x, packed, case.slots, counters_ref)
    assert 0 < counters_ref[1, 1] < counters_ref[0, 1]  # the gate decided both ways
    grams, taus = tg.packed_gate_views(packed.gram, packed.tau)
    buf = torch.full((T + 2, n + 5), float("nan"), device=DEVICE).to(dtype)
    out = buf[1:T + 1, 2:n + 2]
    out.copy_(case.base)
    counters = torch.zeros(2, L, dtype=torch.int64, device=DEVICE)
    tg.gated_lora_triton(out, case.x, case.weights, grams, taus, lora_segments(case.slots, L), counters,
                         packed.scale, bias)
    assert_pad_untouched(buf)
    assert counters.tolist() == counters_ref.tolist()
    assert torch.equal(out[case.slots < 0], case.base[case.slots < 0])
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("tau", [0.0, 1e-3, 0.5])
def test_gate_edge_cases_zero_delta_and_zero_base(tau):
    case = Case(f"edges-{tau}", [24, 8], 8, torch.float32, "on")
    case.slots[:8] = torch.arange(8) % 2  # adapters on the edge rows
    case.x[:4] = 0  # h = 0: a zero delta, on only at tau = 0
    case.base[4:8] = 0  # ||base|| = 0: the EPS floor decides
    case.taus.fill_(tau)
    ref, on_ref, _ = case.reference()
    assert torch.equal(case.gate(case.shrink()).bool(), on_ref)
    assert on_ref[:, :4].all() == (tau == 0) and on_ref[:, 4:8].all()
    out, _ = case.run()
    assert_matches(out, ref, case, on_ref)


def test_custom_ops_are_opaque_to_dynamo():
    case = Case("dynamo", [24, 8, 16], 8, torch.float32, "mixed")
    ref, on_ref, counters_ref = case.reference()
    segments = lora_segments(case.slots, case.L)

    def step(out, x, counters):
        tg.gated_lora_triton(out, x, case.weights, case.G, case.taus, segments, counters)
        return out

    out, counters = case.base.clone(), torch.zeros(2, case.L, dtype=torch.int64, device=DEVICE)
    torch.compile(step, backend="eager", fullgraph=True)(out, case.x, counters)
    assert_matches(out, ref, case, on_ref)
    assert counters.tolist() == counters_ref.tolist()
    assert hasattr(torch.ops.tspeft, "gated_lora") and hasattr(torch.ops.tspeft, "gated_expand")


def test_mutated_op_arguments_have_no_default():
    """torch < 2.13 bumps the version of a custom op's mutated arguments by position without filling in
    defaults: a mutated argument with a default, left out, raised IndexError (an H200 run, torch 2.11)."""
    for op in (torch.ops.tspeft.gated_lora.default, torch.ops.tspeft.gated_expand.default):
        mutated = [a for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        assert "output" in [a.name for a in mutated] and not [a.name for a in mutated if a.has_default_value()]


def test_packed_gate_views_drive_the_kernels():
    case = Case("packed-views", [24, 8, 16], 16, torch.bfloat16, "mixed")
    ref, on_ref, counters_ref = case.reference()
    packed = case.packed()
    grams, taus = tg.packed_gate_views(packed.gram, packed.tau)
    assert torch.equal(grams, case.G) and torch.equal(taus, case.taus)
    assert grams.data_ptr() == packed.gram.data_ptr()  # views, no copies
    counters = torch.zeros(2, case.L, dtype=torch.int64, device=DEVICE)
    out, _ = case.run(counters=counters, grams=grams, taus=taus)
    assert_matches(out, ref, case, on_ref)
    assert counters.tolist() == counters_ref.tolist()


def test_weight_tables_check_their_buffers():
    case = Case("tables", [24, 8], 8, torch.float32, "on")
    with pytest.raises(ValueError, match="2 A and 1 B buffers for 2 slices"):
        tg.LoRAWeights.from_buffers(case.A, case.B[:1], case.slices)
    with pytest.raises(ValueError, match="share one dtype"):
        tg.LoRAWeights.from_buffers(case.A, [case.B[0], case.B[1].half()], case.slices)


# --------------------------------------------------------------------------- training


def train_inputs(name: str, mode: str, adapter_dtype: torch.dtype, base_dtype: torch.dtype, N: int = 20,
                 K: int = 48, OUT: int = 40, rank: int = 8, device: str = DEVICE):
    seed(name)
    x = torch.randn(N, K, device=device, dtype=adapter_dtype)
    base = (torch.randn(N, OUT, device=device) * torch.randn(N, 1, device=device).exp()).to(base_dtype)
    A = torch.randn(rank, K, device=device, dtype=adapter_dtype) / K**0.5
    B = torch.randn(OUT, rank, device=device, dtype=adapter_dtype) / rank**0.5
    scale = 2.0
    with torch.no_grad():
        m = ((x @ A.t()) @ B.t()) * scale
        q = row_sq_norm(m) / row_sq_norm(base)
    tau = {"on": 0.0, "off": 1e6, "mixed": gap_tau(q)}[mode]
    return x, base, A, B, torch.tensor([tau], device=device), scale


def run_fn(fn, x, base, A, B, tau, scale, grad_x: bool, grad_tau: bool):
    x = x.clone().requires_grad_(grad_x)
    base = base.clone().requires_grad_(True)
    A, B = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    tau = tau.clone().requires_grad_(grad_tau)
    out, delta_sq = fn.apply(x, base, A, B, tau, row_sq_norm(base.detach()), scale, 0.7)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    (out.float() * weights).sum().backward()
    return out.detach(), delta_sq, x.grad, base.grad, A.grad, B.grad, tau.grad


TRAIN = [  # name, gate mode, adapter dtype, base dtype, rank, backward (gather or mask), grad of x, grad of tau
    ("f32-mixed-gather", "mixed", torch.float32, torch.float32, 8, "gather", True, True),
    ("f32-mixed-mask", "mixed", torch.float32, torch.float32, 8, "mask", True, True),
    ("f32-mixed-notau-nox", "mixed", torch.float32, torch.float32, 8, "gather", False, False),
    ("f32-mixed-notau-mask", "mixed", torch.float32, torch.float32, 8, "mask", True, False),
    ("f32-on", "on", torch.float32, torch.float32, 8, "mask", True, True),
    ("f32-off-gather", "off", torch.float32, torch.float32, 8, "gather", True, True),
    ("f32-adapter-bf16-base-mixed", "mixed", torch.float32, torch.bfloat16, 8, "gather", True, True),
    ("bf16-mixed-mask", "mixed", torch.bfloat16, torch.bfloat16, 8, "mask", True, True),
    ("bf16-mixed-gather-r16", "mixed", torch.bfloat16, torch.bfloat16, 16, "gather", True, True),
]


@pytest.mark.parametrize("name,mode,adapter_dtype,base_dtype,rank,backward,grad_x,grad_tau", TRAIN,
                         ids=[c[0] for c in TRAIN])
def test_training_fn_matches_pytorch(monkeypatch, name, mode, adapter_dtype, base_dtype, rank, backward, grad_x,
                                     grad_tau):
    monkeypatch.setattr(tt, "GATHER_BELOW_KEEP", 2.0 if backward == "gather" else 0.0)
    x, base, A, B, tau, scale = train_inputs(name, mode, adapter_dtype, base_dtype, rank=rank)
    ref = run_fn(_GatedLoraFn, x, base, A, B, tau, scale, grad_x, grad_tau)
    got = run_fn(tt.TritonGatedLoraFn, x, base, A, B, tau, scale, grad_x, grad_tau)
    keep_ref = gate_keep(ref[1], row_sq_norm(base), tau)
    keep = gate_keep(got[1], row_sq_norm(base), tau)
    assert torch.equal(keep, keep_ref) and keep.all() == (mode == "on") and keep.any() == (mode != "off")
    assert torch.equal(got[0][~keep], base[~keep])  # off rows: the base, bit for bit
    tol = TOL[adapter_dtype if adapter_dtype == torch.bfloat16 else base_dtype]
    names = ["out", "delta_sq", "grad_x", "grad_base", "grad_A", "grad_B", "grad_tau"]
    for what, g, r in zip(names, got, ref):
        if r is None:
            assert g is None, what
        else:
            torch.testing.assert_close(g.float(), r.float(), **tol, msg=what)
    if grad_tau and mode != "on":
        assert float(ref[-1].abs()) > 0  # the surrogate did reach tau


def test_train_forward_computes_base_sq_itself():
    x, base, A, B, tau, scale = train_inputs("fwd-base-sq", "mixed", torch.float32, torch.bfloat16)
    h = x @ A.t()
    given = tt.gated_lora_train_forward(base, h, B, scale, tau, row_sq_norm(base))
    computed = tt.gated_lora_train_forward(base, h, B, scale, tau)
    assert torch.equal(given[0], computed[0])
    torch.testing.assert_close(given[1], computed[1])


# --------------------------------------------------------------------------- GPU (compiled kernels)


def near_threshold(q: list[torch.Tensor], taus: torch.Tensor, slots: torch.Tensor, rel: float = 2e-2):
    """[S, T]: tokens whose ratio lies within `rel` of tau^2, where rounding may flip the gate."""
    t2 = taus[:, slots.clamp_min(0)].square()
    return torch.stack(q).div(t2.clamp_min(1e-30)).sub(1).abs().lt(rel) & (slots >= 0)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("T", [1, 37, 512, 4096])
def test_gpu_serving_larger_shapes(T, rank, dtype):
    name = f"gpu-{T}-{rank}-{dtype}"
    case = Case(name, [1024, 256, 256], rank, dtype, "on", T=T, L=4, K=1024)
    _, q = case.reference_h()
    for s in range(3):  # mixed gates: tau^2 in the widest gap of each slot's middle ratios (no token at it)
        for slot in range(1, 4):
            rows = case.slots == slot
            if rows.any():
                case.taus[s, slot] = gap_tau(q[s][rows], 0.4, 0.6, min_gap=1.0)
    ref, on_ref, counters_ref = case.reference()
    skip = near_threshold(q, case.taus, case.slots)
    counters = torch.zeros(2, 4, dtype=torch.int64, device="cuda")
    out, buf = case.run(counters=counters)
    assert_pad_untouched(buf)
    assert_matches(out, ref, case, on_ref, skip=skip)
    assert counters[0].tolist() == counters_ref[0].tolist()
    assert (counters[1] - counters_ref[1]).abs().sum() <= int(skip.sum())


@gpu_only
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backward", ["gather", "mask"])
def test_gpu_training_larger_shapes(monkeypatch, adapter_dtype, backward):
    monkeypatch.setattr(tt, "GATHER_BELOW_KEEP", 2.0 if backward == "gather" else 0.0)
    x, base, A, B, tau, scale = train_inputs("gpu-train", "on", adapter_dtype, torch.bfloat16, N=2048, K=1024,
                                             OUT=1024, rank=16, device="cuda")
    with torch.no_grad():
        tau.fill_(gap_tau(row_sq_norm((x @ A.t()) @ B.t() * scale) / row_sq_norm(base), 0.4, 0.6, min_gap=1.0))
    ref = run_fn(_GatedLoraFn, x, base, A, B, tau, scale, True, True)
    got = run_fn(tt.TritonGatedLoraFn, x, base, A, B, tau, scale, True, True)
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
    for what, g, r in zip(["out", "delta_sq", "grad_x", "grad_base", "grad_A", "grad_B", "grad_tau"], got, ref):
        assert rel(g, r) < (2e-2 if what in ("grad_x", "grad_A", "grad_B", "grad_tau") else 1e-2), what


# --------------------------------------------------------------------------- tools/gpu_check.py


def test_gpu_check_help():
    r = subprocess.run([sys.executable, "tools/gpu_check.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 0 and "--dry-run-cpu" in r.stdout, r.stderr


@pytest.mark.skipif(CUDA, reason="the dry run is the CPU stand-in for the GPU run")
def test_gpu_check_dry_run_cpu(tmp_path):
    out = tmp_path / "check.json"
    r = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run-cpu", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["correctness"]["passed"] and result["correctness"]["cases"]
    timings = result["timings"]
    assert timings["serving"] and not [row for row in timings["serving"] if "errors" in row], timings["serving"]
    assert "errors" not in timings["train"], timings["train"]
