"""The exported adapter directory: writing it, and the one loader that parses and validates it.

    adapter_config.json         a PEFT LoraConfig (stock PEFT and vLLM read it as a dense LoRA)
    adapter_model.safetensors   base_model.model.<path>.lora_A.weight [r, in], .lora_B.weight [out, r],
                                .lora_magnitude_vector [out] (DoRA)
    token_gate.safetensors      base_model.model.<path>.token_gate.tau [1], .token_gate.keep_rate [1] (fp32)
    token_gate_config.json      format, criterion, eps, method, base model identity, pruned modules, run summary

A directory without the two token_gate files is a plain LoRA/DoRA adapter. Every check failure
raises `AdapterError` naming the file, the key and what was expected. Evaluation, reference
inference (`generate`) and the vLLM plugin all read adapters through `load_adapter`.

    adapter = load_adapter("runs/demo/adapter")
    model, tok = load_base_model("smollm2-135m-instruct")
    attach_adapter(model, adapter)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tspeft_rt import __version__
from tspeft_rt.config import is_finite_number, is_pattern, is_positive_int, is_positive_number, is_rate, \
    is_regex, is_str_list
from tspeft_rt.errors import TspeftError, read_json, shown
from tspeft_rt.gate import EPS
from tspeft_rt.inject import pattern_value, targeted, track_valid_tokens, unmatched_targets
from tspeft_rt.layers import GateContext, GatedLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
GATE_CONFIG = "token_gate_config.json"
GATE_WEIGHTS = "token_gate.safetensors"
GATE_FORMAT = "tspeft-token-gate"
GATE_FORMAT_VERSION = 1
PREFIX = "base_model.model."
_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, GATE_CONFIG, GATE_WEIGHTS)
_WEIGHT_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_GATE_KEY = re.compile(r"^base_model\.model\.(.+)\.token_gate\.(tau|keep_rate)$")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The config fields that fix a model's module shapes: the identity an adapter is checked against.
_IDENTITY_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size")


class AdapterError(TspeftError):
    pass


@dataclass
class ModuleAdapter:
    """One adapted module: its tensors and, for a gated adapter, tau and the training keep rate."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None
    tau: float | None = None
    keep_rate: float | None = None

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


@dataclass
class Adapter:
    path: Path
    config: dict
    modules: dict[str, ModuleAdapter]
    gate_config: dict | None = None

    @property
    def gated(self) -> bool:
        return self.gate_config is not None

    @property
    def dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def kind(self) -> str:
        return ("TS-" if self.gated else "") + ("DoRA" if self.dora else "LoRA")

    @property
    def pruned(self) -> dict:
        return (self.gate_config or {}).get("pruned", {})


def model_identity(config: Any, name: str) -> dict:
    """The base model's name and a hash of the config fields that fix its module shapes."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    shape = {k: cfg.get(k) for k in _IDENTITY_KEYS}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
    return {"name": name, "model_type": cfg.get("model_type"), "config_hash": digest}


# ---- writing ----------------------------------------------------------------------------------
def write_adapter(out: Path, *, method: str, base_model: str, identity: dict, modules: dict[str, dict],
                  rank: int, alpha: float, use_rslora: bool, rank_pattern: dict, alpha_pattern: dict,
                  pruned: dict | None = None, pruning: dict | None = None, training: dict | None = None) -> None:
    """Write the adapter into the empty folder `out`: the two PEFT files, plus the two token_gate files
    for a gated method. `modules[path]` holds lora_A.weight, lora_B.weight, optionally
    lora_magnitude_vector, and for gated methods tau and keep_rate."""
    gated = method.startswith("ts-")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "target_modules": sorted(modules), "lora_dropout": 0.0,
        "bias": "none", "use_rslora": use_rslora, "use_dora": method.endswith("dora"),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    weights = {f"{PREFIX}{p}.{k}": t.detach().float().contiguous()
               for p, m in modules.items() for k, t in m.items() if k in ("lora_A.weight", "lora_B.weight",
                                                                             "lora_magnitude_vector")}
    save_file(weights, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    if not gated:
        return
    gates = {}
    for p, m in modules.items():
        gates[f"{PREFIX}{p}.token_gate.tau"] = torch.tensor([float(m["tau"])], dtype=torch.float32)
        gates[f"{PREFIX}{p}.token_gate.keep_rate"] = torch.tensor([float(m["keep_rate"])], dtype=torch.float32)
    save_file(gates, out / GATE_WEIGHTS, metadata={"format": "pt"})
    gate_config = {
        "format": GATE_FORMAT, "format_version": GATE_FORMAT_VERSION, "criterion": "l2_ratio_ge", "eps": EPS,
        "base_includes_bias": True, "delta_includes_scaling": True, "method": "dora" if config["use_dora"] else "lora",
        "base_model": identity, "pruned": pruned or {}, "pruning": pruning or {}, "training": training or {},
        "tspeft_rt_version": __version__,
    }
    (out / GATE_CONFIG).write_text(json.dumps(gate_config, indent=2))


# ---- loading and validation -------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise AdapterError(f"{path}: missing (an adapter directory needs {path.name})")
    return read_json(path, AdapterError)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a damaged file raises safetensors' and OS errors
        raise AdapterError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _check_config(path: Path, cfg: dict) -> None:
    def need(key: str, ok: bool, expected: str) -> None:
        if not ok:
            raise AdapterError(f"{path}: key {key!r} must be {expected}, found {shown(cfg.get(key, '<missing>'))}")

    need("peft_type", cfg.get("peft_type") == "LORA", '"LORA"')
    need("r", is_positive_int(cfg.get("r")), "a positive integer")
    need("lora_alpha", is_positive_number(cfg.get("lora_alpha")), "a finite number > 0")
    need("target_modules", is_str_list(cfg.get("target_modules")) or is_regex(cfg.get("target_modules")),
         "a list of module names or paths, or a regular expression (PEFT's forms)")
    need("use_dora", isinstance(cfg.get("use_dora", False), bool), "true or false")
    need("use_rslora", isinstance(cfg.get("use_rslora", False), bool), "true or false")
    need("bias", cfg.get("bias", "none") == "none", '"none"')
    need("rank_pattern", is_pattern(cfg.get("rank_pattern") or {}, is_positive_int), "an object {regex: rank > 0}")
    need("alpha_pattern", is_pattern(cfg.get("alpha_pattern") or {}, is_positive_number),
         "an object {regex: alpha > 0}")


def _check_gate_config(path: Path, cfg: dict) -> None:
    if cfg.get("format") != GATE_FORMAT:
        raise AdapterError(f"{path}: key 'format' must be {GATE_FORMAT!r}, found {shown(cfg.get('format'))}")
    if cfg.get("format_version") != GATE_FORMAT_VERSION:
        raise AdapterError(f"{path}: unknown format_version {shown(cfg.get('format_version'))}; this tspeft-rt "
                           f"reads version {GATE_FORMAT_VERSION}")
    if cfg.get("criterion") != "l2_ratio_ge":
        raise AdapterError(f"{path}: key 'criterion' must be 'l2_ratio_ge', found {shown(cfg.get('criterion'))}")
    if cfg.get("eps") != EPS:
        raise AdapterError(f"{path}: key 'eps' must be {EPS}, found {shown(cfg.get('eps'))}")
    if cfg.get("method") not in ("lora", "dora"):
        raise AdapterError(f"{path}: key 'method' must be 'lora' or 'dora', found {shown(cfg.get('method'))}")
    base = cfg.get("base_model")
    if not (isinstance(base, dict) and isinstance(base.get("config_hash"), str) and isinstance(base.get("name"), str)):
        raise AdapterError(f"{path}: key 'base_model' must be an object with string 'name' and 'config_hash'")
    pruned = cfg.get("pruned", {})
    if not (isinstance(pruned, dict) and all(
            isinstance(p, dict) and isinstance(p.get("reason"), str) and is_rate(p.get("keep_rate"))
            and is_finite_number(p.get("weight_norm")) and p["weight_norm"] >= 0 for p in pruned.values())):
        raise AdapterError(f"{path}: key 'pruned' must be an object "
                           "{module: {keep_rate in [0, 1], weight_norm >= 0, reason}}")
    for key in ("pruning", "training"):
        if not isinstance(cfg.get(key, {}), dict):
            raise AdapterError(f"{path}: key {key!r} must be an object, found {type(cfg[key]).__name__}")
    skip = cfg.get("training", {}).get("skip_rate", 0.0)
    if not is_rate(skip):  # `inspect` prints it as a number
        raise AdapterError(f"{path}: key 'training.skip_rate' must be a number in [0, 1], found {shown(skip)}")


def _check_tensor(path: Path, key: str, t: torch.Tensor, shape: tuple, dtypes=_FLOAT_DTYPES) -> None:
    if t.dtype not in dtypes:
        raise AdapterError(f"{path}: {key}: dtype {t.dtype} not allowed, expected one of {', '.join(map(str, dtypes))}")
    if tuple(t.shape) != shape:
        raise AdapterError(f"{path}: {key}: shape {list(t.shape)}, expected {list(shape)}")
    if not torch.isfinite(t).all():
        raise AdapterError(f"{path}: {key}: holds non-finite values")


def load_adapter(path: str | Path) -> Adapter:
    """Parse and validate an adapter directory (without a base model; see `attach_adapter`)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory; expected an adapter directory ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS})")
    config = _read_json(path / ADAPTER_CONFIG)
    _check_config(path / ADAPTER_CONFIG, config)
    wpath = path / ADAPTER_WEIGHTS
    tensors = _read_tensors(wpath)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _WEIGHT_KEY.match(key)
        if not m:
            raise AdapterError(f"{wpath}: unexpected key {key!r}; expected {PREFIX}<module>.lora_A.weight, "
                               ".lora_B.weight or .lora_magnitude_vector")
        grouped.setdefault(m.group(1), {})[m.group(2)] = t
    if not grouped:
        raise AdapterError(f"{wpath}: holds no adapted modules")
    _check_targets(wpath, config["target_modules"], sorted(grouped))
    dora = config.get("use_dora", False)
    modules = {name: _module(wpath, name, parts, config, dora) for name, parts in sorted(grouped.items())}
    gate_config = _load_gates(path, modules)
    return Adapter(path, config, modules, gate_config)


def _check_targets(wpath: Path, targets: str | list[str], modules: list[str]) -> None:
    """Every module with weights is one `target_modules` selects, and every listed target has weights (a
    listed name with no weights anywhere is a damaged or mislabelled adapter)."""
    extra = [m for m in modules if not targeted(m, targets)]
    missing = unmatched_targets(targets, modules)
    if extra or missing:
        raise AdapterError(f"{wpath}: modules do not match target_modules in {ADAPTER_CONFIG}: "
                           f"missing weights for {missing[:3]}, weights not in target_modules {extra[:3]}")


def _module(wpath: Path, name: str, parts: dict, config: dict, dora: bool) -> ModuleAdapter:
    key = f"{PREFIX}{name}"
    for part in ("lora_A.weight", "lora_B.weight"):
        if part not in parts:
            raise AdapterError(f"{wpath}: {key}.{part} is missing")
    if dora != ("lora_magnitude_vector" in parts):
        raise AdapterError(f"{wpath}: {key}.lora_magnitude_vector {'missing' if dora else 'present'}, but "
                           f"use_dora is {str(dora).lower()} in {ADAPTER_CONFIG}")
    A, B = parts["lora_A.weight"], parts["lora_B.weight"]
    rank = int(pattern_value(name, config.get("rank_pattern") or {}, config["r"]))
    alpha = float(pattern_value(name, config.get("alpha_pattern") or {}, config["lora_alpha"]))
    if A.dim() != 2 or B.dim() != 2:
        raise AdapterError(f"{wpath}: {key}: lora_A and lora_B must be matrices, found shapes "
                           f"{list(A.shape)} and {list(B.shape)}")
    _check_tensor(wpath, f"{key}.lora_A.weight", A, (rank, A.shape[1]))
    _check_tensor(wpath, f"{key}.lora_B.weight", B, (B.shape[0], rank))
    magnitude = parts.get("lora_magnitude_vector")
    if magnitude is not None:
        _check_tensor(wpath, f"{key}.lora_magnitude_vector", magnitude, (B.shape[0],))
    return ModuleAdapter(A.float(), B.float(), alpha, None if magnitude is None else magnitude.float())


def has_gate_files(path: str | Path) -> bool:
    """Whether a directory claims to be a gated adapter (either gate file present)."""
    return any((Path(path) / name).exists() for name in (GATE_CONFIG, GATE_WEIGHTS))


def _load_gates(path: Path, modules: dict[str, ModuleAdapter]) -> dict | None:
    cpath, gpath = path / GATE_CONFIG, path / GATE_WEIGHTS
    if not has_gate_files(path):
        return None
    if not (cpath.is_file() and gpath.is_file()):
        raise AdapterError(f"{path}: {GATE_CONFIG} and {GATE_WEIGHTS} come together; found only "
                           f"{cpath.name if cpath.exists() else gpath.name}")
    gate_config = _read_json(cpath)
    _check_gate_config(cpath, gate_config)
    dora = any(m.magnitude is not None for m in modules.values())
    if (gate_config["method"] == "dora") != dora:
        raise AdapterError(f"{cpath}: method is {gate_config['method']!r}, but the weights are "
                           f"{'DoRA' if dora else 'LoRA'} (use_dora in {ADAPTER_CONFIG})")
    tensors = _read_tensors(gpath)
    gates: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _GATE_KEY.match(key)
        if not m:
            raise AdapterError(f"{gpath}: unexpected key {key!r}; expected {PREFIX}<module>.token_gate.tau or .keep_rate")
        if m.group(1) not in modules:
            raise AdapterError(f"{gpath}: {key} is for a module without adapter weights")
        _check_tensor(gpath, key, t, (1,), (torch.float32,))
        gates.setdefault(m.group(1), {})[m.group(2)] = t
    for name, module in modules.items():
        g = gates.get(name, {})
        for part in ("tau", "keep_rate"):
            if part not in g:  # a module without a gate is an error, never a silent "always on"
                raise AdapterError(f"{gpath}: {PREFIX}{name}.token_gate.{part} is missing")
        tau, keep = float(g["tau"]), float(g["keep_rate"])
        if tau < 0:
            raise AdapterError(f"{gpath}: {PREFIX}{name}.token_gate.tau is {tau}, expected >= 0")
        if not 0.0 <= keep <= 1.0:
            raise AdapterError(f"{gpath}: {PREFIX}{name}.token_gate.keep_rate is {keep}, expected in [0, 1]")
        module.tau, module.keep_rate = tau, keep
    return gate_config


def check_identity(adapter: Adapter, config: Any) -> None:
    """Refuse a gated adapter trained for a base model of other shapes than `config` (an HF config)."""
    identity = (adapter.gate_config or {}).get("base_model")
    if identity is None:
        return
    mine = model_identity(config, identity.get("name", ""))
    if mine["config_hash"] != identity["config_hash"]:
        raise AdapterError(f"{adapter.path / GATE_CONFIG}: adapter was trained for base model "
                           f"{identity.get('name')!r} ({identity.get('model_type')}, config hash "
                           f"{identity['config_hash']}); this model is {mine['model_type']} with hash {mine['config_hash']}")


def attach_adapter(model: nn.Module, adapter: Adapter, context: GateContext | None = None) -> list[str]:
    """Inject `adapter` into a Hugging Face model after checking it fits; returns the module paths."""
    check_identity(adapter, model.config)
    use_rslora = bool(adapter.config.get("use_rslora"))
    context = context or GateContext()
    layers = {}
    for name, m in adapter.modules.items():
        base = _fitting_base(model.get_submodule, adapter, name)
        layer = GatedLinear(base, rank=m.rank, alpha=m.alpha, dora=m.magnitude is not None, gated=adapter.gated,
                            use_rslora=use_rslora, context=context)
        _copy_weights(layer, m)
        if layer.token_gate is not None:
            with torch.no_grad():
                layer.token_gate.tau.fill_(m.tau)
        layers[name] = layer
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model.requires_grad_(False)
    track_valid_tokens(model, context)
    return list(layers)


def load_weights(layers: dict[str, GatedLinear], adapter: Adapter, model_config: Any) -> None:
    """Copy `adapter`'s weights (not its thresholds) into `layers`, layers injected for exactly its modules
    with its ranks (training from an existing adapter: `TrainConfig.init_adapter`)."""
    check_identity(adapter, model_config)
    for name, m in adapter.modules.items():
        _fitting_base(lambda n: layers[n].base_layer, adapter, name)
        _copy_weights(layers[name], m)


def _fitting_base(get_module, adapter: Adapter, name: str) -> nn.Linear:
    """The base `nn.Linear` adapter module `name` goes on, checked to exist and to fit its shapes."""
    where = adapter.path / ADAPTER_WEIGHTS
    try:
        base = get_module(name)
    except (AttributeError, KeyError):
        raise AdapterError(f"{where}: module {name!r} does not exist in the base model") from None
    if not isinstance(base, nn.Linear):
        raise AdapterError(f"{where}: module {name!r} is a {type(base).__name__}, expected nn.Linear")
    m = adapter.modules[name]
    if m.lora_A.shape[1] != base.in_features or m.lora_B.shape[0] != base.out_features:
        raise AdapterError(f"{where}: {name}: adapter maps {m.lora_A.shape[1]} -> {m.lora_B.shape[0]} features, "
                           f"the base module {base.in_features} -> {base.out_features}")
    return base


@torch.no_grad()
def _copy_weights(layer: GatedLinear, m: ModuleAdapter) -> None:
    layer.lora_A.weight.copy_(m.lora_A)
    layer.lora_B.weight.copy_(m.lora_B)
    if m.magnitude is not None:
        layer.lora_magnitude_vector.copy_(m.magnitude)


def describe(adapter: Adapter) -> dict:
    """What `tspeft-rt inspect` prints: kind, base model, modules with tau and keep rate, pruning, size."""
    gate = adapter.gate_config or {}
    return {
        "path": str(adapter.path),
        "kind": adapter.kind,
        "format": f"{gate['format']} v{gate['format_version']}" if gate else "PEFT LoRA (no token gate)",
        "base_model": gate.get("base_model") or {"name": adapter.config.get("base_model_name_or_path")},
        "base_model_name_or_path": adapter.config.get("base_model_name_or_path"),
        "rank": adapter.config["r"], "alpha": adapter.config["lora_alpha"],
        "use_rslora": bool(adapter.config.get("use_rslora")),
        "modules": {n: {"rank": m.rank, "tau": m.tau, "keep_rate": m.keep_rate} for n, m in adapter.modules.items()},
        "pruned": adapter.pruned,
        "pruning": gate.get("pruning", {}),
        "training": gate.get("training", {}),
        "size_bytes": sum((adapter.path / f).stat().st_size for f in _FILES if (adapter.path / f).is_file()),
        "warning": ("stock PEFT, and vLLM without the tspeft-rt plugin, apply this adapter densely to every "
                    "token: the token gates are ignored there") if adapter.gated else None,
    }
