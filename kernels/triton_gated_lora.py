"""Gated multi-LoRA for serving in Triton: the device-side twin of `tspeft_rt.kernels.gated_lora`.

Same math as the PyTorch path (the oracle in the tests). Tokens are sorted by adapter slot once per
batch (`gated_lora.lora_segments`); per slice s of the layer and slot l, on the rows t of slot l's segment:

    h[s, t]   = A_s[l] x_t                                   shrink, [S, T, r] fp32 (0 for slot -1)
    d2        = h^T G_s[l] h        (G = B^T B, so = ||B h||^2; h rounded to the weights' dtype first,
                                     as the expand and the PyTorch path use it)
    b2        = ||output[t, slice s]||^2                      fp32
    on[s, t]  = d2 >= max(tau^2 max(b2, EPS^2), TINY * (tau > 0))       tspeft_rt.gate.gate_keep
    output[t, slice s] += B_s[l] h[s, t]        only where on

tau = 0 keeps every token (plain LoRA); slot -1 (no adapter) is never on; tau < 0 (`UNCOVERED`: the
slot's adapter has no weights for the slice) is neither routed, read, written nor counted.

DoRA (`scale` [L, sum N] fp32 given: c per slot and output column, 1 for LoRA slots; `bias` the bias the
base output includes): the delta is (c - 1) * (output - bias) + c * B h, and the gate reads its norm
directly, a tile of columns at a time (the expand's dot, B from L2), instead of the Gram form.

Two kernels. The shrink (split over K for decode-sized batches) writes h. The gated expand fuses the
gate into the expand: a program takes BLOCK_M rows of one slot's segment and one slice, reads those
output rows once for their norms (skipped at tau = 0, where every row is kept), decides, and then
adds the delta to the kept rows only, so an off row is read once and never written. The byte budget
per token is about x + out + (1 - skip) out against dense LoRA's x + 2 out (the second read of a
kept row comes from L2: a program re-reads the rows it has just read). A program must own whole
rows of its slice, since its norms would otherwise see columns another program already updated, so
batches with too few row tiles to fill the GPU (`expand_tiles`: decode) run the same kernel twice:
first the gate alone (norms, decisions into `on`), then the expand with each slice's columns split
over several programs. There the norm read is small beside the weights every program reads anyway.

Everything stays on the device: no host synchronisation, no branching on tensor data in Python, and
every launch grid depends only on shapes, max_loras and block sizes, so the ops can be captured in
CUDA graphs. They are torch custom ops (`torch.ops.tspeft.*`, with fake implementations), so Dynamo
treats them as opaque. Grid: (row tiles x column chunks, slices, slots); a program exits at once when
its tile lies past its slot's segment (as vLLM's punica kernels do) and, in the expand, when none of
its rows is on.

The per-slice weight pointers travel in small int64 tables (`LoRAWeights`), built once for a set of
weight buffers (vLLM allocates a layer's buffers once and copies each adapter into them), never
inside a forward. Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tspeft_rt.gate import _TINY, EPS

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the module still imports (the CPU serving path never needs it)
    HAS_TRITON = False

TARGET_PROGRAMS = 256
"""Programs the split expand aims to launch per slot: about two per SM of an H100/H200 (132 SMs)."""
FUSE_MIN_TILES = 64
"""Row tiles x slices from which the gate and the expand run fused, one program per row tile and
slice (fewer: the gate first, then the expand with the columns split)."""


@dataclass(frozen=True)
class LoRAWeights:
    """A layer's stacked LoRA buffers, lora_a[s] [L, 1, r, in] and lora_b[s] [L, 1, N_s, r] (vLLM's
    layout, scaling folded into B), with the pointer tables the kernels read them through:
    a_table [S, 4] (pointer, strides of slot, rank row, input column) and b_table [S, 6] (pointer,
    strides of slot, output row, rank column; width N_s, column offset). Build once per set of
    buffers (`from_buffers`): the tables hold their addresses."""

    lora_a: list[Tensor]
    lora_b: list[Tensor]
    output_slices: list[int]
    a_table: Tensor
    b_table: Tensor

    @classmethod
    def from_buffers(cls, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
                     output_slices: Sequence[int]) -> LoRAWeights:
        if not (len(lora_a) == len(lora_b) == len(output_slices)):
            raise ValueError(f"tspeft-rt: {len(lora_a)} A and {len(lora_b)} B buffers for "
                             f"{len(output_slices)} slices")
        if any(w.dtype != lora_a[0].dtype for w in (*lora_a, *lora_b)):
            raise ValueError("tspeft-rt: the LoRA A and B buffers must share one dtype")
        a_rows = [[a.data_ptr(), a.stride(0), a.stride(-2), a.stride(-1)] for a in lora_a]
        b_rows, offset = [], 0
        for b, n in zip(lora_b, output_slices):
            b_rows.append([b.data_ptr(), b.stride(0), b.stride(-2), b.stride(-1), n, offset])
            offset += n
        device = lora_a[0].device
        return cls(list(lora_a), list(lora_b), list(output_slices),
                   torch.tensor(a_rows, dtype=torch.int64, device=device),
                   torch.tensor(b_rows, dtype=torch.int64, device=device))


def dot_mode(w: Tensor) -> tuple[bool, str]:
    """(upcast the dot operands to fp32, input precision) for weights `w`. fp16/bf16 run on tensor
    cores as they are; fp32 as 3xTF32 (about fp32 accuracy). The interpreter (CPU) has no bf16 dot:
    fp32 operands there."""
    if w.device.type != "cuda":
        return True, "ieee"
    return (True, "tf32x3") if w.dtype == torch.float32 else (False, "tf32")


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _block_m(num_tokens: int, wide: bool) -> int:
    """Rows per program: small tiles for decode-sized batches, larger for prefill (fewer when wide)."""
    return 16 if num_tokens <= 16 else 32 if num_tokens <= 128 or wide else 64


def _wide(rank: int, dtype: torch.dtype) -> bool:
    """Rank 64 and up, or fp32 weights: tiles that take twice the registers."""
    return _pow2(rank) >= 64 or dtype == torch.float32


@dataclass(frozen=True)
class ShrinkTiles:
    block_m: int
    block_r: int
    block_k: int
    split_k: int
    num_warps: int


@dataclass(frozen=True)
class ExpandTiles:
    block_m: int
    block_r: int
    block_n: int
    chunk_n: int  # columns per expand program: the widest slice when the gate is fused
    fused: bool
    num_warps: int


# Block sizes and warps depend on the shape alone (so a CUDA graph sees one launch per shape). They
# were chosen with `tools/kernel_report.py` (ptxas registers and spills for sm_90a and sm_80): at
# rank 64 or fp32, fewer rows per program and more warps, so the tiles fit in registers; 64-column
# expand tiles (128 took 251 of 255 registers at rank 16, one 8-warp program per SM).


def shrink_tiles(num_tokens: int, in_features: int, num_slices: int, rank: int, dtype: torch.dtype) -> ShrinkTiles:
    wide = _wide(rank, dtype)
    block_m, block_k = _block_m(num_tokens, wide), min(64 if wide else 128, _pow2(in_features))
    # Decode-sized batches have too few row tiles to fill the GPU: split K across programs instead.
    m_tiles = triton.cdiv(num_tokens, block_m)
    split_k = max(1, min(16, 128 // (m_tiles * num_slices), triton.cdiv(in_features, block_k)))
    return ShrinkTiles(block_m, _pow2(rank), block_k, split_k, 8 if wide and block_m >= 32 else 4)


def expand_tiles(num_tokens: int, output_slices: Sequence[int], rank: int, dtype: torch.dtype) -> ExpandTiles:
    wide = _wide(rank, dtype)
    block_m, max_n = _block_m(num_tokens, wide), max(output_slices)
    block_n = min(64, _pow2(max_n))
    n_blocks, tiles = triton.cdiv(max_n, block_n), triton.cdiv(num_tokens, block_m) * len(output_slices)
    # Few row tiles (decode): the columns of each slice are split over more programs.
    chunks = 1 if tiles >= FUSE_MIN_TILES else min(n_blocks, triton.cdiv(TARGET_PROGRAMS, tiles))
    return ExpandTiles(block_m, _pow2(rank), block_n, triton.cdiv(n_blocks, chunks) * block_n, chunks == 1,
                       8 if wide or block_m >= 64 else 4)


if HAS_TRITON:

    @triton.jit
    def _segment_rows(sorted_ptr, starts_ptr, count, tile, slot, BLOCK_M: tl.constexpr):
        """The token rows of tile `tile` of slot `slot`'s segment (`count` tokens), and their mask."""
        m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = m < count
        rows = tl.load(sorted_ptr + tl.load(starts_ptr + slot) + m, mask=row_ok, other=0).to(tl.int64)
        return rows, row_ok

    @triton.jit
    def _shrink_kernel(x_ptr, a_ref, a_tab, h_ptr, taus_ptr, sorted_ptr, counts_ptr, starts_ptr,
                       K, R, stride_xt, stride_xk, stride_hs, stride_ht, stride_hr, stride_ts, stride_tl,
                       BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        pid, s, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        tile, split = pid // SPLIT_K, pid % SPLIT_K
        count = tl.load(counts_ptr + slot)
        # Past the slot's segment (most programs when few slots are active), or a slice the slot's
        # adapter does not cover (tau < 0: h stays 0).
        if (tile * BLOCK_M >= count) | (tl.load(taus_ptr + s * stride_ts + slot * stride_tl) < 0):
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
    def _dora_delta(out, h, b_ptr, stride_bn, stride_br, scale_ptr, bias_ptr, n, n_ok, r, r_ok, w_dtype,
                    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """DoRA's delta [BLOCK_M, BLOCK_N] fp32 on columns n of base output tile `out`:
        (c - 1) * (out - bias) + c * B h, B h rounded to the weights' dtype as in the LoRA expand."""
        bt = tl.load(b_ptr + n[None, :] * stride_bn + r[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0)
        if UPCAST:
            bt = bt.to(tl.float32)
        d = tl.dot(h, bt, input_precision=PRECISION).to(w_dtype).to(tl.float32)
        c = tl.load(scale_ptr + n, mask=n_ok, other=1.0)[None, :]
        w0x = out.to(tl.float32)
        if HAS_BIAS:
            w0x -= tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        return (c - 1.0) * w0x + c * d

    @triton.jit
    def _gated_expand_kernel(h_ptr, out_ptr, w_ref, b_tab, grams_ptr, taus_ptr, counters_ptr, on_ptr,
                             scale_ptr, bias_ptr, sorted_ptr, counts_ptr, starts_ptr, R, MAX_N, CHUNK_N,
                             stride_hs, stride_ht, stride_hr, stride_ot, stride_oc,
                             stride_gs, stride_gl, stride_gr, stride_gc, stride_ts, stride_tl, stride_cn,
                             stride_ons, stride_ont, stride_scl,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                             GATE: tl.constexpr, EXPAND: tl.constexpr, HAS_COUNTERS: tl.constexpr,
                             HAS_ON: tl.constexpr, DORA: tl.constexpr, HAS_BIAS: tl.constexpr,
                             UPCAST: tl.constexpr, PRECISION: tl.constexpr, EPS_SQ: tl.constexpr,
                             TINY: tl.constexpr):
        """GATE: decide (counters, `on`); else read the decisions from `on`. EXPAND: add the kept deltas.
        Both (fused): each program owns whole rows of its slice (CHUNK_N >= every slice width)."""
        pid, s, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_chunks = tl.cdiv(MAX_N, CHUNK_N)
        tile, chunk = pid // n_chunks, pid % n_chunks
        count, n_s = tl.load(counts_ptr + slot), tl.load(b_tab + s * 6 + 4).to(tl.int32)
        tau = tl.load(taus_ptr + s * stride_ts + slot * stride_tl)
        col0 = chunk * CHUNK_N
        # Past the segment or the slice, or a slice the slot's adapter does not cover (tau < 0).
        if (tile * BLOCK_M >= count) | (col0 >= n_s) | (tau < 0):
            return
        rows, row_ok = _segment_rows(sorted_ptr, starts_ptr, count, tile, slot, BLOCK_M)
        w_dtype = w_ref.dtype.element_ty
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        h = tl.load(h_ptr + s * stride_hs + rows[:, None] * stride_ht + r[None, :] * stride_hr,
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(w_dtype)
        offset = tl.load(b_tab + s * 6 + 5)
        out_rows = out_ptr + rows[:, None] * stride_ot
        b_ptr = tl.load(b_tab + s * 6).to(tl.pointer_type(w_dtype)) + slot * tl.load(b_tab + s * 6 + 1)
        stride_bn, stride_br = tl.load(b_tab + s * 6 + 2), tl.load(b_tab + s * 6 + 3)
        scale_ptr += slot * stride_scl + offset  # DoRA: this slot's c over this slice's columns
        bias_ptr += offset
        hx = h  # the dot operand
        if UPCAST:
            hx = h.to(tl.float32)
        if GATE:
            on = row_ok
            if tau != 0.0:  # tau = 0 (plain LoRA) keeps every row: the base is not read for a norm
                base_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
                if DORA:
                    delta_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
                else:
                    hf = h.to(tl.float32)
                    g = tl.load(grams_ptr + s * stride_gs + slot * stride_gl + r[:, None] * stride_gr
                                + r[None, :] * stride_gc, mask=r_ok[:, None] & r_ok[None, :], other=0.0)
                    delta_sq = tl.sum(tl.dot(hf, g, input_precision="ieee") * hf, axis=1)
                for n0 in range(0, n_s, BLOCK_N):
                    n = n0 + tl.arange(0, BLOCK_N)
                    n_ok = n < n_s
                    base = tl.load(out_rows + (offset + n)[None, :] * stride_oc,
                                   mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                    base_sq += tl.sum(base * base, axis=1)
                    if DORA:
                        delta = _dora_delta(base, hx, b_ptr, stride_bn, stride_br, scale_ptr, bias_ptr, n, n_ok, r,
                                            r_ok, w_dtype, HAS_BIAS, UPCAST, PRECISION)
                        delta_sq += tl.sum(delta * delta, axis=1)
                threshold = tl.maximum(tau * tau * tl.maximum(base_sq, EPS_SQ), tl.where(tau > 0, TINY, 0.0))
                on = row_ok & (delta_sq >= threshold)
            if HAS_COUNTERS:  # counters [2, L]: (token, slice) updates routed, and kept
                tl.atomic_add(counters_ptr + slot, tl.sum(row_ok.to(tl.int64), axis=0))
                tl.atomic_add(counters_ptr + stride_cn + slot, tl.sum(on.to(tl.int64), axis=0))
            if HAS_ON:
                tl.store(on_ptr + s * stride_ons + rows * stride_ont, on.to(tl.int8), mask=row_ok)
        else:
            on = tl.load(on_ptr + s * stride_ons + rows * stride_ont, mask=row_ok, other=0) != 0
        if not EXPAND:
            return
        if tl.max(on.to(tl.int32), axis=0) == 0:  # every row gated off: nothing to write
            return
        col_end = tl.minimum(col0 + CHUNK_N, n_s)
        for n0 in range(col0, col_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < col_end
            out_ptrs = out_rows + (offset + n)[None, :] * stride_oc
            mask = on[:, None] & n_ok[None, :]
            out = tl.load(out_ptrs, mask=mask, other=0.0)
            if DORA:
                delta = _dora_delta(out, hx, b_ptr, stride_bn, stride_br, scale_ptr, bias_ptr, n, n_ok, r, r_ok,
                                    w_dtype, HAS_BIAS, UPCAST, PRECISION)
            else:
                bt = tl.load(b_ptr + n[None, :] * stride_bn + r[:, None] * stride_br,
                             mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    bt = bt.to(tl.float32)
                delta = tl.dot(hx, bt, input_precision=PRECISION).to(w_dtype)  # the delta in the weights' dtype
            total = out.to(tl.float32) + delta.to(out.dtype).to(tl.float32)
            tl.store(out_ptrs, total.to(out.dtype), mask=mask)


def _require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("tspeft-rt: the Triton kernels need the triton package")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: `kernel[grid](*args, **meta)`. `tools/kernel_report.py` compiles the same
    launches ahead of time for a GPU target."""

    kernel: object
    grid: tuple[int, int, int]
    args: tuple
    meta: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)


def shrink_launch(h: Tensor, x: Tensor, lora_a: Sequence[Tensor], a_table: Tensor, taus: Tensor,
                  sorted_idx: Tensor, counts: Tensor, starts: Tensor) -> Launch:
    """The shrink into the zeroed h [S, T, r] fp32."""
    S, T, R = h.shape
    t = shrink_tiles(T, x.shape[1], S, R, lora_a[0].dtype)
    upcast, precision = dot_mode(lora_a[0])
    return Launch(_shrink_kernel, (triton.cdiv(T, t.block_m) * t.split_k, S, counts.numel()),
                  (x, lora_a[0], a_table, h, taus, sorted_idx, counts, starts, x.shape[1], R,
                   x.stride(0), x.stride(1), h.stride(0), h.stride(1), h.stride(2), *taus.stride()),
                  dict(BLOCK_M=t.block_m, BLOCK_R=t.block_r, BLOCK_K=t.block_k, SPLIT_K=t.split_k, UPCAST=upcast,
                       PRECISION=precision, num_warps=t.num_warps))


def gated_expand_launches(output: Tensor, h: Tensor, lora_b: Sequence[Tensor], b_table: Tensor, grams: Tensor,
                          taus: Tensor, sorted_idx: Tensor, counts: Tensor, starts: Tensor,
                          output_slices: Sequence[int], counters: Tensor | None, on: Tensor | None,
                          scale: Tensor | None = None, bias: Tensor | None = None) -> list[Launch]:
    """The gate and the expand into `output`: one fused launch, or the gate and then the expand with
    the columns split (module docstring). `scale` (and `bias`): DoRA."""
    S, T, R = h.shape
    t = expand_tiles(T, output_slices, R, lora_b[0].dtype)
    if not t.fused and on is None:
        on = torch.empty((S, T), dtype=torch.int8, device=h.device)
    max_n = max(output_slices)
    upcast, precision = dot_mode(lora_b[0])
    m_tiles = triton.cdiv(T, t.block_m)

    def args(chunk_n: int) -> tuple:
        return (h, output, lora_b[0], b_table, grams, taus, h if counters is None else counters,
                h if on is None else on, h if scale is None else scale, h if bias is None else bias,
                sorted_idx, counts, starts, R, max_n, chunk_n,
                h.stride(0), h.stride(1), h.stride(2), output.stride(0), output.stride(1),
                *grams.stride(), *taus.stride(), 0 if counters is None else counters.stride(0),
                *(on.stride() if on is not None else (0, 0)), 0 if scale is None else scale.stride(0))

    meta = dict(BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_R=t.block_r, HAS_COUNTERS=counters is not None,
                HAS_ON=on is not None, DORA=scale is not None, HAS_BIAS=bias is not None, UPCAST=upcast,
                PRECISION=precision, EPS_SQ=EPS * EPS, TINY=_TINY, num_warps=t.num_warps)
    whole_rows = (m_tiles, S, counts.numel())
    if t.fused:
        return [Launch(_gated_expand_kernel, whole_rows, args(max_n), dict(meta, GATE=True, EXPAND=True))]
    split = (m_tiles * triton.cdiv(max_n, t.chunk_n), S, counts.numel())
    return [Launch(_gated_expand_kernel, whole_rows, args(max_n), dict(meta, GATE=True, EXPAND=False)),
            Launch(_gated_expand_kernel, split, args(t.chunk_n), dict(meta, GATE=False, EXPAND=True, HAS_COUNTERS=False))]


def _shrink(x: Tensor, lora_a: Sequence[Tensor], a_table: Tensor, taus: Tensor, sorted_idx: Tensor,
            counts: Tensor, starts: Tensor) -> Tensor:
    h = torch.zeros((len(lora_a), x.shape[0], lora_a[0].shape[-2]), dtype=torch.float32, device=x.device)
    if x.shape[0]:
        shrink_launch(h, x, lora_a, a_table, taus, sorted_idx, counts, starts)()
    return h


def _gated_expand(output: Tensor, h: Tensor, lora_b: Sequence[Tensor], b_table: Tensor, grams: Tensor, taus: Tensor,
                  sorted_idx: Tensor, counts: Tensor, starts: Tensor, output_slices: Sequence[int],
                  counters: Tensor | None, on: Tensor | None, scale: Tensor | None, bias: Tensor | None) -> None:
    if h.shape[1]:
        for launch in gated_expand_launches(output, h, lora_b, b_table, grams, taus, sorted_idx, counts, starts,
                                            output_slices, counters, on, scale, bias):
            launch()


@torch.library.custom_op("tspeft::lora_shrink", mutates_args=())
def lora_shrink(x: Tensor, lora_a: list[Tensor], a_table: Tensor, taus: Tensor, sorted_idx: Tensor,
                counts: Tensor, starts: Tensor) -> Tensor:
    """h [S, T, r] fp32 = A_s[slot] x per token (0 for tokens without an adapter and for slices their
    slot does not cover, taus [S, L] < 0)."""
    _require_triton()
    return _shrink(x, lora_a, a_table, taus, sorted_idx, counts, starts)


@lora_shrink.register_fake
def _(x, lora_a, a_table, taus, sorted_idx, counts, starts):
    return x.new_empty((len(lora_a), x.shape[0], lora_a[0].shape[-2]), dtype=torch.float32)


@torch.library.custom_op("tspeft::gated_expand", mutates_args=("output", "counters", "on"))
def gated_expand(output: Tensor, h: Tensor, lora_b: list[Tensor], b_table: Tensor, grams: Tensor, taus: Tensor,
                 sorted_idx: Tensor, counts: Tensor, starts: Tensor, output_slices: list[int],
                 counters: Tensor | None, on: Tensor | None, scale: Tensor | None = None,
                 bias: Tensor | None = None) -> None:
    """The gate and the expand fused: output[t, slice s] += B_s[slot] h[s, t] where the gate keeps
    (token t, slice s), in place. `counters` [2, L] int64, when given, gets each slot's routed and kept
    (token, slice) updates added; `on` [S, T] int8, when given, gets the decisions of the tokens with
    an adapter (tests, checks); `scale` [L, sum N] fp32 (and the base's `bias`): DoRA's delta.
    The mutated optional arguments have no default: torch < 2.13 bumps the version of each mutated
    argument by position without filling defaults first, so an omitted one raises IndexError."""
    _require_triton()
    _gated_expand(output, h, lora_b, b_table, grams, taus, sorted_idx, counts, starts, output_slices, counters, on,
                  scale, bias)


@gated_expand.register_fake
def _(output, h, lora_b, b_table, grams, taus, sorted_idx, counts, starts, output_slices, counters, on, scale=None,
      bias=None):
    return None


@torch.library.custom_op("tspeft::gated_lora", mutates_args=("output", "counters"))
def _gated_lora_op(output: Tensor, x: Tensor, lora_a: list[Tensor], lora_b: list[Tensor], a_table: Tensor,
                   b_table: Tensor, grams: Tensor, taus: Tensor, sorted_idx: Tensor, counts: Tensor, starts: Tensor,
                   output_slices: list[int], counters: Tensor | None, scale: Tensor | None = None,
                   bias: Tensor | None = None) -> None:
    _require_triton()
    h = _shrink(x, lora_a, a_table, taus, sorted_idx, counts, starts)
    _gated_expand(output, h, lora_b, b_table, grams, taus, sorted_idx, counts, starts, output_slices, counters, None,
                  scale, bias)


@_gated_lora_op.register_fake
def _(output, x, lora_a, lora_b, a_table, b_table, grams, taus, sorted_idx, counts, starts, output_slices,
      counters, scale=None, bias=None):
    return None


def gated_lora_triton(output: Tensor, x: Tensor, weights: LoRAWeights, grams: Tensor, taus: Tensor,
                      segments: tuple[Tensor, Tensor, Tensor], counters: Tensor | None = None,
                      scale: Tensor | None = None, bias: Tensor | None = None) -> None:
    """Add the gated LoRA delta to `output` [T, sum(output_slices)] in place, on the device.

    The semantics of `tspeft_rt.kernels.gated_lora.gated_lora`, on vLLM's stacked buffers (`weights`),
    grams [S, L, r, r] fp32 and taus [S, L] fp32 (0 = keep all, < 0 = not covered; `packed_gate_views`
    gives both from a `PackedLoRA`), and the batch's `segments` (`gated_lora.lora_segments` of the per-token slots,
    computed once per batch for every layer). `counters` ([2, L] int64), when given, gets each slot's routed and
    kept (token, slice) updates added. `scale` [L, sum N] fp32 and `bias` [sum N] or None: DoRA
    (`PackedLoRA.scale`, `.bias`).
    """
    _gated_lora_op(output, x, weights.lora_a, weights.lora_b, weights.a_table, weights.b_table, grams, taus,
                   *segments, weights.output_slices, counters, scale, bias)


def packed_gate_views(gram: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
    """(grams [S, L, r, r], taus [S, L]) as strided views, no copies, of the packed layout of
    `gated_lora.PackedLoRA`: block-diagonal gram [L, S*r, S*r] and tau [L, S]."""
    L, S = tau.shape
    r = gram.shape[-1] // S
    st0, st1, st2 = gram.stride()
    grams = gram.as_strided((S, L, r, r), (r * (st1 + st2), st0, st1, st2), gram.storage_offset())
    return grams, tau.t()
