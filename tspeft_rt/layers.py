"""Token-gated adapter layers: TS-LoRA and TS-DoRA around a frozen `nn.Linear`.

    base = W0 x + b0
    LoRA:  m = s * B A dropout(x)                                s = alpha / r  (rsLoRA: alpha / sqrt(r))
    DoRA:  m = (c - 1) * (W0 x) + c * s * B A dropout(x)         c = mag / ||W0 + s B A||_row  (norm detached)
    out  = base + g * m,   g = 1[||m|| >= tau * ||base||]  per token (see `tspeft_rt.gate`)

Without a gate (`gated=False`) the layer is plain LoRA/DoRA and equals PEFT's layers, so one runtime
trains the baselines. Parameter names follow PEFT (`lora_A.weight`, `lora_B.weight`,
`lora_magnitude_vector`) so saved adapters map onto PEFT's keys one to one; the threshold is
`token_gate.tau`.

TS-LoRA's backward skips work for gated-off tokens: A, B and the input get gradients from the kept
rows only (gathered, so the cost follows the keep rate); only `B^T dL/dout`, which the tau surrogate
needs for every token, runs over all rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tspeft_rt.gate import gate_keep, log_ratio, row_sq_norm, surrogate_weight, tau_grad


@dataclass
class GateContext:
    """Shared by every gate of one model: which flattened token positions are real (not padding)
    for the statistics, and whether to record them."""

    valid: Tensor | None = None
    collect: bool = True
    collect_ratios: bool = False


@dataclass
class GateStats:
    kept: float = 0.0
    valid: float = 0.0
    density: float = 0.0  # sum_i w_i: -d keep / d log tau, times the token count
    log_ratios: list[Tensor] = field(default_factory=list)


class TokenGate(nn.Module):
    """The learnable threshold tau >= 0 of one adapted module, and its running statistics."""

    def __init__(self, context: GateContext, temperature: float) -> None:
        super().__init__()
        self.tau = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        self.temperature = temperature
        self.context = context
        self.stats = GateStats()

    def record(self, delta_sq: Tensor, base_sq: Tensor) -> None:
        ctx = self.context
        if not ctx.collect:
            return
        valid = ctx.valid if ctx.valid is not None and ctx.valid.numel() == delta_sq.numel() else None
        if valid is not None:
            delta_sq, base_sq = delta_sq[valid], base_sq[valid]
        keep = gate_keep(delta_sq, base_sq, self.tau.detach())
        self.stats.kept += float(keep.sum())
        self.stats.valid += float(keep.numel())
        if self.tau.requires_grad:
            w = surrogate_weight(delta_sq, base_sq, self.tau.detach(), self.temperature)
            self.stats.density += float(w.sum())
        if ctx.collect_ratios:
            self.stats.log_ratios.append(log_ratio(delta_sq, base_sq))

    def reset_stats(self) -> GateStats:
        stats, self.stats = self.stats, GateStats()
        return stats


class _GatedLoraFn(torch.autograd.Function):
    """out = base + g * s * B A x, with the backward of A, B and x on the kept rows only."""

    @staticmethod
    def forward(ctx, x, base, A, B, tau, base_sq, scale, temperature):  # type: ignore[override]
        h = x @ A.t()  # [N, r]
        m = (h @ B.t()) * scale  # [N, out]
        delta_sq = row_sq_norm(m)
        keep = gate_keep(delta_sq, base_sq, tau)
        out = torch.addcmul(base, m.to(base.dtype), keep.unsqueeze(1).to(base.dtype))
        ctx.save_for_backward(x, h, A, B, tau, delta_sq, base_sq)
        ctx.scale, ctx.temperature = scale, temperature
        ctx.mark_non_differentiable(delta_sq)
        return out, delta_sq

    @staticmethod
    def backward(ctx, grad_out, _grad_delta_sq):  # type: ignore[override]
        x, h, A, B, tau, delta_sq, base_sq = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.to(B.dtype)
        keep = gate_keep(delta_sq, base_sq, tau)
        idx = keep.nonzero().squeeze(1)
        grad_tau = None
        if ctx.needs_input_grad[4]:
            gB = g @ B  # [N, r], every token: the surrogate needs <dL/dout_i, m_i> for off tokens too
            w = surrogate_weight(delta_sq, base_sq, tau, ctx.temperature)
            grad_tau = tau_grad(s * (gB * h).sum(-1), w, tau)
            gh = gB.index_select(0, idx) * s
        else:
            gh = g.index_select(0, idx) @ B * s
        # frozen weights (init_adapter with train_weights false) need no gradient: only tau learns
        grad_A = gh.t() @ x.index_select(0, idx) if ctx.needs_input_grad[2] else None
        grad_B = (g.index_select(0, idx).t() @ h.index_select(0, idx)) * s if ctx.needs_input_grad[3] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_zeros(x.shape).index_copy_(0, idx, gh @ A)
        return grad_x, grad_out, grad_A, grad_B, grad_tau, None, None, None


def _lora_fn(x: Tensor) -> type[torch.autograd.Function]:
    """The fused Triton TS-LoRA kernels on CUDA (tspeft_rt.kernels.triton_train), this file's elsewhere."""
    if x.is_cuda:
        from tspeft_rt.kernels import triton_train  # imported lazily: CPU runs never load triton

        if triton_train.HAS_TRITON:
            return triton_train.TritonGatedLoraFn
    return _GatedLoraFn


class _GatedDoraFn(torch.autograd.Function):
    """out = base + g * m with m = (c - 1) * (W0 x) + c * s B A x, c = mag / ||W0 + s B A||_row (detached).
    Like `_GatedLoraFn`, the gradients of A, B, the magnitude and the input come from kept rows only;
    it saves x, A x and W0 x (what PEFT's DoRA saves too), never the delta m."""

    @staticmethod
    def forward(ctx, x, base, A, B, mag, weight_norm, bias, tau, base_sq, scale, temperature):  # type: ignore[override]
        w0x = base.to(A.dtype) if bias is None else base.to(A.dtype) - bias.to(A.dtype)
        h = x @ A.t()  # [N, r]
        c = mag / weight_norm  # [out]
        m = (c - 1) * w0x + c * ((h @ B.t()) * scale)
        delta_sq = row_sq_norm(m)
        keep = gate_keep(delta_sq, base_sq, tau)
        out = torch.addcmul(base, m.to(base.dtype), keep.unsqueeze(1).to(base.dtype))
        ctx.save_for_backward(x, h, w0x, A, B, c, weight_norm, tau, delta_sq, base_sq)
        ctx.scale, ctx.temperature = scale, temperature
        ctx.mark_non_differentiable(delta_sq)
        return out, delta_sq

    @staticmethod
    def backward(ctx, grad_out, _grad_delta_sq):  # type: ignore[override]
        x, h, w0x, A, B, c, weight_norm, tau, delta_sq, base_sq = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.to(B.dtype)
        keep = gate_keep(delta_sq, base_sq, tau)
        idx = keep.nonzero().squeeze(1)
        cB = c.unsqueeze(1) * B  # [out, r]: d m / d h = s diag(c) B
        grad_tau = None
        if ctx.needs_input_grad[7]:
            gcB = g @ cB  # [N, r], every token, for <dL/dout_i, m_i>
            dots = torch.mv(g * w0x, c - 1) + s * (gcB * h).sum(-1)
            w = surrogate_weight(delta_sq, base_sq, tau, ctx.temperature)
            grad_tau = tau_grad(dots, w, tau)
            gh = gcB.index_select(0, idx) * s
        else:
            gh = g.index_select(0, idx) @ cB * s
        gk, hk = g.index_select(0, idx), h.index_select(0, idx)
        grad_A = gh.t() @ x.index_select(0, idx)
        grad_B = ((gk * c).t() @ hk) * s
        grad_mag = (gk * (w0x.index_select(0, idx) + (hk @ B.t()) * s)).sum(0) / weight_norm
        # W0 x is the base output itself, so the kept rows' (c - 1) * W0 x term sends gradient there too
        grad_base = grad_out.index_add(0, idx, (gk * (c - 1)).to(grad_out.dtype))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_zeros(x.shape).index_copy_(0, idx, gh @ A)
        return grad_x, grad_base, grad_A, grad_B, grad_mag, None, None, grad_tau, None, None, None


class _GateFn(torch.autograd.Function):
    """g * m for a precomputed delta m (TS-DoRA with dropout in training): m gets gradient on kept
    rows, tau the surrogate."""

    @staticmethod
    def forward(ctx, m, base_sq, tau, temperature):  # type: ignore[override]
        delta_sq = row_sq_norm(m)
        keep = gate_keep(delta_sq, base_sq, tau)
        ctx.save_for_backward(m, tau, delta_sq, base_sq)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(delta_sq)
        return m * keep.unsqueeze(1).to(m.dtype), delta_sq

    @staticmethod
    def backward(ctx, grad_out, _grad_delta_sq):  # type: ignore[override]
        m, tau, delta_sq, base_sq = ctx.saved_tensors
        keep = gate_keep(delta_sq, base_sq, tau).unsqueeze(1).to(grad_out.dtype)
        grad_tau = None
        if ctx.needs_input_grad[2]:
            w = surrogate_weight(delta_sq, base_sq, tau, ctx.temperature)
            grad_tau = tau_grad((grad_out.float() * m.float()).sum(-1), w, tau)
        return grad_out * keep, None, grad_tau, None


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class GatedLinear(nn.Module):
    """A frozen `nn.Linear` with a LoRA or DoRA adapter, optionally token-gated."""

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        rank: int,
        alpha: float,
        dora: bool,
        gated: bool,
        dropout: float = 0.0,
        use_rslora: bool = False,
        context: GateContext | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.rank, self.alpha, self.dora = rank, alpha, dora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=weight.device)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=weight.device)
        # PEFT's default init: A Kaiming-uniform, B zero, so the adapter starts as the identity.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if dora:
            self.lora_magnitude_vector = nn.Parameter(self._weight_norm().clone())
        self.token_gate = TokenGate(context or GateContext(), temperature) if gated else None
        if self.token_gate is not None:
            self.token_gate.to(weight.device)

    @property
    def gated(self) -> bool:
        return self.token_gate is not None

    def _weight_norm(self) -> Tensor:
        """||W0 + s B A|| per output row, detached (DoRA paper section 4.3)."""
        with torch.no_grad():
            lora_weight = self.lora_B.weight @ self.lora_A.weight
            return torch.linalg.norm(self.base_layer.weight.float() + self.scaling * lora_weight, dim=1)

    def delta(self, x: Tensor, base: Tensor) -> Tensor:
        """m = M(x) for every token, in the adapter's dtype (the ungated update)."""
        xd = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        lora = self.lora_B(self.lora_A(xd)) * self.scaling
        if not self.dora:
            return lora
        c = self.lora_magnitude_vector / self._weight_norm()
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            w0x = base.to(lora.dtype)
            if self.base_layer.bias is not None:
                w0x = w0x - self.base_layer.bias.to(lora.dtype)
        else:  # PEFT applies the base weight to the dropped-out input here
            w0x = F.linear(xd, self.base_layer.weight.to(xd.dtype))
        return (c - 1) * w0x + c * lora

    def forward(self, x: Tensor) -> Tensor:
        base = self.base_layer(x)
        if self.token_gate is None:
            return base + self.delta(x, base).to(base.dtype)
        gate = self.token_gate
        shape = base.shape
        base2 = base.reshape(-1, shape[-1])
        base_sq = row_sq_norm(base2.detach())
        if not self.dora:
            x2 = self.lora_dropout(x.reshape(-1, x.shape[-1]).to(self.lora_A.weight.dtype))
            out, delta_sq = _lora_fn(x2).apply(
                x2, base2, self.lora_A.weight, self.lora_B.weight, gate.tau, base_sq, self.scaling,
                gate.temperature,
            )
        elif isinstance(self.lora_dropout, nn.Identity) or not self.training:
            x2 = x.reshape(-1, x.shape[-1]).to(self.lora_A.weight.dtype)
            out, delta_sq = _GatedDoraFn.apply(
                x2, base2, self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector,
                self._weight_norm(), self.base_layer.bias, gate.tau, base_sq, self.scaling, gate.temperature,
            )
        else:  # DoRA with dropout applies W0 to the dropped-out input (as PEFT does): the generic gate
            m = self.delta(x, base).reshape(-1, shape[-1])
            gated_m, delta_sq = _GateFn.apply(m, base_sq, gate.tau, gate.temperature)
            out = base2 + gated_m.to(base.dtype)
        gate.record(delta_sq.detach(), base_sq)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        kind = ("TS-" if self.gated else "") + ("DoRA" if self.dora else "LoRA")
        return f"{kind}, rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"
