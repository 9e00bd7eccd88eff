"""The tau controller (tspeft_rt.sparsity.ThresholdController): anti-windup of lambda_I, and modules
that have no valid token when gating starts.

The windup tests drive the controller with a synthetic plant: module l is a real `TokenGate` fed, on
every step, n tokens with log-ratios mu_l + s * q_i (q_i fixed standard-normal quantiles) through
`TokenGate.record`, so keep_l and rho_l are exactly what the gate computes, plus a constant task term
tau_l * dL/dtau_l = c_l > 0 (helpful deltas pull tau down), so that holding the target needs lambda > 0
and the integral term matters (the task term vanishes with the deltas, as rho does). A phase in which
the target is out of reach lasts `stuck` steps, then the plant is ordinary again:

- zero:   every delta is zero: keep 0 for tau > 0, rho = 0 (lambda has no effect at all);
- tiny:   ratios 1e-15 of their size: keep 0, rho ~ 1e-16 > 0 (only the clamp can tell);
- follow: the ratios stay above tau wherever it goes: keep ~ 1, every tau step clipped upwards.

The plain PI controller (the update before anti-windup, `PlainPI`) winds lambda_I up to about
lambda_lr * |e| * stuck and has not recovered `RECOVER` steps later; the controller must keep
|lambda_I| <= lambda_i_max and hold the target again within `RECOVER` steps. Where the anti-windup never
engages, the controller's trajectory must equal the plain PI's exactly. The start of gating, where the
ratios grow faster than tau may follow (B still learning), is the saturation normal runs do see.
"""

from __future__ import annotations

import math

import pytest
import torch

from tspeft_rt.config import TrainConfig
from tspeft_rt.layers import GateContext, TokenGate
from tspeft_rt.sparsity import ThresholdController

TARGET_SKIP = 0.5
STUCK = {"zero": 400, "tiny": 400, "follow": 150}  # steps with the target out of reach (follow: tau grows
# 0.2 in log per step, and its ratios with it, so the phase is shorter to keep r^2 within fp32)
RECOVER = 60  # steps allowed to hold the target again afterwards
HOLD = 100  # steps after RECOVER over which it must stay held
N_TOKENS = 256
Q = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(N_TOKENS, dtype=torch.float64) + 0.5) / N_TOKENS)


def controller_cfg(**kw) -> TrainConfig:
    """The trainer's defaults (gains, tau step, lambda_i_max), gating from step 0."""
    return TrainConfig(**{"target_skip": TARGET_SKIP, "tau_warmup_steps": 0, **kw})


class PlainPI(ThresholdController):
    """The controller without anti-windup: lambda_I integrates every step, unbounded."""

    def _clamp(self, lam_i: float) -> float:
        return lam_i

    def _tau_step(self, gates, rho_l, err) -> bool:
        super()._tau_step(gates, rho_l, err)
        return True


class Plant:
    """Modules whose log-ratios are mu_l + spread * q_i; `mode` says what the tokens look like this step."""

    def __init__(self, mus=(-5.0, -4.0, -3.0, -2.0), spread=1.0, task=(0.01, 0.02, 0.03, 0.04)):
        self.ctx = GateContext()
        self.gates = {f"model.layers.{l}.mlp.down_proj": TokenGate(self.ctx, temperature=1.0) for l in range(len(mus))}
        self.mus, self.spread, self.task = list(mus), spread, task

    def feed(self, ctrl: ThresholdController, step: int, mode: str = "normal") -> None:
        self.ctx.collect_ratios = ctrl.wants_ratios(step)
        for l, gate in enumerate(self.gates.values()):
            tau = float(gate.tau.detach())
            if mode == "follow" and tau > 0:  # the ratios sit above tau wherever it goes: keep ~ 1
                self.mus[l] = math.log(tau) + 2.0
            log_r = self.mus[l] + self.spread * Q
            base_sq = torch.ones(N_TOKENS)
            if mode == "tiny":  # ratios 1e-15 of their size: keep 0, rho ~ 1e-16 (not exactly 0)
                base_sq = torch.full((N_TOKENS,), 1e30)
            delta_sq = (2 * log_r).exp().float()
            if mode == "zero":  # zero deltas: keep 0 for tau > 0, rho = 0
                delta_sq = torch.zeros(N_TOKENS)
            gate.record(delta_sq, base_sq)
            # the task term is a sum over w_i too: gone with the deltas
            task = self.task[l] if tau > 0 and mode not in ("zero", "tiny") else 0.0
            gate.tau.grad = torch.full_like(gate.tau, task / tau if tau > 0 else 0.0)


def run(ctrl_cls, mode: str, stuck_from: int = 100, stuck: int = 0, total: int | None = None, **cfg):
    """Skip rate, lambda_I and taus per step; the plant is ordinary except for `stuck` steps in `mode`."""
    plant = Plant()
    ctrl = ctrl_cls(plant.gates, controller_cfg(**cfg), log=lambda msg: None)
    total = total or stuck_from + stuck + RECOVER + HOLD
    skips, lam_i, taus = [], [], []
    for step in range(total):
        plant.feed(ctrl, step, mode if stuck_from <= step < stuck_from + stuck else "normal")
        skips.append(ctrl.step(step)["skip"])
        lam_i.append(ctrl.lam_i)
        taus.append([float(g.tau.detach()) for g in plant.gates.values()])
    return skips, lam_i, taus


def held(skips: list[float], tol: float = 0.05) -> bool:
    return all(abs(s - TARGET_SKIP) <= tol for s in skips)


# ------------------------------------------------------------------------------------- anti-windup


@pytest.mark.parametrize("mode", ["zero", "tiny", "follow"])
def test_lambda_i_bounded_and_target_recovered_after_unreachable_phase(mode):
    stuck_from, stuck = 100, STUCK[mode]
    skips, lam_i, _ = run(ThresholdController, mode, stuck_from, stuck)
    end = stuck_from + stuck
    assert held(skips[stuck_from - 20 : stuck_from]), "the target is held before the stuck phase"
    assert max(abs(x) for x in lam_i) <= controller_cfg().lambda_i_max
    assert held(skips[end + RECOVER :]), [round(s, 3) for s in skips[end : end + RECOVER + 10]]


@pytest.mark.parametrize("mode", ["zero", "tiny", "follow"])
def test_plain_pi_winds_up_in_the_same_scenario(mode):
    """What the anti-windup prevents: lambda_I grows with the length of the phase and the target is
    not held again RECOVER steps later."""
    stuck_from, stuck = 100, STUCK[mode]
    skips, lam_i, _ = run(PlainPI, mode, stuck_from, stuck)
    end = stuck_from + stuck
    assert max(abs(x) for x in lam_i) > 0.4 * stuck  # |e| ~ 0.5 per step, lambda_lr = 1
    assert not held(skips[end + RECOVER :])


def test_recovery_does_not_grow_with_the_length_of_the_phase():
    """After any unreachable phase the controller is back at the target within the same number of steps."""
    settle = []
    for stuck in (50, 200, 800):
        skips, _, _ = run(ThresholdController, "zero", 100, stuck, total=100 + stuck + 200)
        after = skips[100 + stuck :]
        settle.append(next(i for i in range(len(after)) if held(after[i:])))
    assert max(settle) <= RECOVER and max(settle) - min(settle) <= 5, settle


def test_trajectory_unchanged_when_anti_windup_does_not_engage():
    """On a reachable target without clipped steps the controller is the plain PI controller, float for float."""
    new = run(ThresholdController, "normal", total=300)
    old = run(PlainPI, "normal", total=300)
    assert new == old
    assert held(new[0][-100:], tol=0.02) and max(abs(x) for x in new[1]) < controller_cfg().lambda_i_max


def test_ratios_outrunning_tau_at_gating_start():
    """The saturation of a normal run: for 15 steps after gating starts the ratios grow by 0.3 in log per
    step, faster than tau may follow (0.2), so every step is clipped upwards. The plain PI controller
    integrates all along and overshoots to ~99% skip; with conditional integration the overshoot is small."""

    def trajectory(ctrl_cls):
        plant = Plant()
        ctrl = ctrl_cls(plant.gates, controller_cfg(), log=lambda msg: None)
        skips = []
        for step in range(120):
            if step < 15:
                plant.mus = [m + 0.3 for m in plant.mus]
            plant.feed(ctrl, step)
            skips.append(ctrl.step(step)["skip"])
        return skips, next(i for i in range(len(skips)) if held(skips[i:]))

    (skips, settle), (plain, plain_settle) = trajectory(ThresholdController), trajectory(PlainPI)
    assert skips[:20] == plain[:20]  # the same until tau catches up with the ratios
    assert max(plain) > 0.95 and plain_settle > 55
    assert max(skips) < 0.6 and settle <= 35, (max(skips), settle)


def test_no_integration_while_every_step_is_clipped():
    """Conditional integration: a clipped step in the direction of the error freezes lambda_I; a step that is
    not clipped, or is clipped the other way, integrates."""
    plant = Plant(mus=(-3.0,), task=(0.0,))
    ctrl = ThresholdController(plant.gates, controller_cfg(sparsity_lambda=0.3, tau_max_step=1e-3),
                               log=lambda msg: None)
    gate = plant.gates["model.layers.0.mlp.down_proj"]
    plant.feed(ctrl, 0)
    ctrl.step(0)  # tau at the median: keep 0.5
    gate.tau.data.mul_(0.5)  # keep > 0.5: e > 0, and lambda > 0 raises tau by more than 1e-3 -> clipped
    plant.feed(ctrl, 1)
    ctrl.step(1)
    assert ctrl.lam_i == 0.3
    gate.tau.data.mul_(0.5)
    plant.feed(ctrl, 2)
    plant.gates["model.layers.0.mlp.down_proj"].tau.grad.fill_(1e6)  # a task term that pulls tau down hard
    ctrl.step(2)  # the step is clipped downwards, against e > 0: lambda can still act on it
    assert ctrl.lam_i > 0.3


def test_lambda_i_clamped_including_the_start_value():
    plant = Plant(mus=(-3.0,))
    ctrl = ThresholdController(plant.gates, controller_cfg(sparsity_lambda=5.0, lambda_i_max=2.0), log=None)
    assert ctrl.lam_i == 2.0
    fixed = ThresholdController(plant.gates, controller_cfg(target_skip=None, sparsity_lambda=5.0), log=None)
    assert fixed.lam == 5.0  # fixed mode: lambda is the configured weight, no integral to bound


def test_lambda_i_max_must_be_positive():
    from tspeft_rt.config import build_config
    from tspeft_rt.errors import ConfigError

    assert build_config({"lambda_i_max": 3}, "test").lambda_i_max == 3.0
    with pytest.raises(ConfigError, match="lambda_i_max"):
        build_config({"lambda_i_max": 0}, "test")


# ------------------------------------------------------------- no valid token when gating starts


def feed_tokens(gate: TokenGate, log_r: torch.Tensor | None) -> None:
    """One step's tokens for `gate`: none at all (None), zero deltas (empty log_r), or these log-ratios."""
    if log_r is None:
        return
    delta_sq = (2 * log_r).exp().float() if log_r.numel() else torch.zeros(8)
    gate.record(delta_sq, torch.ones(delta_sq.numel()))


def test_module_without_valid_tokens_warns_once_and_is_initialised_later():
    ctx = GateContext()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"]
    gates = {n: TokenGate(ctx, 1.0) for n in names}
    messages: list[str] = []
    ctrl = ThresholdController(gates, controller_cfg(tau_warmup_steps=2), log=messages.append)
    q = ctrl.init_quantile()
    a, b, c = (gates[n] for n in names)
    r_a, r_b, r_c = (torch.linspace(-4, -1, 32) + k for k in (0.0, 0.5, 1.0))

    for step in range(2):  # warm-up: tau 0, nothing recorded as ratios, nothing said
        assert not ctrl.wants_ratios(step)
        feed_tokens(a, r_a), feed_tokens(b, r_b), feed_tokens(c, r_c)
        ctrl.step(step)
    assert messages == [] and all(float(g.tau.detach()) == 0 for g in gates.values())

    assert ctrl.wants_ratios(2)
    ctx.collect_ratios = True
    feed_tokens(a, r_a)
    feed_tokens(b, None)  # no valid token reached it
    feed_tokens(c, torch.empty(0))  # its update is still exactly zero
    ctrl.step(2)
    assert float(a.tau.detach()) == pytest.approx(math.exp(float(torch.quantile(r_a.double(), q))), rel=1e-6)
    assert float(b.tau.detach()) == 0.0 and float(c.tau.detach()) == 0.0
    assert len(messages) == 1 and messages[0].startswith("WARNING: step 3:")
    assert names[1] in messages[0] and names[2] in messages[0] and names[0] not in messages[0]
    assert ctrl.pending == names[1:]

    assert ctrl.wants_ratios(3)  # ratios are recorded while a module waits
    feed_tokens(a, r_a), feed_tokens(b, r_b), feed_tokens(c, torch.empty(0))
    ctrl.step(3)
    assert float(b.tau.detach()) == pytest.approx(math.exp(float(torch.quantile(r_b.double(), q))), rel=1e-6)
    assert float(c.tau.detach()) == 0.0 and ctrl.pending == names[2:]

    for step in (4, 5):  # still no token for c: it stays dense, is not stepped, and is not warned about again
        assert ctrl.wants_ratios(step)
        feed_tokens(a, r_a), feed_tokens(b, r_b), feed_tokens(c, torch.empty(0))
        ctrl.step(step)
        assert float(c.tau.detach()) == 0.0
    feed_tokens(a, r_a), feed_tokens(b, r_b), feed_tokens(c, r_c)
    ctrl.step(6)
    assert float(c.tau.detach()) == pytest.approx(math.exp(float(torch.quantile(r_c.double(), q))), rel=1e-6)
    assert ctrl.pending == [] and not ctrl.wants_ratios(7)
    warnings_ = [m for m in messages if m.startswith("WARNING")]
    assert len(warnings_) == 1
    assert any(names[2] in m and "tau set from the first valid tokens of 1 module" in m for m in messages[1:])


def test_warning_without_a_logger_is_a_python_warning():
    ctx = GateContext(collect_ratios=True)
    gates = {"model.layers.0.mlp.gate_proj": TokenGate(ctx, 1.0), "model.layers.0.mlp.up_proj": TokenGate(ctx, 1.0)}
    ctrl = ThresholdController(gates, controller_cfg())
    feed_tokens(gates["model.layers.0.mlp.gate_proj"], torch.linspace(-3, -1, 16))
    with pytest.warns(RuntimeWarning, match=r"1 module \(model\.layers\.0\.mlp\.up_proj\)"):
        ctrl.step(0)


def test_pending_modules_survive_a_checkpoint():
    ctx = GateContext(collect_ratios=True)
    gates = {"a": TokenGate(ctx, 1.0), "b": TokenGate(ctx, 1.0)}
    ctrl = ThresholdController(gates, controller_cfg(), log=lambda msg: None)
    feed_tokens(gates["a"], torch.linspace(-3, -1, 16))
    ctrl.step(0)
    state = ctrl.state_dict()
    assert state["pending"] == ["b"]
    resumed = ThresholdController(gates, controller_cfg(), log=lambda msg: None)
    resumed.load_state_dict(state)
    assert resumed.pending == ["b"] and resumed.wants_ratios(5)
    older = {k: v for k, v in state.items() if k != "pending"}  # a checkpoint written before the field existed
    resumed.load_state_dict(older)
    assert resumed.pending == ["b"]  # the modules still at tau = 0


def test_training_with_tau_warmup_zero_gates_every_module(tiny_model_dir, tmp_path, capsys):
    """tau_warmup_steps = 0: at step 0 every B is zero, so no module has a finite ratio; the run warns once
    and sets each tau at step 2 (before the fix every tau stayed 0 and the run was dense throughout)."""
    from tspeft_rt.config import build_config
    from tspeft_rt.trainer import train

    cfg = dict(model=str(tiny_model_dir), output_dir=str(tmp_path / "run"), tasks=["arc_easy"], max_train_examples=32,
               steps=4, batch_size=4, micro_batch_size=4, lr=1e-2, warmup_steps=1, tau_warmup_steps=0,
               target_skip=0.5, log_every=2, save_every=0, eval_examples=0, progress=False, max_seq_len=64)
    result = train(build_config(cfg, "test"))
    out = capsys.readouterr().out
    warnings_ = [l for l in out.splitlines() if l.startswith("WARNING:")]
    assert len(warnings_) == 1 and "14 modules (model.layers.0.self_attn.q_proj" in warnings_[0], out
    from safetensors.torch import load_file

    from tspeft_rt.checkpoint import latest_checkpoint

    adapter = load_file(latest_checkpoint(tmp_path / "run") / "adapter.safetensors")
    taus = [float(v) for k, v in adapter.items() if k.endswith("token_gate.tau")]
    assert len(taus) == 14 and all(t > 0 for t in taus)
    assert result["train_skip"] > 0.0
