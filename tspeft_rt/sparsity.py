"""Learning the thresholds: sparsity control and the proximal tau step (method.md section 2).

Objective, per optimizer step, with keep_l the kept fraction of module l:

    L(theta, tau) = L_task(theta, tau) + lambda * sum_l keep_l

- `L_task`'s surrogate gradient reaches each tau through autograd (`tspeft_rt.gate.tau_grad`).
- `d keep_l / d log tau_l = -rho_l`, rho_l = mean_i sigma'(z_i)/T, comes from the gates' statistics.
- The smooth step is taken in u = log tau, where every module's step has the same scale even though
  their ratios r differ by orders of magnitude:
      u_l <- u_l + clip(-tau_lr * (tau_l * dL_task/dtau_l - lambda * rho_l), -tau_max_step, tau_max_step)
  and the proximal operator of the constraint tau >= 0 is the identity in this parametrisation
  (tau = exp(u) > 0); tau = 0 exactly is the dense layer, used during warm-up.
- Target mode: lambda is a PI controller on the kept fraction (a PID-Lagrangian, Stooke et al. 2020):
      e = keep - (1 - target_skip),   lambda = lambda_I + lambda_p * e,   lambda_I += lambda_lr * e
  keep = mean_l keep_l over the global batch. Plain dual ascent (the I term alone, clipped at 0)
  drives a double integrator (lambda integrates e, tau integrates lambda): measured on SmolLM2 it
  overshot to 90% skip and stayed there. The P term damps it, and lambda_I may go negative so that
  the target is held from both sides. Fixed mode: lambda = sparsity_lambda.
- Gating starts after `tau_warmup_steps` (tau = 0 until then so that B leaves zero); each tau then
  starts at the `tau_init_quantile` quantile of its module's ratios, so the surrogate is well scaled
  from its first step.

All statistics are summed over gradient-accumulation micro-batches and over processes, so one
process and N processes with the same global batch take the same step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from tspeft_rt.layers import TokenGate


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ThresholdController:
    """Owns every tau of a model: lambda, the tau step, and the keep-rate window for logs/export."""

    def __init__(self, gates: dict[str, TokenGate], cfg) -> None:
        self.gates = gates
        self.cfg = cfg
        self.lam_i = float(cfg.sparsity_lambda)  # the integral part in target mode
        self.lam = self.lam_i
        n = len(gates)
        self.window = torch.zeros(n, 2, dtype=torch.float64)  # kept, valid since the last log
        self.last_keep = torch.ones(n, dtype=torch.float64)
        self.last_quantiles: dict[str, dict[str, float]] = {}

    @property
    def target_keep(self) -> float | None:
        return None if self.cfg.target_skip is None else 1.0 - float(self.cfg.target_skip)

    def init_quantile(self) -> float:
        q = self.cfg.tau_init_quantile
        if q is None:
            q = self.cfg.target_skip if self.cfg.target_skip is not None else 0.05
        return float(q)

    def wants_ratios(self, step: int) -> bool:
        """Whether this step's forward must record the log-ratios (the step where gating starts)."""
        return bool(self.gates) and step == self.cfg.tau_warmup_steps

    @torch.no_grad()
    def step(self, step: int) -> dict:
        """Update lambda and every tau after the backward of optimizer step `step` (0-based)."""
        if not self.gates:
            return {}
        gates = list(self.gates.values())
        stats = [g.reset_stats() for g in gates]
        t = torch.tensor([[s.kept, s.valid, s.density] for s in stats], dtype=torch.float64)
        if _distributed():
            dist.all_reduce(t)
        valid = t[:, 1].clamp_min(1.0)
        keep_l, rho_l = t[:, 0] / valid, t[:, 2] / valid
        self.window += t[:, :2]
        self.last_keep = keep_l
        keep = float(keep_l.mean())
        self._record_quantiles(stats)
        if step == self.cfg.tau_warmup_steps:
            self._start_gating(stats)
        elif step > self.cfg.tau_warmup_steps:
            if self.target_keep is not None:
                err = keep - self.target_keep
                self.lam = self.lam_i + self.cfg.lambda_p * err
                self.lam_i += self.cfg.lambda_lr * err
            self._tau_step(gates, rho_l)
        for g in gates:
            g.tau.grad = None
        return {"skip": 1.0 - keep, "lambda": self.lam}

    def _record_quantiles(self, stats) -> None:
        """Quantiles of r per module (this process's tokens), for the gate statistics log."""
        qs = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        for name, s in zip(self.gates, stats):
            if s.log_ratios:
                r = torch.cat(s.log_ratios).double().exp()
                if r.numel():
                    self.last_quantiles[name] = dict(zip(("r_q10", "r_q50", "r_q90"), torch.quantile(r, qs).tolist()))

    def _start_gating(self, stats) -> None:
        q = self.init_quantile()
        for gate, s in zip(self.gates.values(), stats):
            ratios = torch.cat(s.log_ratios) if s.log_ratios else torch.empty(0)
            if _distributed():
                parts = [None] * dist.get_world_size()
                dist.all_gather_object(parts, ratios)
                ratios = torch.cat(parts)
            ratios = ratios[torch.isfinite(ratios)]
            if ratios.numel():
                gate.tau.fill_(math.exp(float(torch.quantile(ratios.double(), q))))

    def _tau_step(self, gates: list[TokenGate], rho_l: torch.Tensor) -> None:
        limit = self.cfg.tau_max_step
        for gate, rho in zip(gates, rho_l.tolist()):
            tau = gate.tau
            if float(tau) <= 0.0:
                continue
            task = float(tau) * float(tau.grad) if tau.grad is not None else 0.0
            du = -self.cfg.tau_lr * (task - self.lam * rho)
            tau.mul_(math.exp(max(-limit, min(limit, du))))

    def take_window(self) -> dict[str, float]:
        """Per-module keep rate since the last call (the figure logged and exported)."""
        kept, valid = self.window[:, 0], self.window[:, 1]
        rates = torch.where(valid > 0, kept / valid.clamp_min(1.0), self.last_keep)
        self.window.zero_()
        return dict(zip(self.gates, rates.tolist()))

    def state_dict(self) -> dict:
        return {"lam": self.lam, "lam_i": self.lam_i, "window": self.window.clone(), "last_keep": self.last_keep.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])
        self.lam_i = float(state["lam_i"])
        self.window = state["window"].clone()
        self.last_keep = state["last_keep"].clone()
