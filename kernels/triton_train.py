"""TS-LoRA training kernels: the fused gated forward in Triton, and a backward on the kept rows.

For one adapted module with `base = W0 x + b` (cuBLAS) and `h = x A^T`, per token i:

    m_i   = s * B h_i                       (rounded to B's dtype, as `_GatedLoraFn` computes it)
    d2_i  = ||m_i||^2,  b2_i = ||base_i||^2 (fp32)
    g_i   = d2_i >= max(tau^2 max(b2_i, EPS^2), TINY * (tau > 0))      tspeft_rt.gate.gate_keep
    out_i = base_i + g_i m_i

`gated_lora_train_forward` does all of it in one kernel: a program owns BLOCK_M rows; a first loop
over the output columns builds m tile by tile for d2 (and b2 when not given), the second recomputes
m (r is small: cheaper than storing it) and writes out. base is read once, m never touches memory.

The backward computes what `_GatedLoraFn.backward` (tspeft_rt/layers.py) computes from the same
saved tensors: grad_base = g = dL/dout; A, B and x get gradients from kept rows only; tau gets the
straight-through surrogate of `tspeft_rt.gate`, which needs gB_i = g_i B for every token:

    gh     = s gB[kept]           grad_A = gh^T x[kept]      grad_B = s g[kept]^T h[kept]
    grad_x = gh A on kept rows, 0 elsewhere

Two ways to the same sums, chosen by the kept fraction k (read on the host, which training affords):
compacting the kept rows first (`index_select`, as `_GatedLoraFn` does), or zeroing the off rows of
the small [N, r] factors (gh, s h) and running the matmuls over all rows. Rank-r matmuls are
memory-bound: counting passes over an [N, in/out] tensor, compaction costs about 2 (gB; the zeroed
grad_x) + 4.5 k (copies, matmuls, scatter), masking 4 with no copies, so compaction pays below
k ~ 0.4: `GATHER_BELOW_KEEP` (tools/gpu_check.py times both on the GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tspeft_rt.gate import _TINY, EPS, gate_keep, surrogate_weight, tau_grad
from tspeft_rt.kernels.triton_gated_lora import dot_mode

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

GATHER_BELOW_KEEP = 0.4
"""Backward: gather the kept rows when fewer than this fraction of tokens is kept, else mask."""

if HAS_TRITON:

    @triton.jit
    def _delta_tile(h, b_ptr, n, n_ok, R, scale, stride_bo, stride_br,
                    BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """m = s * h B^T for the columns n, in fp32 after rounding as torch does in B's dtype."""
        w_dtype = b_ptr.dtype.element_ty
        r = tl.arange(0, BLOCK_R)
        bt = tl.load(b_ptr + n[None, :] * stride_bo + r[:, None] * stride_br,
                     mask=(r[:, None] < R) & n_ok[None, :], other=0.0)
        if UPCAST:
            bt = bt.to(tl.float32)
        m = tl.dot(h, bt, input_precision=PRECISION).to(w_dtype).to(tl.float32)
        return (m * scale).to(w_dtype).to(tl.float32)

    @triton.jit
    def _forward_kernel(base_ptr, h_ptr, b_ptr, tau_ptr, base_sq_ptr, out_ptr, delta_sq_ptr,
                        N, OUT, R, scale, stride_bm, stride_bn, stride_hm, stride_hr, stride_bo, stride_br,
                        stride_om, stride_on,
                        BASE_SQ_GIVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        EPS_SQ: tl.constexpr, TINY: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        rows = rows.to(tl.int64)
        r = tl.arange(0, BLOCK_R)
        h = tl.load(h_ptr + rows[:, None] * stride_hm + r[None, :] * stride_hr,
                    mask=row_ok[:, None] & (r[None, :] < R), other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
        else:
            h = h.to(b_ptr.dtype.element_ty)
        delta_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        base_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(0, OUT, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < OUT
            m = _delta_tile(h, b_ptr, n, n_ok, R, scale, stride_bo, stride_br, BLOCK_R, UPCAST, PRECISION)
            delta_sq += tl.sum(m * m, axis=1)
            if not BASE_SQ_GIVEN:
                base = tl.load(base_ptr + rows[:, None] * stride_bm + n[None, :] * stride_bn,
                               mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                base_sq += tl.sum(base * base, axis=1)
        if BASE_SQ_GIVEN:
            base_sq = tl.load(base_sq_ptr + rows, mask=row_ok, other=0.0)
        tau = tl.load(tau_ptr)
        keep = delta_sq >= tl.maximum(tau * tau * tl.maximum(base_sq, EPS_SQ), tl.where(tau > 0, TINY, 0.0))
        tl.store(delta_sq_ptr + rows, delta_sq, mask=row_ok)
        for n0 in range(0, OUT, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < OUT
            mask = row_ok[:, None] & n_ok[None, :]
            base = tl.load(base_ptr + rows[:, None] * stride_bm + n[None, :] * stride_bn, mask=mask, other=0.0)
            m = _delta_tile(h, b_ptr, n, n_ok, R, scale, stride_bo, stride_br, BLOCK_R, UPCAST, PRECISION)
            total = base.to(tl.float32) + m.to(base.dtype).to(tl.float32)
            out = tl.where(keep[:, None], total.to(base.dtype), base)
            tl.store(out_ptr + rows[:, None] * stride_om + n[None, :] * stride_on, out, mask=mask)


def gated_lora_train_forward(base: Tensor, h: Tensor, B: Tensor, scale: float, tau: Tensor,
                             base_sq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out [N, out] in base's dtype, delta_sq [N] fp32) for base [N, out], h = x A^T [N, r], B [out, r]
    and tau (a [1] fp32 tensor, read on the device). base_sq [N] fp32 when the caller has it, else the
    kernel computes it. The gate is `gate_keep(delta_sq, base_sq, tau)`, bit for bit."""
    if not HAS_TRITON:
        raise RuntimeError("tspeft-rt: the Triton kernels need the triton package")
    N, OUT = base.shape
    R = h.shape[1]
    out = torch.empty_like(base)
    delta_sq = torch.empty(N, dtype=torch.float32, device=base.device)
    if N == 0:
        return out, delta_sq
    upcast, precision = dot_mode(B)
    block_m = 16 if N <= 2048 else 32 if N <= 32768 else 64
    _forward_kernel[(triton.cdiv(N, block_m),)](
        base, h, B, tau, delta_sq if base_sq is None else base_sq, out, delta_sq, N, OUT, R, float(scale),
        base.stride(0), base.stride(1), h.stride(0), h.stride(1), B.stride(0), B.stride(1),
        out.stride(0), out.stride(1),
        BASE_SQ_GIVEN=base_sq is not None, BLOCK_M=block_m, BLOCK_N=min(128, max(16, triton.next_power_of_2(OUT))),
        BLOCK_R=max(16, triton.next_power_of_2(R)), UPCAST=upcast, PRECISION=precision, EPS_SQ=EPS * EPS, TINY=_TINY,
    )
    return out, delta_sq


class TritonGatedLoraFn(torch.autograd.Function):
    """`_GatedLoraFn` of tspeft_rt.layers with the fused Triton forward: same arguments, same outputs,
    same gradients (up to summation order)."""

    @staticmethod
    def forward(ctx, x, base, A, B, tau, base_sq, scale, temperature):  # type: ignore[override]
        h = x @ A.t()  # [N, r]
        out, delta_sq = gated_lora_train_forward(base, h, B, scale, tau, base_sq)
        ctx.save_for_backward(x, h, A, B, tau, delta_sq, base_sq)
        ctx.scale, ctx.temperature = scale, temperature
        ctx.mark_non_differentiable(delta_sq)
        return out, delta_sq

    @staticmethod
    def backward(ctx, grad_out, _grad_delta_sq):  # type: ignore[override]
        x, h, A, B, tau, delta_sq, base_sq = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.to(B.dtype)
        keep = gate_keep(delta_sq, base_sq, tau)  # the forward kernel's gate, bit for bit
        gB = grad_tau = None
        if ctx.needs_input_grad[4]:
            gB = g @ B  # [N, r], every token: the surrogate needs <dL/dout_i, m_i> for off tokens too
            w = surrogate_weight(delta_sq, base_sq, tau, ctx.temperature)
            grad_tau = tau_grad(s * (gB * h).sum(-1), w, tau)
        kept = int(keep.sum())
        if kept < GATHER_BELOW_KEEP * keep.numel():
            idx = keep.nonzero().squeeze(1)
            gk = g.index_select(0, idx)
            gh = (gk @ B if gB is None else gB.index_select(0, idx)) * s
            grad_A = gh.t() @ x.index_select(0, idx)
            grad_B = (gk.t() @ h.index_select(0, idx)) * s
            grad_x = x.new_zeros(x.shape).index_copy_(0, idx, gh @ A) if ctx.needs_input_grad[0] else None
        else:
            mask = keep.unsqueeze(1).to(B.dtype) * s  # zero rows drop the off tokens from the sums
            gh = (g @ B if gB is None else gB) * mask
            grad_A = gh.t() @ x
            grad_B = g.t() @ (h * mask)
            grad_x = gh @ A if ctx.needs_input_grad[0] else None
        return grad_x, grad_out, grad_A, grad_B, grad_tau, None, None, None
