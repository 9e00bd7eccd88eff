"""Loading a Hugging Face causal LM and injecting gated adapters into it.

    model, tok = load_base_model("smollm2-135m-instruct")
    names = inject_adapters(model, AdapterSpec(method="ts-lora", target_modules=["q_proj", "v_proj"]))
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tspeft_rt.assets import resolve_model_path
from tspeft_rt.errors import ConfigError, ModelError
from tspeft_rt.layers import GateContext, GatedLinear


@dataclass
class AdapterSpec:
    method: str = "ts-lora"
    target_modules: Any = "all-linear"
    rank: int = 8
    alpha: float = 16.0
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    dropout: float = 0.0
    gate_temperature: float = 1.0

    @classmethod
    def from_config(cls, cfg: Any) -> "AdapterSpec":
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local folder or the bundled model name; a clear error otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad folder
        raise ModelError(f"model {str(path)!r}: no readable config.json ({type(e).__name__}: {e})") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = config.architectures or []
    # A BERT folder maps to BertLMHeadModel too, but its weights were trained to see both directions:
    # when the folder names its architectures, one of them must be a causal LM class.
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or archs and not causal_names & set(archs):
        raise ModelError(
            f"model {str(path)!r}: model_type {config.model_type!r} (architectures: {', '.join(archs) or 'none'}) "
            "is not a causal language model; expected a folder AutoModelForCausalLM can load"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - damaged weights raise safetensors', torch's and OS errors
        raise ModelError(f"model {str(path)!r}: could not load ({type(e).__name__}: {e})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def linear_module_names(model: nn.Module) -> list[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def targeted(path: str, targets: str | list[str]) -> bool:
    """Whether PEFT's `target_modules` selects the module at `path`: a regular expression matches the whole
    path; a list entry names the module (`q_proj`) or a path suffix (`layers.0.self_attn.q_proj`)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def unmatched_targets(targets: str | list[str], paths: list[str]) -> list[str]:
    """The entries of a `target_modules` list that select none of `paths` (a regex: none reported)."""
    return [] if isinstance(targets, str) else [t for t in targets if not any(targeted(p, [t]) for p in paths)]


def match_targets(model: nn.Module, target_modules: Any) -> list[str]:
    """Full paths of the `nn.Linear` modules selected by names (suffix match), a regex, or 'all-linear'."""
    candidates = linear_module_names(model)
    if target_modules == "all-linear":
        names = candidates
    elif isinstance(target_modules, (str, list, tuple)):
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
        names = [n for n in candidates if targeted(n, targets)]
        missing = unmatched_targets(targets, candidates)
        if missing and names:
            raise ConfigError(f"target_modules {missing} match no linear module; candidates: {_short(candidates)}")
    else:
        raise ConfigError(f"target_modules: expected a list of names, a regex string or 'all-linear', got {target_modules!r}")
    if not names:
        raise ConfigError(f"target_modules {target_modules!r} match no linear module; candidates: {_short(candidates)}")
    return names


def _short(names: list[str]) -> str:
    """Distinct module kinds (last path component), then a few full paths."""
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    return f"{', '.join(kinds)} (e.g. {names[0]})" if names else "none"


def pattern_value(name: str, pattern: dict, default: Any) -> Any:
    for key, value in pattern.items():  # PEFT's rule: the key matches the end of the path
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def inject_adapters(model: nn.Module, spec: AdapterSpec, context: GateContext | None = None) -> list[str]:
    """Freeze the model and replace each target `nn.Linear` by a `GatedLinear`; returns the paths."""
    model.requires_grad_(False)
    names = match_targets(model, spec.target_modules)
    gated = spec.method.startswith("ts-")
    context = context or GateContext()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = GatedLinear(
            getattr(parent, child),
            rank=int(pattern_value(name, spec.rank_pattern, spec.rank)),
            alpha=float(pattern_value(name, spec.alpha_pattern, spec.alpha)),
            dora=spec.method.endswith("dora"),
            gated=gated,
            dropout=spec.dropout,
            use_rslora=spec.use_rslora,
            context=context,
            temperature=spec.gate_temperature,
        )
        setattr(parent, child, layer)
    track_valid_tokens(model, context)
    return names


def track_valid_tokens(model: nn.Module, context: GateContext) -> None:
    """Tell the gates which flattened positions are real tokens, from each call's attention mask
    (a mask of another length, as in cached generation, means: count every token)."""

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        context.valid = mask.reshape(-1).bool() if mask is not None and mask.dim() == 2 else None

    model.register_forward_pre_hook(hook, with_kwargs=True)


def adapted_layers(model: nn.Module) -> dict[str, GatedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedLinear)}


def adapter_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights: A, B, magnitude; thresholds: tau), the two optimizer groups."""
    weights, taus = [], []
    for layer in adapted_layers(model).values():
        weights += [layer.lora_A.weight, layer.lora_B.weight]
        if layer.dora:
            weights.append(layer.lora_magnitude_vector)
        if layer.token_gate is not None:
            taus.append(layer.token_gate.tau)
    return weights, taus


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the module paths (`<path>.lora_A.weight`, `<path>.token_gate.tau`)."""
    out = {}
    for name, layer in adapted_layers(model).items():
        for key, t in layer.state_dict().items():
            if not key.startswith("base_layer."):
                out[f"{name}.{key}"] = t.detach().clone()
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    weights, taus = adapter_parameters(model)
    trainable = sum(p.numel() for p in weights + taus if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
