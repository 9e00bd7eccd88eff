"""Learning the thresholds: sparsity control and the proximal tau step (docs/method.md, "Learning τ").

Objective, per optimizer step, with keep_l the kept fraction of module l:

    L(theta, tau) = L_task(theta, tau) + lambda * sum_l keep_l

- `L_task`'s surrogate gradient reaches each tau through autograd (`tspeft_rt.gate.tau_grad`).
- `d keep_l / d log tau_l = -rho_l`, rho_l = mean_i sigma'(z_i)/T, comes from the gates' statistics.
- The smooth step is taken in u = log tau, where every module's step has the same scale even though
  their ratios r differ by orders of magnitude:
      du_l = -tau_lr * (tau_l * dL_task/dtau_l - lambda * rho_l)
      u_l <- u_l + clip(du_l, -tau_max_step, tau_max_step)
  and the proximal operator of the constraint tau >= 0 is the identity in this parametrisation
  (tau = exp(u) > 0); tau = 0 exactly is the dense layer, used during warm-up.
- Target mode: lambda is a PI controller on the kept fraction (a PID-Lagrangian, Stooke et al. 2020):
      e = keep - (1 - target_skip),   lambda = lambda_I + lambda_p * e,   lambda_I += lambda_lr * e
  keep = mean_l keep_l over the global batch. Plain dual ascent (the I term alone, clipped at 0)
  drives a double integrator (lambda integrates e, tau integrates lambda): measured on SmolLM2 it
  overshot to 90% skip and stayed there. The P term damps it, and lambda_I may go negative so that
  the target is held from both sides. Fixed mode: lambda = sparsity_lambda.
- Anti-windup of lambda_I (target mode). The loop's actuator is the log-tau step of each module,
  limited to +-tau_max_step, and a module with tau_l = 0 or rho_l = 0 does not respond to lambda at
  all. Module l can still follow the error e (raise tau for e > 0, lower it for e < 0) when

      tau_l > 0,   rho_l > 0,   and   sign(e) * du_l < tau_max_step   (its step is not clipped that way).

  lambda_I integrates only while at least one module can (conditional integration, as a PI
  controller with actuator limits does), and is clamped:

      lambda_I <- clip(lambda_I + lambda_lr * e, -lambda_i_max, lambda_i_max)   if some module can follow e
      lambda_I unchanged                                                       otherwise

  (the starting value sparsity_lambda is clamped too). Without it, a phase in which the target is out
  of reach (every step clipped, no token near any threshold, zero deltas) winds lambda_I up by
  lambda_lr * |e| per step, and once the target is reachable again lambda keeps driving every tau
  the wrong way until lambda_I has unwound: as many steps as the phase lasted, by which time the taus
  may sit so far from their ratios that rho_l underflows and they never return. The clamp bounds the
  case the condition above can not see (rho_l > 0 but too small to matter): lambda_I unwinds from at most
  lambda_i_max at rate lambda_lr * |e|. When neither rule engages (some module follows e, |lambda_I|
  stays below lambda_i_max) the controller is exactly the PI controller above.
- Gating starts after `tau_warmup_steps` (tau = 0 until then so that B leaves zero); each tau then
  starts at the `tau_init_quantile` quantile q of its module's finite log-ratios on that step,
      tau_l = exp(quantile_q({log r_i : i valid, r_i > 0})),
  so the surrogate is well scaled from its first step. A module with no such ratio on that step (no
  valid token reached it, or its delta is still exactly zero, e.g. B = 0 with tau_warmup_steps = 0)
  can not be placed: it is reported once by name (a WARNING line through `log`), stays dense
  (tau = 0, outside the tau step and the anti-windup test above), and is initialised by the same rule
  at the first later step on which it has finite ratios (its ratios are recorded on every step until
  then). Its keep_l still counts in keep, which is the skip rate the model really has.

All statistics are summed over gradient-accumulation micro-batches and over processes, so one
process and N processes with the same global batch take the same step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist

from tspeft_rt.layers import TokenGate


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class ThresholdController:
    """Owns every tau of a model: lambda, the tau step, and the keep-rate window for logs/export.

    `log` receives the user-facing messages (the trainer passes its rank-0 logger); without it the
    warnings are issued with `warnings.warn` and the other messages dropped.
    """

    def __init__(self, gates: dict[str, TokenGate], cfg, log: Callable[[str], None] | None = None,
                 group: dist.ProcessGroup | None = None) -> None:
        self.gates = gates
        self.cfg = cfg
        self.log = log
        self.group = group  # for the host-side counts and ratios (a gloo group under NCCL; None: the default)
        self.lam_i = float(cfg.sparsity_lambda)  # the integral part in target mode
        if self.target_keep is not None:
            self.lam_i = self._clamp(self.lam_i)
        self.lam = self.lam_i
        n = len(gates)
        self.window = torch.zeros(n, 2, dtype=torch.float64)  # kept, valid since the last log
        self.last_keep = torch.ones(n, dtype=torch.float64)
        self.last_quantiles: dict[str, dict[str, float]] = {}
        self.pending: list[str] = []  # modules still at tau = 0 after gating started: no finite ratio yet

    @property
    def target_keep(self) -> float | None:
        return None if self.cfg.target_skip is None else 1.0 - float(self.cfg.target_skip)

    def _clamp(self, lam_i: float) -> float:
        """lam_i within +-lambda_i_max (the anti-windup bound)."""
        bound = float(self.cfg.lambda_i_max)
        return max(-bound, min(bound, lam_i))

    def init_quantile(self) -> float:
        q = self.cfg.tau_init_quantile
        if q is None:
            q = self.cfg.target_skip if self.cfg.target_skip is not None else 0.05
        return float(q)

    def wants_ratios(self, step: int) -> bool:
        """Whether this step's forward must record the log-ratios: the step where gating starts, and
        every later step while a module waits for its first finite ratio."""
        start = self.cfg.tau_warmup_steps
        return bool(self.gates) and (step == start or (step > start and bool(self.pending)))

    @torch.no_grad()
    def step(self, step: int) -> dict:
        """Update lambda and every tau after the backward of optimizer step `step` (0-based)."""
        if not self.gates:
            return {}
        gates = list(self.gates.values())
        stats = [g.reset_stats() for g in gates]
        t = torch.tensor([[s.kept, s.valid, s.density] for s in stats], dtype=torch.float64)
        if _distributed():
            dist.all_reduce(t, group=self.group)
        valid = t[:, 1].clamp_min(1.0)
        keep_l, rho_l = t[:, 0] / valid, t[:, 2] / valid
        self.window += t[:, :2]
        self.last_keep = keep_l
        keep = float(keep_l.mean())
        self._record_quantiles(stats)
        if step == self.cfg.tau_warmup_steps:
            self._start_gating(stats, step)
        elif step > self.cfg.tau_warmup_steps:
            err = 0.0
            if self.target_keep is not None:
                err = keep - self.target_keep
                self.lam = self.lam_i + self.cfg.lambda_p * err
            can_follow = self._tau_step(gates, rho_l, err)
            if self.target_keep is not None and can_follow:  # conditional integration, clamped
                self.lam_i = self._clamp(self.lam_i + self.cfg.lambda_lr * err)
            if self.pending:
                self._init_pending(stats, step)
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

    def _init_taus(self, names: list[str], stats) -> list[str]:
        """tau = exp(q-quantile of the finite log-ratios) for each named module; returns the names that
        had none (every process calls this with the same names, so the gathers match)."""
        q = self.init_quantile()
        missing = []
        for name, s in zip(names, stats):
            ratios = torch.cat(s.log_ratios).cpu() if s.log_ratios else torch.empty(0)  # host: the gloo group's
            if _distributed():
                parts = [None] * dist.get_world_size(self.group)
                dist.all_gather_object(parts, ratios, group=self.group)
                ratios = torch.cat(parts)
            ratios = ratios[torch.isfinite(ratios)]
            if ratios.numel():
                self.gates[name].tau.fill_(math.exp(float(torch.quantile(ratios.double(), q))))
            else:
                missing.append(name)
        return missing

    def _start_gating(self, stats, step: int) -> None:
        self.pending = self._init_taus(list(self.gates), stats)
        if self.pending:
            self._warn(f"step {step + 1}: gating starts, but {_names(self.pending)} had no valid token with a "
                       f"non-zero update on this step (no token reached the module, or its update is still exactly "
                       f"zero, e.g. B = 0 with tau_warmup_steps = 0); such a tau stays 0 (dense) until the first "
                       f"step that has one, which sets it")

    def _init_pending(self, stats, step: int) -> None:
        index = {name: i for i, name in enumerate(self.gates)}
        waiting = self.pending
        self.pending = self._init_taus(waiting, [stats[index[n]] for n in waiting])
        done = [n for n in waiting if n not in self.pending]
        if done and self.log is not None:
            self.log(f"step {step + 1}: tau set from the first valid tokens of {_names(done)}; "
                     f"{len(self.pending)} module(s) still dense")

    def _warn(self, msg: str) -> None:
        if self.log is not None:
            self.log(f"WARNING: {msg}")
        else:
            warnings.warn(msg, RuntimeWarning, stacklevel=4)

    def _tau_step(self, gates: list[TokenGate], rho_l: torch.Tensor, err: float) -> bool:
        """The log-tau step of every gated module; returns whether at least one module can still
        follow `err` (tau > 0, rho > 0, its step not clipped in the direction sign(err) asks for)."""
        limit = self.cfg.tau_max_step
        want = (err > 0) - (err < 0)  # +1: raise tau, -1: lower it
        can_follow = False
        for gate, rho in zip(gates, rho_l.tolist()):
            tau = gate.tau
            if float(tau) <= 0.0:
                continue
            task = float(tau) * float(tau.grad) if tau.grad is not None else 0.0
            du = -self.cfg.tau_lr * (task - self.lam * rho)
            if rho > 0.0 and want * du < limit:
                can_follow = True
            tau.mul_(math.exp(max(-limit, min(limit, du))))
        return can_follow

    def take_window(self) -> dict[str, float]:
        """Per-module keep rate since the last call (the figure logged and exported)."""
        kept, valid = self.window[:, 0], self.window[:, 1]
        rates = torch.where(valid > 0, kept / valid.clamp_min(1.0), self.last_keep)
        self.window.zero_()
        return dict(zip(self.gates, rates.tolist()))

    def state_dict(self) -> dict:
        return {"lam": self.lam, "lam_i": self.lam_i, "window": self.window.clone(),
                "last_keep": self.last_keep.clone(), "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state["lam"])
        self.lam_i = float(state["lam_i"])
        if self.target_keep is not None:
            self.lam_i = self._clamp(self.lam_i)
        self.window = state["window"].clone()
        self.last_keep = state["last_keep"].clone()
        # a state saved before "pending" existed: the modules still at tau = 0 (all of them before gating
        # starts, where _start_gating sets the list anew)
        pending = state.get("pending")
        if pending is None:
            pending = [n for n, g in self.gates.items() if float(g.tau.detach()) == 0.0]
        self.pending = [n for n in pending if n in self.gates]


def _names(names: list[str], shown: int = 8) -> str:
    """'1 module (a)' / '3 modules (a, b, c)' / '20 modules (a, ..., h and 12 more)'."""
    head = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    return f"{len(names)} module{'s' if len(names) != 1 else ''} ({head})"
