"""Gated multi-LoRA for serving in Triton: the device-side twin of `tspeft_rt.kernels.gated_lora`.

Same math as the PyTorch path (the oracle in the tests). Tokens are sorted by adapter slot once per
batch (`lora_segments`); per slice s of the layer and slot l, on the rows t of slot l's segment:

    h[s, t]   = A_s[l] x_t                                   shrink, [S, T, r] fp32 (0 for slot -1)
    d2        = h^T G_s[l] h        (G = B^T B, so = ||B h||^2; h rounded to the weights' dtype first,
                                     as the expand and the PyTorch path use it)
    b2        = ||output[t, slice s]||^2                      fp32
    on[s, t]  = d2 >= max(tau^2 max(b2, EPS^2), TINY * (tau > 0))       tspeft_rt.gate.gate_keep
    output[t, slice s] += B_s[l] h[s, t]        only where on          gated expand

tau = 0 keeps every token (plain LoRA); slot -1 (no adapter) is never on. `kept[l]` counts the
(token, slice) updates kept per slot, on the device.

Everything stays on the device: no host synchronisation, no branching on tensor data in Python, and
every launch grid depends only on shapes, max_loras and block sizes, so the ops can be captured in
CUDA graphs. They are torch custom ops (`torch.ops.tspeft.*`, with fake implementations), so Dynamo
treats them as opaque. Grid: (row tiles x column tiles, slices, slots); a program takes BLOCK_M rows
of one slot's segment of the sorted tokens and exits at once when its tile lies past the segment
(as vLLM's punica kernels do). The expand also exits when none of its rows is on and masks the
loads and stores of off rows, so their output rows are neither read nor written. Costs: the shrink
runs for every token with an adapter (split over K for decode-sized batches), the gate reads each
output row once (the base norm, its bulk), the expand reads and writes the on rows only.

The per-slice weight pointers travel in a small int64 table on the device, built once per set of
weight buffers and cached (vLLM does the same): the first call for a set of buffers must come
before CUDA graph capture. Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tspeft_rt.gate import _TINY, EPS

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the module still imports (the CPU serving path never needs it)
    HAS_TRITON = False

_TABLES: dict[tuple, Tensor] = {}
_MAX_TABLES = 256


def lora_segments(slots: Tensor, max_loras: int) -> tuple[Tensor, Tensor, Tensor]:
    """(sorted_idx [T], counts [L], starts [L]), all int32, from per-token slots in [-1, L) (-1 = no
    adapter).

    sorted_idx is the stable argsort of the slots; slot l's tokens are
    sorted_idx[starts[l] : starts[l] + counts[l]]. Device ops only (no bincount: it syncs on CUDA).
    """
    slots = slots.long()
    sorted_idx = torch.argsort(slots, stable=True).to(torch.int32)
    counts = torch.zeros(max_loras + 1, dtype=torch.int32, device=slots.device)
    counts.scatter_add_(0, slots + 1, torch.ones_like(slots, dtype=torch.int32))
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts  # slot -1 sorts first: index 0
    return sorted_idx, counts[1:], starts[1:]


def _table(kind: str, rows: list[list[int]], key: tuple, device: torch.device) -> Tensor:
    """The int64 table `rows` on the device, cached by the buffers' pointers, shapes and strides (a
    host-to-device copy: it must first happen before any CUDA graph capture)."""
    key = (kind, device, *key)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        table = _TABLES[key] = torch.tensor(rows, dtype=torch.int64, device=device)
    return table


def _key(ts: Sequence[Tensor]) -> tuple:
    return tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in ts)


def _a_table(lora_a: Sequence[Tensor]) -> Tensor:
    """[S, 4] per slice: A pointer, strides (slot, rank row, input column)."""
    rows = [[a.data_ptr(), a.stride(0), a.stride(-2), a.stride(-1)] for a in lora_a]
    return _table("a", rows, _key(lora_a), lora_a[0].device)


def _b_table(lora_b: Sequence[Tensor], output_slices: Sequence[int]) -> Tensor:
    """[S, 6] per slice: B pointer, strides (slot, output row, rank column), width N_s, column offset."""
    rows, offset = [], 0
    for b, n in zip(lora_b, output_slices):
        rows.append([b.data_ptr(), b.stride(0), b.stride(-2), b.stride(-1), n, offset])
        offset += n
    return _table("b", rows, (*_key(lora_b), tuple(output_slices)), lora_b[0].device)


def dot_mode(w: Tensor) -> tuple[bool, str]:
    """(upcast the dot operands to fp32, input precision) for weights `w`. fp16/bf16 run on tensor
    cores as they are; fp32 as 3xTF32 (about fp32 accuracy). The interpreter (CPU) has no bf16 dot:
    fp32 operands there."""
    if w.device.type != "cuda":
        return True, "ieee"
    return (True, "tf32x3") if w.dtype == torch.float32 else (False, "tf32")


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _block_m(num_tokens: int) -> int:
    """Rows per program: small tiles for decode-sized batches, larger for prefill."""
    return 16 if num_tokens <= 16 else 32 if num_tokens <= 128 else 64


if HAS_TRITON:

    @triton.jit
    def _segment_rows(sorted_ptr, starts_ptr, count, tile, slot, BLOCK_M: tl.constexpr):
        """The token rows of tile `tile` of slot `slot`'s segment (`count` tokens), and their mask."""
        m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = m < count
        rows = tl.load(sorted_ptr + tl.load(starts_ptr + slot) + m, mask=row_ok, other=0).to(tl.int64)
        return rows, row_ok

    @triton.jit
    def _shrink_kernel(x_ptr, a_ref, a_tab, h_ptr, sorted_ptr, counts_ptr, starts_ptr,
                       K, R, stride_xt, stride_xk, stride_hs, stride_ht, stride_hr,
                       BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        pid, s, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tile, split = pid // SPLIT_K, pid % SPLIT_K
        count = tl.load(counts_ptr + slot)
        if tile * BLOCK_M >= count:  # past the slot's segment (most programs when few slots are active)
            return
        rows, row_ok = _segment_rows(sorted_ptr, starts_ptr, count, tile, slot, BLOCK_M)
        w_dtype = a_ref.dtype.element_ty
        a_ptr = tl.load(a_tab + s * 4).to(tl.pointer_type(w_dtype))
        a_ptr += slot * tl.load(a_tab + s * 4 + 1)
        stride_ar, stride_ak = tl.load(a_tab + s * 4 + 2), tl.load(a_tab + s * 4 + 3)
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(split * BLOCK_K, K, BLOCK_K * SPLIT_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xt = tl.load(x_ptr + rows[:, None] * stride_xt + k[None, :] * stride_xk,
                         mask=row_ok[:, None] & (k[None, :] < K), other=0.0).to(w_dtype)
            at = tl.load(a_ptr + r[None, :] * stride_ar + k[:, None] * stride_ak,
                         mask=(r[None, :] < R) & (k[:, None] < K), other=0.0)
            if UPCAST:
                xt, at = xt.to(tl.float32), at.to(tl.float32)
            acc = tl.dot(xt, at, acc, input_precision=PRECISION)
        h_ptrs = h_ptr + s * stride_hs + rows[:, None] * stride_ht + r[None, :] * stride_hr
        mask = row_ok[:, None] & (r[None, :] < R)
        if SPLIT_K == 1:
            tl.store(h_ptrs, acc, mask=mask)
        else:  # partial sums over K chunks into the zeroed h
            tl.atomic_add(h_ptrs, acc, mask=mask)

    @triton.jit
    def _gate_kernel(h_ptr, out_ptr, w_ref, b_tab, grams_ptr, taus_ptr, on_ptr, kept_ptr,
                     sorted_ptr, counts_ptr, starts_ptr, R,
                     stride_hs, stride_ht, stride_hr, stride_ot, stride_oc, stride_gs, stride_gl, stride_gr,
                     stride_gc, stride_ts, stride_tl, stride_ons, stride_ont,
                     BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KEPT: tl.constexpr,
                     EPS_SQ: tl.constexpr, TINY: tl.constexpr):
        tile, s, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        count = tl.load(counts_ptr + slot)
        if tile * BLOCK_M >= count:  # past the slot's segment (most programs when few slots are active)
            return
        rows, row_ok = _segment_rows(sorted_ptr, starts_ptr, count, tile, slot, BLOCK_M)
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        h = tl.load(h_ptr + s * stride_hs + rows[:, None] * stride_ht + r[None, :] * stride_hr,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        h = h.to(w_ref.dtype.element_ty).to(tl.float32)
        g = tl.load(grams_ptr + s * stride_gs + slot * stride_gl + r[:, None] * stride_gr + r[None, :] * stride_gc,
                    mask=r_ok[:, None] & r_ok[None, :], other=0.0)
        delta_sq = tl.sum(tl.dot(h, g, input_precision="ieee") * h, axis=1)
        n_s, offset = tl.load(b_tab + s * 6 + 4).to(tl.int32), tl.load(b_tab + s * 6 + 5)
        base_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, n_s, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            base = tl.load(out_ptr + rows[:, None] * stride_ot + (offset + n)[None, :] * stride_oc,
                           mask=row_ok[:, None] & (n[None, :] < n_s), other=0.0).to(tl.float32)
            base_sq += tl.sum(base * base, axis=1)
        tau = tl.load(taus_ptr + s * stride_ts + slot * stride_tl)
        threshold = tl.maximum(tau * tau * tl.maximum(base_sq, EPS_SQ), tl.where(tau > 0, TINY, 0.0))
        on = row_ok & (delta_sq >= threshold)
        tl.store(on_ptr + s * stride_ons + rows * stride_ont, on.to(tl.int8), mask=row_ok)
        if HAS_KEPT:
            tl.atomic_add(kept_ptr + slot, tl.sum(on.to(tl.int64), axis=0))

    @triton.jit
    def _expand_kernel(h_ptr, out_ptr, w_ref, b_tab, on_ptr, sorted_ptr, counts_ptr, starts_ptr, R, MAX_N,
                       stride_hs, stride_ht, stride_hr, stride_ot, stride_oc, stride_ons, stride_ont,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        pid, s, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_tiles = tl.cdiv(MAX_N, BLOCK_N)
        tile, n_tile = pid // n_tiles, pid % n_tiles
        count, n_s = tl.load(counts_ptr + slot), tl.load(b_tab + s * 6 + 4).to(tl.int32)
        if (tile * BLOCK_M >= count) | (n_tile * BLOCK_N >= n_s):  # past the segment or the slice
            return
        rows, row_ok = _segment_rows(sorted_ptr, starts_ptr, count, tile, slot, BLOCK_M)
        on = tl.load(on_ptr + s * stride_ons + rows * stride_ont, mask=row_ok, other=0) != 0
        if tl.max(on.to(tl.int32), axis=0) == 0:  # every row gated off: nothing to read or write
            return
        w_dtype = w_ref.dtype.element_ty
        r = tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + s * stride_hs + rows[:, None] * stride_ht + r[None, :] * stride_hr,
                    mask=on[:, None] & (r[None, :] < R), other=0.0).to(w_dtype)
        b_ptr = tl.load(b_tab + s * 6).to(tl.pointer_type(w_dtype)) + slot * tl.load(b_tab + s * 6 + 1)
        stride_bn, stride_br = tl.load(b_tab + s * 6 + 2), tl.load(b_tab + s * 6 + 3)
        offset = tl.load(b_tab + s * 6 + 5)
        n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < n_s
        bt = tl.load(b_ptr + n[None, :] * stride_bn + r[:, None] * stride_br,
                     mask=(r[:, None] < R) & n_ok[None, :], other=0.0)
        if UPCAST:
            h, bt = h.to(tl.float32), bt.to(tl.float32)
        delta = tl.dot(h, bt, input_precision=PRECISION).to(w_dtype)  # the delta in the weights' dtype
        out_ptrs = out_ptr + rows[:, None] * stride_ot + (offset + n)[None, :] * stride_oc
        mask = on[:, None] & n_ok[None, :]
        out = tl.load(out_ptrs, mask=mask, other=0.0)
        total = out.to(tl.float32) + delta.to(out.dtype).to(tl.float32)
        tl.store(out_ptrs, total.to(out.dtype), mask=mask)


def _check(weights: Sequence[Tensor], num_slices: int) -> None:
    """Shape-only checks (no device data): triton present, one weight buffer per slice, one dtype."""
    if not HAS_TRITON:
        raise RuntimeError("tspeft-rt: the Triton kernels need the triton package")
    if len(weights) != num_slices:
        raise ValueError(f"tspeft-rt: {len(weights)} LoRA buffers for {num_slices} slices")
    if any(w.dtype != weights[0].dtype for w in weights):
        raise ValueError("tspeft-rt: the LoRA A and B buffers must share one dtype")


def _shrink(x: Tensor, lora_a: Sequence[Tensor], sorted_idx: Tensor, counts: Tensor, starts: Tensor) -> Tensor:
    T, K = x.shape
    S, L, R = len(lora_a), counts.numel(), lora_a[0].shape[-2]
    h = torch.zeros((S, T, R), dtype=torch.float32, device=x.device)
    if T == 0:
        return h
    block_m, block_k = _block_m(T), min(128, _pow2(K))
    m_tiles = triton.cdiv(T, block_m)
    # Decode-sized batches have too few row tiles to fill the GPU: split K across programs instead.
    split_k = max(1, min(16, 128 // (m_tiles * S), triton.cdiv(K, block_k)))
    upcast, precision = dot_mode(lora_a[0])
    _shrink_kernel[(m_tiles * split_k, S, L)](
        x, lora_a[0], _a_table(lora_a), h, sorted_idx, counts, starts, K, R,
        x.stride(0), x.stride(1), h.stride(0), h.stride(1), h.stride(2),
        BLOCK_M=block_m, BLOCK_R=_pow2(R), BLOCK_K=block_k, SPLIT_K=split_k, UPCAST=upcast, PRECISION=precision,
    )
    return h


def _gate(h: Tensor, output: Tensor, lora_b: Sequence[Tensor], grams: Tensor, taus: Tensor, sorted_idx: Tensor,
          counts: Tensor, starts: Tensor, output_slices: Sequence[int], kept: Tensor | None) -> Tensor:
    S, T, R = h.shape
    on = torch.zeros((S, T), dtype=torch.int8, device=h.device)
    if T == 0:
        return on
    block_m = _block_m(T)
    _gate_kernel[(triton.cdiv(T, block_m), S, counts.numel())](
        h, output, lora_b[0], _b_table(lora_b, output_slices), grams, taus, on, on if kept is None else kept,
        sorted_idx, counts, starts, R, h.stride(0), h.stride(1), h.stride(2), output.stride(0), output.stride(1),
        grams.stride(0), grams.stride(1), grams.stride(2), grams.stride(3), taus.stride(0), taus.stride(1),
        on.stride(0), on.stride(1),
        BLOCK_M=block_m, BLOCK_R=_pow2(R), BLOCK_N=min(128, _pow2(max(output_slices))), HAS_KEPT=kept is not None,
        EPS_SQ=EPS * EPS, TINY=_TINY,
    )
    return on


def _expand(output: Tensor, h: Tensor, lora_b: Sequence[Tensor], on: Tensor, sorted_idx: Tensor, counts: Tensor,
            starts: Tensor, output_slices: Sequence[int]) -> None:
    S, T, R = h.shape
    if T == 0:
        return
    block_m, max_n = _block_m(T), max(output_slices)
    block_n = min(128, _pow2(max_n))
    upcast, precision = dot_mode(lora_b[0])
    grid = (triton.cdiv(T, block_m) * triton.cdiv(max_n, block_n), S, counts.numel())
    _expand_kernel[grid](
        h, output, lora_b[0], _b_table(lora_b, output_slices), on, sorted_idx, counts, starts, R, max_n,
        h.stride(0), h.stride(1), h.stride(2), output.stride(0), output.stride(1), on.stride(0), on.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_pow2(R), UPCAST=upcast, PRECISION=precision,
    )


@torch.library.custom_op("tspeft::lora_shrink", mutates_args=())
def lora_shrink(x: Tensor, lora_a: list[Tensor], sorted_idx: Tensor, counts: Tensor, starts: Tensor) -> Tensor:
    """h [S, T, r] fp32 = A_s[slot] x per token (rows of tokens without an adapter: 0)."""
    _check(lora_a, len(lora_a))
    return _shrink(x, lora_a, sorted_idx, counts, starts)


@lora_shrink.register_fake
def _(x, lora_a, sorted_idx, counts, starts):
    return x.new_empty((len(lora_a), x.shape[0], lora_a[0].shape[-2]), dtype=torch.float32)


@torch.library.custom_op("tspeft::lora_gate", mutates_args=("kept",))
def lora_gate(h: Tensor, output: Tensor, lora_b: list[Tensor], grams: Tensor, taus: Tensor, sorted_idx: Tensor,
              counts: Tensor, starts: Tensor, output_slices: list[int], kept: Tensor | None = None) -> Tensor:
    """on [S, T] int8: the gate of each token and slice (0 for tokens without an adapter); adds the
    kept count of each slot into `kept` [L] int64 when given."""
    _check(lora_b, len(output_slices))
    return _gate(h, output, lora_b, grams, taus, sorted_idx, counts, starts, output_slices, kept)


@lora_gate.register_fake
def _(h, output, lora_b, grams, taus, sorted_idx, counts, starts, output_slices, kept=None):
    return h.new_empty(h.shape[:2], dtype=torch.int8)


@torch.library.custom_op("tspeft::gated_expand", mutates_args=("output",))
def gated_expand(output: Tensor, h: Tensor, lora_b: list[Tensor], on: Tensor, sorted_idx: Tensor, counts: Tensor,
                 starts: Tensor, output_slices: list[int]) -> None:
    """output[t, slice s] += B_s[slot] h[s, t] where on[s, t] (in place)."""
    _check(lora_b, len(output_slices))
    _expand(output, h, lora_b, on, sorted_idx, counts, starts, output_slices)


@gated_expand.register_fake
def _(output, h, lora_b, on, sorted_idx, counts, starts, output_slices):
    return None


@torch.library.custom_op("tspeft::gated_lora", mutates_args=("output", "kept"))
def _gated_lora_op(output: Tensor, x: Tensor, lora_a: list[Tensor], lora_b: list[Tensor], grams: Tensor,
                   taus: Tensor, sorted_idx: Tensor, counts: Tensor, starts: Tensor, output_slices: list[int],
                   kept: Tensor | None = None) -> None:
    _check([*lora_a, *lora_b], 2 * len(output_slices))
    h = _shrink(x, lora_a, sorted_idx, counts, starts)
    on = _gate(h, output, lora_b, grams, taus, sorted_idx, counts, starts, output_slices, kept)
    _expand(output, h, lora_b, on, sorted_idx, counts, starts, output_slices)


@_gated_lora_op.register_fake
def _(output, x, lora_a, lora_b, grams, taus, sorted_idx, counts, starts, output_slices, kept=None):
    return None


def gated_lora_triton(output: Tensor, x: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], grams: Tensor,
                      taus: Tensor, slots: Tensor, output_slices: Sequence[int], kept: Tensor | None = None,
                      segments: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
    """Add the gated LoRA delta to `output` [T, sum(output_slices)] in place, on the device.

    The semantics of `tspeft_rt.kernels.gated_lora.gated_lora`, on vLLM's stacked buffers:
    lora_a[s] [L, 1, r, in], lora_b[s] [L, 1, N_s, r] (scaling folded in), grams [S, L, r, r] fp32,
    taus [S, L] fp32 (0 = keep all; `packed_gate_views` gives both from a `PackedLoRA`), and
    per-token `slots` [T] (-1 = no adapter) instead of host-side groups. `kept` ([L] int64), when
    given, gets the kept (token, slice) updates of each slot added. `segments`:
    `lora_segments(slots, L)` when the caller computes it once per batch for every layer.
    """
    sorted_idx, counts, starts = segments if segments is not None else lora_segments(slots, grams.shape[1])
    _gated_lora_op(output, x, list(lora_a), list(lora_b), grams, taus, sorted_idx, counts, starts,
                   list(output_slices), kept)


def packed_gate_views(gram: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """(grams [S, L, r, r], taus [S, L]) as strided views, no copies, of the packed layout of
    `gated_lora.PackedLoRA`: block-diagonal gram [L, S*r, S*r] and tau [L, S]."""
    L, S = tau.shape
    r = gram.shape[-1] // S
    st0, st1, st2 = gram.stride()
    grams = gram.as_strided((S, L, r, r), (r * (st1 + st2), st0, st1, st2), gram.storage_offset())
    return grams, tau.t()
