"""GatedLinear (tspeft_rt.layers): TS-LoRA / TS-DoRA around a frozen nn.Linear.

- Parity with PEFT's LoRA and DoRA layers (outputs and gradients of lora_A, lora_B, the magnitude
  vector and the input), ungated and gated with tau == 0, on SmolLM2-135M's module shapes.
- The gated layer with tau > 0: output base + keep * m, and the sparse backward of `_GatedLoraFn`
  (LoRA) / `_GatedDoraFn` (DoRA) against a plain autograd reference with a constant mask, for partial,
  all-on and all-off masks, with tau trainable or frozen.
- tau's straight-through gradient against the formula of tspeft_rt.gate, computed directly.
- Leading batch dimensions, and a bf16 base layer with an fp32 adapter.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tspeft_rt.gate import gate_keep, row_sq_norm
from tspeft_rt.layers import GatedLinear

# SmolLM2-135M: q/o_proj, k/v_proj, gate/up_proj, down_proj.
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
N_TOK = 6
RTOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small matmuls: one thread is faster than two on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


class _Holder(nn.Module):
    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def make_layer(in_f, out_f, *, bias=True, rank=8, dora=False, gated=False, rslora=False,
               temperature=1.0, seed=0, dtype=torch.float32) -> GatedLinear:
    """A GatedLinear with random base weights, random A, non-zero B and a perturbed magnitude."""
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias)
    if bias:
        nn.init.normal_(base.bias, std=0.5)
    layer = GatedLinear(base.to(dtype), rank=rank, alpha=2.0 * rank, dora=dora, gated=gated,
                        use_rslora=rslora, temperature=temperature)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
        if dora:
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(out_f))
    return layer


def make_peft(layer: GatedLinear, rslora: bool, dropout: float = 0.0):
    """PEFT's LoRA/DoRA layer over a copy of `layer`'s base, holding `layer`'s adapter weights."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(target_modules=["proj"], r=layer.rank, lora_alpha=layer.alpha, use_dora=layer.dora,
                     use_rslora=rslora, lora_dropout=dropout, init_lora_weights=True)
    peft_layer = get_peft_model(_Holder(copy.deepcopy(layer.base_layer)), cfg).base_model.model.proj
    params = dict(peft_layer.named_parameters())
    with torch.no_grad():
        params["lora_A.default.weight"].copy_(layer.lora_A.weight)
        params["lora_B.default.weight"].copy_(layer.lora_B.weight)
        if layer.dora:
            params["lora_magnitude_vector.default.weight"].copy_(layer.lora_magnitude_vector)
    assert peft_layer.scaling["default"] == pytest.approx(layer.scaling)
    return peft_layer, params


def run(module, x, gout):
    """Output and input gradient of `module` for the upstream gradient `gout`."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    (out * gout).sum().backward()
    return out.detach(), x.grad


def ratios(layer: GatedLinear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        base = layer.base_layer(x)
        return (row_sq_norm(layer.delta(x, base)) / row_sq_norm(base)).sqrt()


def set_tau(layer: GatedLinear, x: torch.Tensor, mask: str) -> None:
    """tau for a partial mask (between the middle two ratios), all tokens on, or all off."""
    r = ratios(layer, x).sort().values
    k = r.numel() // 2
    tau = {"some": (r[k - 1] + r[k]) / 2, "all_on": r[0] / 2, "all_off": r[-1] * 2}[mask]
    with torch.no_grad():
        layer.token_gate.tau.fill_(float(tau))


@pytest.mark.parametrize("rslora", [False, True], ids=["lora_scale", "rslora"])
@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("in_f,out_f", SHAPES)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated_tau0"])
def test_parity_with_peft(gated, dora, in_f, out_f, bias, rank, rslora):
    layer = make_layer(in_f, out_f, bias=bias, rank=rank, dora=dora, gated=gated, rslora=rslora)
    peft_layer, peft_params = make_peft(layer, rslora)
    torch.manual_seed(1)
    x = torch.randn(N_TOK, in_f)
    gout = torch.randn(N_TOK, out_f)

    out, gx = run(layer, x, gout)
    ref, ref_gx = run(peft_layer, x, gout)
    base = layer.base_layer(x).detach()
    assert rel_err(ref, base) > 1e-2  # the delta is not trivial
    assert rel_err(out, ref) <= RTOL
    assert rel_err(gx, ref_gx) <= RTOL
    pairs = [(layer.lora_A.weight, "lora_A.default.weight"), (layer.lora_B.weight, "lora_B.default.weight")]
    if dora:
        pairs.append((layer.lora_magnitude_vector, "lora_magnitude_vector.default.weight"))
    for ours, name in pairs:
        assert rel_err(ours.grad, peft_params[name].grad) <= RTOL, name
    if gated:
        assert layer.token_gate.tau.grad is not None and float(layer.token_gate.tau.grad) == 0.0


def reference(layer: GatedLinear, x: torch.Tensor, keep: torch.Tensor):
    """Plain autograd: base + keep * m with a constant mask, on cloned adapter parameters."""
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    params = {"A": A, "B": B}
    x = x.detach().clone().requires_grad_(True)
    s = layer.scaling
    base = layer.base_layer(x)
    lora = s * (x @ A.T @ B.T)
    if layer.dora:
        mag = layer.lora_magnitude_vector.detach().clone().requires_grad_(True)
        params["mag"] = mag
        W0 = layer.base_layer.weight
        norm = torch.linalg.norm(W0 + s * (B @ A), dim=1).detach()
        c = mag / norm
        m = (c - 1) * (x @ W0.T) + c * lora
    else:
        m = lora
    return base + keep[:, None] * m, x, params


def layer_params(layer: GatedLinear) -> dict:
    p = {"A": layer.lora_A.weight, "B": layer.lora_B.weight}
    if layer.dora:
        p["mag"] = layer.lora_magnitude_vector
    return p


@pytest.mark.parametrize("tau_trainable", [True, False], ids=["tau_grad", "tau_frozen"])
@pytest.mark.parametrize("mask", ["some", "all_on", "all_off"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_gated_forward_and_sparse_backward(dora, mask, tau_trainable):
    layer = make_layer(576, 192, rank=8, dora=dora, gated=True, seed=2)
    torch.manual_seed(3)
    x = torch.randn(16, 576)
    gout = torch.randn(16, 192)
    set_tau(layer, x, mask)
    layer.token_gate.tau.requires_grad_(tau_trainable)

    with torch.no_grad():
        base = layer.base_layer(x)
        m = layer.delta(x, base)
        keep = gate_keep(row_sq_norm(m), row_sq_norm(base), layer.token_gate.tau)
    n_on = int(keep.sum())
    assert n_on == {"some": 8, "all_on": 16, "all_off": 0}[mask]

    out, gx = run(layer, x, gout)
    assert rel_err(out, base + keep[:, None] * m) <= RTOL

    ref, ref_x, ref_params = reference(layer, x, keep.float())
    (ref * gout).sum().backward()
    assert rel_err(out, ref.detach()) <= RTOL
    assert rel_err(gx, ref_x.grad) <= RTOL
    for name, p in layer_params(layer).items():
        if mask == "all_off":
            assert torch.count_nonzero(p.grad) == 0, name
        else:
            assert rel_err(p.grad, ref_params[name].grad) <= RTOL, name
    if mask == "all_off":
        assert torch.equal(out, base)
    if tau_trainable:
        assert layer.token_gate.tau.grad is not None
    else:
        assert layer.token_gate.tau.grad is None


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_tau_gradient_matches_formula(dora, temperature):
    layer = make_layer(64, 48, rank=4, dora=dora, gated=True, temperature=temperature, seed=4)
    torch.manual_seed(5)
    x = torch.randn(20, 64)
    gout = torch.randn(20, 48)
    set_tau(layer, x, "some")
    run(layer, x, gout)

    with torch.no_grad():  # direct computation in float64, without the gate.py helpers
        base = layer.base_layer(x).double()
        m = layer.delta(x, layer.base_layer(x)).double()
        tau = layer.token_gate.tau.double()
        T = temperature
        r = m.norm(dim=1) / base.norm(dim=1)
        z = (r.log() - tau.log()) / T
        w = torch.sigmoid(z) * (1 - torch.sigmoid(z)) / T
        terms = (gout.double() * m).sum(1) * w
        expected = -terms.sum() / tau
    got = layer.token_gate.tau.grad.double()
    assert abs(float(got - expected)) <= 1e-5 * float(terms.abs().sum() / tau)
    assert abs(float(expected)) > 1e-3 * float(terms.abs().sum() / tau)  # not a cancelling sum


@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_leading_batch_dims(dora, gated):
    layer = make_layer(32, 24, rank=4, dora=dora, gated=gated, seed=6)
    torch.manual_seed(7)
    x = torch.randn(3, 5, 32)
    gout = torch.randn(3, 5, 24)
    if gated:
        set_tau(layer, x.reshape(-1, 32), "some")

    out, gx = run(layer, x, gout)
    grads = {k: p.grad.clone() for k, p in layer_params(layer).items()}
    layer.zero_grad()
    out_flat, gx_flat = run(layer, x.reshape(15, 32), gout.reshape(15, 24))

    assert out.shape == (3, 5, 24) and gx.shape == x.shape
    assert rel_err(out.reshape(15, 24), out_flat) <= RTOL
    assert rel_err(gx.reshape(15, 32), gx_flat) <= RTOL
    for k, p in layer_params(layer).items():
        assert rel_err(grads[k], p.grad) <= RTOL, k


@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_bf16_base_fp32_adapter(dora, gated):
    layer = make_layer(64, 32, rank=4, dora=dora, gated=gated, seed=8, dtype=torch.bfloat16)
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    torch.manual_seed(9)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    if gated:
        set_tau(layer, x.reshape(-1, 64), "some")
    gout = torch.randn(2, 8, 32, dtype=torch.bfloat16)

    out, gx = run(layer, x, gout)
    assert out.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and torch.isfinite(gx).all()
    for k, p in layer_params(layer).items():
        assert p.grad.dtype == torch.float32, k
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, k
    if gated:
        tau_grad = layer.token_gate.tau.grad
        assert tau_grad.dtype == torch.float32 and math.isfinite(float(tau_grad)) and float(tau_grad) != 0.0
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dropout_in_training_matches_peft(dora):
    """With dropout active (the `_GateFn` path for DoRA), the gated layer at tau 0 still equals PEFT
    under the same dropout mask (same seed, one dropout draw per forward on both sides)."""
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    layer = GatedLinear(base, rank=8, alpha=16.0, dora=dora, gated=True, dropout=0.3)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
    peft_layer, peft_params = make_peft(layer, rslora=False, dropout=0.3)
    layer.train()
    peft_layer.train()
    x, gout = torch.randn(10, 64), torch.randn(10, 48)
    torch.manual_seed(7)
    out, gx = run(layer, x, gout)
    torch.manual_seed(7)
    ref, ref_gx = run(peft_layer, x, gout)
    assert rel_err(out, ref) <= RTOL and rel_err(gx, ref_gx) <= RTOL
    assert rel_err(layer.lora_A.weight.grad, peft_params["lora_A.default.weight"].grad) <= RTOL
    torch.manual_seed(8)
    other, _ = run(layer, x, gout)
    assert rel_err(other, ref) > 1e-3  # dropout is really active
