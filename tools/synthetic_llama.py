"""A synthetic ~1B Llama and a gated adapter for it, written locally (nothing is downloaded).

    python tools/synthetic_llama.py --out runs/bench/llama-1b     # model/ and adapter/ inside

The model: Llama architecture at hidden 2048, 16 layers, 32 query / 8 KV heads (GQA, head_dim 64),
MLP 8192, tied embeddings, SmolLM2's tokenizer (vocabulary 49152): 1.1B parameters, random weights
(normal, std 0.02; seed 0) stored in bf16. Serving throughput does not depend on what the weights are,
only on their shapes, so this stands in for a 1B model on a machine that cannot download one.

The adapter: rank 16, alpha 16, on all seven projections of every layer, A ~ N(0, 1/in) and
B ~ N(0, 0.02); each module's threshold is the median of its ratio ||B A x|| / ||W0 x|| over the
benchmark's own text (`tools/bench_serve.py` prompts, the first `--calibration-prompts` of them), so
the gate skips about half of the token updates on that text. Written with tspeft-rt's adapter writer,
so it is a regular gated directory (`tspeft-rt inspect` reads it).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from tspeft_rt.adapter import model_identity, write_adapter
from tspeft_rt.assets import BUNDLED_MODEL, resolve_model_path

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def write_model(out: Path, seed: int = 0) -> None:
    """config.json, model.safetensors (bf16) and the bundled model's tokenizer files into `out`."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(LlamaConfig(**CONFIG)).state_dict().items()}
    tensors = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings
        tensors[name] = (torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape) * 0.02).bfloat16()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    bundled = resolve_model_path(BUNDLED_MODEL)
    for name in TOKENIZER_FILES:
        if (bundled / name).is_file():
            shutil.copy(bundled / name, out / name)


def write_calibrated_adapter(model_dir: Path, out: Path, prompts: list[list[int]], rank: int = 16,
                             seed: int = 0) -> float:
    """Random rank-`rank` LoRA on every projection, each tau at its module's median ratio over the
    prompts (one fp32 Hugging Face forward). Returns the mean skip rate on those prompts."""
    from transformers import AutoConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    modules, ratios, hooks = {}, {}, []
    for name, linear in model.named_modules():
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        a = torch.randn(rank, linear.in_features, generator=gen) / linear.in_features ** 0.5
        b = torch.randn(linear.out_features, rank, generator=gen) * 0.02
        modules[name] = {"lora_A.weight": a, "lora_B.weight": b}

        def hook(module, args, base, name=name, a=a, b=b):
            x = args[0].reshape(-1, args[0].shape[-1])
            m = (x @ a.T) @ b.T
            ratios.setdefault(name, []).append(m.norm(dim=-1) / base.reshape(len(x), -1).norm(dim=-1).clamp_min(1e-6))
        hooks.append(linear.register_forward_hook(hook))
    with torch.no_grad():
        for ids in prompts:
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    for name, m in modules.items():
        r = torch.cat(ratios[name])
        m["tau"] = float(r.median())
        m["keep_rate"] = float((r >= m["tau"]).float().mean())
    skip = 1 - sum(m["keep_rate"] for m in modules.values()) / len(modules)
    out.mkdir(parents=True, exist_ok=True)
    identity = model_identity(AutoConfig.from_pretrained(model_dir), str(model_dir))
    write_adapter(out, method="ts-lora", base_model=str(model_dir), identity=identity, modules=modules, rank=rank,
                  alpha=float(rank), use_rslora=False, rank_pattern={}, alpha_pattern={},
                  training={"method": "ts-lora", "steps": 0, "skip_rate": skip,
                            "calibrated_on": f"{len(prompts)} benchmark prompts (tools/synthetic_llama.py)"})
    return skip


def ensure(out: Path, prompts: list[list[int]]) -> tuple[Path, Path]:
    """(model dir, adapter dir) under `out`, written on first use."""
    model_dir, adapter_dir = out.resolve() / "model", out.resolve() / "adapter"
    if not (model_dir / "model.safetensors").is_file():
        print(f"writing the synthetic 1B Llama to {model_dir} (once)", flush=True)
        write_model(model_dir)
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        skip = write_calibrated_adapter(model_dir, adapter_dir, prompts)
        print(f"wrote {adapter_dir}: taus calibrated to skip {skip:.1%} of token updates", flush=True)
    return model_dir, adapter_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench/llama-1b")
    ap.add_argument("--calibration-prompts", type=int, default=4)
    args = ap.parse_args()
    from bench_serve import prompts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(BUNDLED_MODEL))
    ensure(Path(args.out), prompts(tok, args.calibration_prompts, 128))


if __name__ == "__main__":
    main()
