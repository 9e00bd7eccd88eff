"""The bundled model and an adapter for it, widened to attention head counts that tensor parallelism 2
can split, computing exactly the same function.

SmolLM2-135M has 9 query heads over 3 K/V heads (3 query heads per K/V head); no tensor-parallel size
above 1 divides that. Padded to 12 query heads over 4 K/V heads, the 3 new query heads share the 1 new
K/V head, and every new row of q/k/v_proj and every new column of o_proj is zero: a new head's query is
0, so it attends uniformly over values that are 0 and writes 0 through o_proj's zero columns. The
adapter gets the same zero rows (lora_B of q/k/v_proj) and columns (lora_A of o_proj), so every module's
base output and delta keep their norms and the gates decide as on the original model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HEADS, KV_HEADS = 12, 4  # from 9 and 3: three query heads per K/V head, as before


def widen(weights: dict[str, torch.Tensor], head_dim: int, rows_of: str, cols_of: str) -> dict[str, torch.Tensor]:
    """Zero rows for the new heads in q/k/v_proj's `rows_of` tensors, zero columns in o_proj's `cols_of`."""
    sizes = {"q_proj": HEADS * head_dim, "k_proj": KV_HEADS * head_dim, "v_proj": KV_HEADS * head_dim}
    for key, w in weights.items():
        for proj, n in sizes.items():
            if key.endswith(f"self_attn.{proj}.{rows_of}"):
                weights[key] = torch.cat([w, w.new_zeros(n - w.shape[0], w.shape[1])])
        if key.endswith(f"self_attn.o_proj.{cols_of}"):
            weights[key] = torch.cat([w, w.new_zeros(w.shape[0], sizes["q_proj"] - w.shape[1])], dim=1)
    return weights


def pad_model(src: Path, out: Path) -> Path:
    """Copy the model folder `src` to `out` with the attention widened to HEADS / KV_HEADS."""
    shutil.copytree(src, out)
    config = json.loads((src / "config.json").read_text())
    weights = widen(load_file(src / "model.safetensors"), config["head_dim"], "weight", "weight")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config.update(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def pad_adapter(src: Path, out: Path, model_dir: Path) -> Path:
    """Copy the adapter folder `src` (trained on the unpadded model) to `out`, widened like `pad_model`
    and bound to the padded model `model_dir`."""
    from transformers import AutoConfig

    from tspeft_rt.adapter import model_identity

    shutil.copytree(src, out)
    config = AutoConfig.from_pretrained(model_dir)
    weights = widen(load_file(src / "adapter_model.safetensors"), config.head_dim, "lora_B.weight", "lora_A.weight")
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    gate_config = json.loads((src / "token_gate_config.json").read_text())
    gate_config["base_model"] = model_identity(config, model_dir.name)
    (out / "token_gate_config.json").write_text(json.dumps(gate_config, indent=2))
    return out
