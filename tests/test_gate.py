"""The gate math (tspeft_rt.gate) and how tau learns (tspeft_rt.sparsity.ThresholdController).

- gate_keep on hand-built inputs: the boundary ||m|| == tau ||base|| is on, just below is off, a
  zero delta is on at tau == 0 and off for tau > 0, a zero base row uses the EPS floor, and the
  comparison stays right for huge and tiny magnitudes (no division).
- surrogate_weight / tau_grad are zero while tau == 0 (dense warm-up), also through the layer.
- One backward and one controller step move tau down for a helpful delta and up for a harmful one;
  lambda > 0 alone pushes tau up; in target mode lambda follows keep - target_keep (the PI
  controller of sparsity.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tspeft_rt.gate import EPS, gate_keep, log_ratio, row_sq_norm, surrogate_weight, tau_grad
from tspeft_rt.layers import GatedLinear
from tspeft_rt.sparsity import ThresholdController


def keep1(delta_sq: float, base_sq: float, tau: float) -> bool:
    return bool(gate_keep(torch.tensor([delta_sq]), torch.tensor([base_sq]), tau)[0])


# --------------------------------------------------------------------------- gate_keep


def test_boundary_is_on_and_just_below_is_off():
    base_sq = row_sq_norm(torch.tensor([[6.0, 8.0]]))
    on = row_sq_norm(torch.tensor([[3.0, 4.0]]))
    below = row_sq_norm(torch.tensor([[3.0, float(torch.nextafter(torch.tensor(4.0), torch.tensor(0.0)))]]))
    assert float(on) == 25.0 and float(base_sq) == 100.0 and float(below) < 25.0
    assert gate_keep(on, base_sq, 0.5).tolist() == [True]
    assert gate_keep(below, base_sq, 0.5).tolist() == [False]
    assert gate_keep(on, base_sq, torch.tensor([0.5])).tolist() == [True]  # tau as a [1] parameter
    above_tau = float(torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)))
    assert gate_keep(on, base_sq, above_tau).tolist() == [False]


def test_boundary_is_a_product_not_a_division():
    # ||m||^2 == fl(tau^2 * ||base||^2) exactly, where the division fl(||m||^2 / ||base||^2) < tau^2
    tau_sq, base_sq = torch.tensor(0.3).square(), torch.tensor([28.0])
    delta_sq = tau_sq * base_sq
    assert bool((delta_sq / base_sq < tau_sq)[0])  # the case tells a division apart
    assert gate_keep(delta_sq, base_sq, 0.3).tolist() == [True]


@pytest.mark.parametrize("base_sq", [1.0, 0.0])
def test_zero_delta_kept_only_at_tau_zero(base_sq):
    assert keep1(0.0, base_sq, 0.0)
    for tau in (1e-6, 1e-3, 0.5, 1.0, 1e3):
        assert not keep1(0.0, base_sq, tau), tau


def test_zero_base_row_uses_eps_floor():
    floor_sq = EPS * EPS
    for tau in (1e-3, 0.5, 2.0):
        assert keep1(4 * tau**2 * floor_sq, 0.0, tau)
        assert not keep1(0.25 * tau**2 * floor_sq, 0.0, tau)
    # a base row below the floor counts as the floor: a tiny delta is not "infinitely large"
    assert not keep1(1e-14, 1e-30, 1.0)
    assert keep1(1e-14, 1e-30, 0.05)
    # no division: 0/0 would be NaN and turn a zero token off at tau == 0
    assert keep1(0.0, 0.0, 0.0)
    lr = log_ratio(torch.tensor([1e-10]), torch.tensor([0.0]))
    assert torch.isfinite(lr).all()
    assert float(lr) == pytest.approx(0.5 * (torch.tensor(1e-10).log() - torch.tensor(EPS * EPS).log()).item())
    w = surrogate_weight(torch.tensor([1e-10, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.1]), 1.0)
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("base_sq", [1e-10, 1.0, 1e12, 1e26])
@pytest.mark.parametrize("tau", [1e-4, 1.0, 1e4])
def test_huge_and_tiny_magnitudes(base_sq, tau):
    # ratio^2 = 4 tau^2 (on) or tau^2 / 4 (off), over 36 orders of magnitude of ||base||^2 and tau^2
    assert keep1(4 * tau**2 * base_sq, base_sq, tau)
    assert not keep1(0.25 * tau**2 * base_sq, base_sq, tau)


def test_gate_keep_vectorised_matches_ratio():
    torch.manual_seed(0)
    m = torch.randn(64, 32) * torch.rand(64, 1)
    base = torch.randn(64, 32)
    r = (m.double().norm(dim=1) / base.double().norm(dim=1))
    tau = float(r.median())
    keep = gate_keep(row_sq_norm(m), row_sq_norm(base), tau)
    clear = (r / tau - 1).abs() > 1e-5
    assert torch.equal(keep[clear], (r >= tau)[clear])
    assert 0 < int(keep.sum()) < 64


# ------------------------------------------------------------------- tau == 0 (warm-up)


def test_surrogate_and_tau_grad_zero_at_tau_zero():
    torch.manual_seed(1)
    d, b = torch.rand(10), torch.rand(10)
    d[0] = 0.0  # a zero delta: log r = -inf, as is log tau
    tau0 = torch.zeros(1)
    assert torch.count_nonzero(surrogate_weight(d, b, tau0, 1.0)) == 0
    assert torch.count_nonzero(tau_grad(torch.randn(10), torch.rand(10), tau0)) == 0
    # the same inputs at tau > 0 give non-zero values
    tau = torch.tensor([float(((d / b).sqrt()).median())])
    w = surrogate_weight(d, b, tau, 1.0)
    assert (w[1:] > 0).all() and float(w[0]) == 0.0
    assert float(tau_grad(torch.randn(10), w, tau)) != 0.0


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_layer_tau_grad_zero_at_tau_zero(dora):
    layer = make_layer(dora)
    torch.manual_seed(1)
    x = torch.randn(12, 16)
    layer(x).square().sum().backward()
    assert layer.token_gate.tau.grad is not None
    assert float(layer.token_gate.tau.grad) == 0.0
    stats = layer.token_gate.reset_stats()
    assert stats.kept == stats.valid == 12 and stats.density == 0.0


# ------------------------------------------------------------- learning tau


def make_layer(dora: bool, seed: int = 0) -> GatedLinear:
    torch.manual_seed(seed)
    layer = GatedLinear(torch.nn.Linear(16, 16), rank=4, alpha=8.0, dora=dora, gated=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.3)
        if dora:
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(16))
    return layer


def make_cfg(**kw) -> SimpleNamespace:
    cfg = dict(sparsity_lambda=0.0, target_skip=None, tau_warmup_steps=0, tau_init_quantile=None,
               tau_lr=0.1, tau_max_step=0.5, lambda_lr=0.1, lambda_p=0.0, lambda_i_max=1.0)
    cfg.update(kw)
    return SimpleNamespace(**cfg)


def base_delta(layer: GatedLinear, x: torch.Tensor):
    with torch.no_grad():
        base = layer.base_layer(x)
        return base, layer.delta(x, base)


def set_median_tau(layer: GatedLinear, x: torch.Tensor) -> float:
    base, m = base_delta(layer, x)
    r = (row_sq_norm(m) / row_sq_norm(base)).sqrt().sort().values
    k = r.numel() // 2
    tau = float((r[k - 1] + r[k]) / 2)
    layer.token_gate.tau.data.fill_(tau)
    return tau


def controller_step(layer: GatedLinear, cfg) -> ThresholdController:
    ctrl = ThresholdController({"l": layer.token_gate}, cfg)
    ctrl.step(cfg.tau_warmup_steps + 1)
    return ctrl


@pytest.mark.parametrize("sign", [+1, -1], ids=["helpful", "harmful"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_tau_moves_with_task_gradient(dora, sign):
    layer = make_layer(dora)
    torch.manual_seed(2)
    x = torch.randn(20, 16)
    tau0 = set_median_tau(layer, x)
    base, m = base_delta(layer, x)
    target = base + sign * m  # helpful: the target contains the delta; harmful: the opposite one
    (layer(x) - target).square().sum().backward()
    grad = float(layer.token_gate.tau.grad)
    controller_step(layer, make_cfg())
    tau1 = layer.token_gate.tau.item()
    if sign > 0:
        assert grad > 0 and tau1 < tau0
    else:
        assert grad < 0 and tau1 > tau0
    assert layer.token_gate.tau.grad is None


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_sparsity_pressure_raises_tau(lam):
    layer = make_layer(False)
    torch.manual_seed(3)
    x = torch.randn(20, 16)
    tau0 = set_median_tau(layer, x)
    (layer(x) * 0.0).sum().backward()  # zero task gradient
    assert float(layer.token_gate.tau.grad) == 0.0
    controller_step(layer, make_cfg(sparsity_lambda=lam))
    tau1 = layer.token_gate.tau.item()
    if lam == 0.0:
        assert tau1 == pytest.approx(tau0, rel=1e-6)
    else:
        assert tau1 > tau0 * (1 + 1e-4)


@pytest.mark.parametrize("lam_p", [0.0, 2.0])
@pytest.mark.parametrize("mask,keep", [("all_on", 1.0), ("all_off", 0.0)])
def test_target_mode_lambda_follows_keep(mask, keep, lam_p):
    # PI controller (sparsity.py): e = keep - target_keep, lambda = lambda_I + lambda_p e, lambda_I += lambda_lr e
    layer = make_layer(False)
    torch.manual_seed(4)
    x = torch.randn(20, 16)
    tau = set_median_tau(layer, x)
    layer.token_gate.tau.data.fill_(tau * (1e-3 if mask == "all_on" else 1e3))
    layer(x).square().sum().backward()
    cfg = make_cfg(target_skip=0.5, sparsity_lambda=0.2, lambda_p=lam_p)
    ctrl = ThresholdController({"l": layer.token_gate}, cfg)
    info = ctrl.step(1)
    err = keep - 0.5
    assert info["skip"] == 1.0 - keep
    assert ctrl.lam_i == pytest.approx(0.2 + cfg.lambda_lr * err, abs=1e-12)
    assert ctrl.lam == pytest.approx(0.2 + lam_p * err, abs=1e-12)
    # a second step with the same keep: lambda rises above the target keep and falls below it
    lam1 = ctrl.lam
    layer(x).square().sum().backward()
    ctrl.step(2)
    assert ctrl.lam == pytest.approx(0.2 + cfg.lambda_lr * err + lam_p * err, abs=1e-12)
    assert (ctrl.lam > lam1) == (keep > 0.5) and ctrl.lam != lam1
