"""The token gate of TS-PEFT: the one place its math lives.

For one adapted module with frozen output `base_i = W0 x_i + b0` and PEFT delta `m_i = M(x_i)`:

    r_i = ||m_i|| / max(||base_i||, eps)
    g_i = 1[r_i >= tau]                    evaluated as ||m_i||^2 >= tau^2 max(||base_i||, eps)^2, fp32
    h_i = base_i + g_i * m_i

The hard gate has no gradient in tau. Backward replaces g_i by sigma(z_i) with the log-ratio
z_i = (log r_i - log tau) / T (straight-through), so

    dL/dtau = sum_i <dL/dh_i, m_i> * dsigma(z_i)/dtau = -(1/tau) * sum_i <dL/dh_i, m_i> * w_i,
    w_i     = sigma'(z_i) / T.

A helpful delta (<dL/dh_i, m_i> < 0) pulls tau down, a harmful one pushes it up. The same w_i gives
the surrogate of the kept fraction: d keep / d log tau = -mean_i w_i, which the sparsity
controller (`tspeft_rt.sparsity`) uses. Training, export, reference inference, the vLLM CPU path
and the kernels are all tested against the functions here.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6
"""Floor of ||base_i|| in the ratio (stored in the exported gate config)."""
_TINY = torch.finfo(torch.float32).tiny


def gate_keep(delta_sq: Tensor, base_sq: Tensor, tau: Tensor | float) -> Tensor:
    """g_i as a bool tensor from the squared norms [N] (fp32) and tau >= 0, without division."""
    tau = torch.as_tensor(tau, dtype=torch.float32, device=delta_sq.device)
    return keep_from_thresholds(delta_sq, base_sq, *gate_thresholds(tau))


def gate_thresholds(tau: Tensor) -> tuple[Tensor, Tensor]:
    """(tau^2, floor) for `keep_from_thresholds`; serving precomputes them once per adapter slot."""
    # A tiny tau must not round the threshold to 0 and so keep a zero delta (off for any tau > 0).
    return tau.float().square(), _TINY * (tau > 0).float()


def keep_from_thresholds(delta_sq: Tensor, base_sq: Tensor, tau_sq: Tensor, floor: Tensor) -> Tensor:
    """g_i = ||m_i||^2 >= max(tau^2 max(||base_i||^2, eps^2), floor)."""
    return delta_sq >= (base_sq.clamp_min(EPS * EPS) * tau_sq).clamp_min(floor)


def row_sq_norm(t: Tensor) -> Tensor:
    """||t_i||^2 over the last dimension, in fp32, flattened to [N]."""
    t = t.reshape(-1, t.shape[-1]).float()
    return (t * t).sum(-1)


def log_ratio(delta_sq: Tensor, base_sq: Tensor) -> Tensor:
    """log r_i from the squared norms (-inf for a zero delta)."""
    return 0.5 * (delta_sq.log() - base_sq.clamp_min(EPS * EPS).log())


def surrogate_weight(delta_sq: Tensor, base_sq: Tensor, tau: Tensor, temperature: float) -> Tensor:
    """w_i = sigma'(z_i) / T with z_i = (log r_i - log tau) / T; zero while tau == 0."""
    if float(tau) <= 0.0:
        return torch.zeros_like(delta_sq)
    z = (log_ratio(delta_sq, base_sq) - tau.float().log()) / temperature
    s = torch.sigmoid(z)
    return s * (1 - s) / temperature


def tau_grad(dots: Tensor, weights: Tensor, tau: Tensor) -> Tensor:
    """dL/dtau = -(1/tau) sum_i <dL/dh_i, m_i> w_i, shaped like tau (zero while tau == 0)."""
    if float(tau) <= 0.0:
        return torch.zeros_like(tau)
    return (-(dots.float() * weights).sum() / tau.float()).reshape(tau.shape).to(tau.dtype)
