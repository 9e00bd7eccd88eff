"""DoRA served by the gated layers: the PyTorch path against tspeft-rt's own DoRA layer (the training
and `generate` math, itself checked against PEFT's DoRA in test_layers.py), then inside a real vLLM
packed layer, with DoRA, LoRA and no-adapter tokens in one batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tspeft_rt.gate import gate_keep, row_sq_norm
from tspeft_rt.kernels.gated_lora import PackedLoRA, dora_scale, gated_lora
from tspeft_rt.layers import GatedLinear

IN, OUT, RANK, ALPHA = 32, 24, 8, 16.0
SLOTS = [0, 2, -1, 1, 0, 2, 2, 1, -1, 0, 0, 2, 1, 0, 2, 1, 0, 0, 2, -1, 1, 2, 0, 2]  # slot 1: LoRA


def adapter_layer(base: nn.Linear, dora: bool, gated: bool, seed: int) -> GatedLinear:
    """A trained-looking adapter: A, B and (DoRA) the magnitude moved off their initial values."""
    torch.manual_seed(seed)
    layer = GatedLinear(base, rank=RANK, alpha=ALPHA, dora=dora, gated=gated)
    with torch.no_grad():
        layer.lora_A.weight.normal_(0, 0.3)
        layer.lora_B.weight.normal_(0, 0.3)
        if dora:
            layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn(OUT))
    return layer.eval()


def packed_for(layers: list[GatedLinear], base: nn.Linear) -> PackedLoRA:
    """The serving state of these adapters in slots 0, 1, ... as the vLLM layers build it."""
    packed = PackedLoRA(len(layers), RANK, IN, [OUT], torch.float32, "cpu", dora=True, bias=base.bias.detach())
    for slot, layer in enumerate(layers):
        a, b = layer.lora_A.weight.detach(), layer.scaling * layer.lora_B.weight.detach()  # vLLM folds s into B
        packed.set_slot(slot, [a], [b])
        if layer.dora:
            w0 = base.weight.detach()
            packed.set_scale(slot, dora_scale(w0.square().sum(1), [w0 @ a.T], [a], [b],
                                              [layer.lora_magnitude_vector.detach()]))
        packed.set_gate(slot, [float(layer.token_gate.tau.detach()) if layer.gated else None])
    return packed


def ratios(layer: GatedLinear, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        base = layer.base_layer(x)
        return (row_sq_norm(layer.delta(x, base)) / row_sq_norm(base)).sqrt()


@pytest.fixture
def base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT, bias=True)


@pytest.mark.parametrize("gated", [False, True], ids=["gate-off", "gate-on"])
def test_dora_lora_and_no_adapter_in_one_batch_match_tspeft_layers(base, gated):
    layers = [adapter_layer(base, dora=True, gated=gated, seed=1), adapter_layer(base, dora=False, gated=gated, seed=2),
              adapter_layer(base, dora=True, gated=gated, seed=3)]
    torch.manual_seed(4)
    x = torch.randn(len(SLOTS), IN)
    slots = torch.tensor(SLOTS, dtype=torch.int32)
    if gated:  # each threshold between two of its tokens' ratios: about half kept, none on the boundary
        for slot, layer in enumerate(layers):
            r = ratios(layer, x[slots == slot]).sort().values
            layer.token_gate.tau.data.fill_(float(r[len(r) // 2 - 1] + r[len(r) // 2]) / 2)
    packed = packed_for(layers, base)
    with torch.no_grad():
        out = base(x)
        counters = torch.zeros(2, len(layers), dtype=torch.int64)
        gated_lora(out, x, packed, slots, counters)
        expected = torch.stack([layers[s](x[t:t + 1])[0] if s >= 0 else base(x[t]) for t, s in enumerate(SLOTS)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    kept = [sum(1 for t, s in enumerate(SLOTS) if s == slot and (not gated or bool(
        gate_keep(row_sq_norm(layer.delta(x[t:t + 1], base(x[t:t + 1]))), row_sq_norm(base(x[t:t + 1])),
                  layer.token_gate.tau.detach())))) for slot, layer in enumerate(layers)]
    routed = [SLOTS.count(slot) for slot in range(len(layers))]
    assert counters.tolist() == [routed, kept]
    if gated:
        assert all(0 < k < r for k, r in zip(kept, routed))  # the gate decided both ways for every adapter


def test_lora_slot_is_exact_in_a_dora_layer(base):
    """c = 1 leaves a LoRA slot's delta as it is without DoRA state: the same bits."""
    layer = adapter_layer(base, dora=False, gated=False, seed=2)
    x = torch.randn(6, IN)
    slots = torch.zeros(6, dtype=torch.int32)
    with torch.no_grad():
        outs = []
        for dora in (False, True):
            packed = PackedLoRA(1, RANK, IN, [OUT], torch.float32, "cpu", dora=dora, bias=base.bias.detach())
            packed.set_slot(0, [layer.lora_A.weight], [layer.scaling * layer.lora_B.weight])
            outs.append(base(x))
            gated_lora(outs[-1], x, packed, slots)
    assert torch.equal(outs[0], outs[1])


def test_dora_scale_from_row_norms_and_projection():
    """The expanded norm equals ||W0 + B A||_row computed on the merged weight; 1 without a magnitude."""
    w = torch.randn(10, 4)
    a, b = [torch.randn(2, 4), torch.zeros(2, 4)], [torch.randn(6, 2), torch.zeros(4, 2)]
    mag = torch.rand(6) + 0.5
    c = dora_scale(w.square().sum(1), [w[:6] @ a[0].T, w[6:] @ a[1].T], a, b, [mag, None])
    torch.testing.assert_close(c[:6], mag / torch.linalg.norm(w[:6] + b[0] @ a[0], dim=1))
    assert torch.equal(c[6:], torch.ones(4))


def test_reset_slot_forgets_the_scale():
    packed = PackedLoRA(2, 2, 4, [3], torch.float32, "cpu", dora=True)
    packed.set_scale(1, torch.full((3,), 2.0))
    packed.reset_slot(1)
    assert torch.equal(packed.scale, torch.ones(2, 3))
    with pytest.raises(ValueError, match="without DoRA state"):
        PackedLoRA(1, 2, 4, [3], torch.float32, "cpu").set_scale(0, torch.ones(3))
