"""Starting from an adapter PEFT itself saved: the one loader reads PEFT's target_modules forms, the HF path
reproduces PEFT's outputs, and `train` gates it by calibration (weights frozen, bit for bit) or fine-tunes
weights and thresholds together."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tspeft_rt.adapter import AdapterError, attach_adapter, load_adapter
from tspeft_rt.checkpoint import latest_checkpoint
from tspeft_rt.config import build_config
from tspeft_rt.errors import ConfigError
from tspeft_rt.export import export_checkpoint
from tspeft_rt.inject import load_base_model
from tspeft_rt.trainer import train

from test_train import tiny_config


def peft_adapter(model_dir: Path, out: Path, targets, dora: bool = False, seed: int = 0) -> Path:
    """A LoRA (DoRA) saved by PEFT's own save_pretrained, with non-zero B (a trained adapter's shape)."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_base_model(str(model_dir))
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    return out


def peft_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    model, _ = load_base_model(str(model_dir))
    return PeftModel.from_pretrained(model, adapter_dir).eval()(input_ids=ids).logits


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r".*\.(q_proj|down_proj)"], ids=["names", "regex"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_saved_adapter_loads_and_matches_peft(tiny_model_dir, tmp_path, targets, dora):
    path = peft_adapter(tiny_model_dir, tmp_path / "peft", targets, dora)
    adapter = load_adapter(path)
    assert len(adapter.modules) == 4 and adapter.dora == dora and not adapter.gated
    model, _ = load_base_model(str(tiny_model_dir))
    attach_adapter(model, adapter)
    ids = torch.randint(0, 1000, (2, 12))
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, peft_logits(tiny_model_dir, path, ids),
                               rtol=1e-5, atol=1e-5)


def test_target_modules_must_cover_the_weights(tiny_model_dir, tmp_path):
    path = peft_adapter(tiny_model_dir, tmp_path / "peft", ["q_proj", "v_proj"])
    config = (path / "adapter_config.json").read_text()
    (path / "adapter_config.json").write_text(config.replace('"v_proj"', '"k_proj"'))
    with pytest.raises(AdapterError, match=r"adapter_config.json: missing weights for \['k_proj'\], "
                                           r"weights not in target_modules \['model.layers.0.self_attn.v_proj'"):
        load_adapter(path)


def run_config(model_dir: Path, out: Path, **over) -> dict:
    return tiny_config(model_dir, out, **{"method": "ts-lora", "tau_warmup_steps": 0, "steps": 12, "save_every": 0, **over})


def test_calibration_gates_a_peft_lora_with_its_weights_frozen(tiny_model_dir, tmp_path):
    path = peft_adapter(tiny_model_dir, tmp_path / "peft", ["q_proj", "v_proj"])
    result = train(build_config(run_config(tiny_model_dir, tmp_path / "run", init_adapter=str(path),
                                           train_weights=False), "test"))
    assert abs(result["train_skip"] - 0.5) <= 0.1
    export_checkpoint(tmp_path / "run", tmp_path / "gated")
    gated, original = load_adapter(tmp_path / "gated"), load_adapter(path)
    assert gated.gated and set(gated.modules) == set(original.modules)
    for name, m in original.modules.items():  # frozen means bit for bit
        assert torch.equal(gated.modules[name].lora_A, m.lora_A) and torch.equal(gated.modules[name].lora_B, m.lora_B)
        assert gated.modules[name].tau > 0


def test_finetuning_starts_from_the_adapter_and_trains_both(tiny_model_dir, tmp_path):
    path = peft_adapter(tiny_model_dir, tmp_path / "peft", ["q_proj", "v_proj"])
    train(build_config(run_config(tiny_model_dir, tmp_path / "run", init_adapter=str(path)), "test"))
    weights = load_file(latest_checkpoint(tmp_path / "run") / "adapter.safetensors")
    original = load_adapter(path).modules
    name = "model.layers.0.self_attn.q_proj"
    moved = (weights[f"{name}.lora_B.weight"] - original[name].lora_B).abs().max()
    assert 0 < moved < original[name].lora_B.abs().max()  # trained from the adapter, not from B = 0
    assert float(weights[f"{name}.token_gate.tau"]) > 0
    assert sorted(k.rsplit(".", 2)[0] for k in weights if k.endswith("lora_A.weight")) == sorted(original)


def test_bad_init_adapters_are_refused_clearly(tiny_model_dir, tmp_path, bundled_dir):
    lora = peft_adapter(tiny_model_dir, tmp_path / "lora", ["q_proj"])
    with pytest.raises(ConfigError, match="init_adapter .* holds a LoRA adapter, method 'ts-dora' trains DoRA"):
        train(build_config(run_config(tiny_model_dir, tmp_path / "a", init_adapter=str(lora), method="ts-dora"), "t"))
    with pytest.raises(ConfigError, match="'train_weights': expected true unless init_adapter is set"):
        build_config(run_config(tiny_model_dir, tmp_path / "b", train_weights=False), "t")
    with pytest.raises(AdapterError, match="not a directory"):
        train(build_config(run_config(tiny_model_dir, tmp_path / "c", init_adapter=str(tmp_path / "none")), "t"))
    with pytest.raises(AdapterError, match=r"q_proj: adapter maps 64 -> 64 features, the base module 576 -> 576"):
        train(build_config(run_config(bundled_dir, tmp_path / "d", init_adapter=str(lora)), "t"))
