"""The benchmarks' synthetic model and calibrated adapter (tools/synthetic_llama.py), on the tiny model, and the
CPU op benchmark's layers (tools/bench_cpu_op.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_cpu_op import layer_calls, packed_layer  # noqa: E402
from synthetic_llama import CONFIG, write_calibrated_adapter  # noqa: E402

from tspeft_rt.generate import load_model_with_adapter  # noqa: E402
from tspeft_rt.inject import adapted_layers  # noqa: E402


def test_synthetic_model_is_a_1b_gqa_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    params = sum(p.numel() for p in model.parameters())
    assert 1.0e9 < params < 1.2e9, params
    assert CONFIG["num_key_value_heads"] < CONFIG["num_attention_heads"]


def test_calibrated_adapter_skips_half_on_its_text_through_the_gate(tiny_model_dir, tmp_path):
    """The thresholds come from hooks on the Hugging Face model; the skip they give must be what
    tspeft-rt's own gate measures on the same tokens (the adapter loads through the one loader)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (64,), generator=gen).tolist() for _ in range(3)]
    skip = write_calibrated_adapter(tiny_model_dir, tmp_path / "adapter", prompts, rank=4)
    assert abs(skip - 0.5) < 0.02
    model, _, adapter = load_model_with_adapter(str(tiny_model_dir), str(tmp_path / "adapter"))
    assert adapter.gated and len(adapter.modules) == 7 * 2
    assert {m.rank for m in adapter.modules.values()} == {4}
    layers = adapted_layers(model)
    for layer in layers.values():
        layer.token_gate.reset_stats()
    with torch.no_grad():
        for ids in prompts:
            model(torch.tensor([ids]))
    stats = [layer.token_gate.reset_stats() for layer in layers.values()]
    measured = 1 - sum(s.kept for s in stats) / sum(s.valid for s in stats)
    assert abs(measured - skip) < 0.01, (measured, skip)


def test_cpu_op_benchmark_layers_keep_half_gated_and_all_plain():
    """What bench_cpu_op.py times: the gated layer keeps about half of the updates of every slice, the
    plain one all of them (counted by the op itself); its shapes are the synthetic Llama's."""
    from tspeft_rt.kernels.gated_lora_cpu import cpu_op_loaded, gated_lora_cpu

    assert cpu_op_loaded()
    assert layer_calls()["gate_up"] == (CONFIG["hidden_size"], [CONFIG["intermediate_size"]] * 2)
    torch.manual_seed(0)
    tokens, slices = 200, [48, 16, 16]
    x, w0 = torch.randn(tokens, 64), torch.randn(sum(slices), 64) / 8
    for variant, kept in (("gated", 0.5), ("plain", 1.0)):
        counters = torch.zeros(2, 1, dtype=torch.int64)
        gated_lora_cpu(x @ w0.t(), x, packed_layer(x, w0, slices, variant), torch.zeros(tokens, dtype=torch.int32),
                       counters)
        assert counters[0, 0] == tokens * len(slices)
        assert abs(counters[1, 0] / counters[0, 0] - kept) < 0.02, (variant, counters)
