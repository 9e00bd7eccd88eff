"""`tspeft-rt export`: a training checkpoint -> an adapter directory (see `tspeft_rt.adapter`).

    tspeft-rt export runs/demo runs/demo/adapter
    tspeft-rt export runs/demo/checkpoints/step-000040 out/ --prune-below 0.2
    tspeft-rt export runs/demo out/ --max-modules 0.25 --rank-by keep     # keep a quarter of the modules

Pruning removes a module from both tensor files and from `target_modules`, and records it with its
keep rate and the rule in `token_gate_config.json`. The directory is written beside OUT_DIR, reloaded
through the loader to validate it, and only then renamed into place.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from tspeft_rt.adapter import Adapter, AdapterError, load_adapter, model_identity, write_adapter
from tspeft_rt.assets import resolve_model_path
from tspeft_rt.checkpoint import latest_checkpoint
from tspeft_rt.config import build_config
from tspeft_rt.errors import CheckpointError
from tspeft_rt.inject import pattern_value
from tspeft_rt.layers import lora_scaling

RANK_BY = ("keep", "norm", "random")
_CHECKPOINT_PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "token_gate.tau")


def find_checkpoint(source: Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint of a run folder."""
    if (source / "adapter.safetensors").is_file():
        return source
    ckpt = latest_checkpoint(source) if source.is_dir() else None
    if ckpt is None:
        raise CheckpointError(f"{source}: not a checkpoint (no adapter.safetensors) nor a run folder with "
                              "checkpoints/latest")
    return ckpt


def read_checkpoint(ckpt: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensors grouped by module path, meta) of a checkpoint; every problem names the file and key."""
    wfile, mfile = ckpt / "adapter.safetensors", ckpt / "meta.json"
    try:
        tensors = load_file(wfile)
        meta = json.loads(mfile.read_text())
    except Exception as e:  # noqa: BLE001 - damaged files raise many types
        raise CheckpointError(f"{ckpt}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict) and isinstance(meta.get("step"), int)):
        raise CheckpointError(f"{mfile}: expected an object with 'config' (object) and 'step' (integer)")
    keep_rates = meta.get("keep_rates") or {}
    if not isinstance(keep_rates, dict) or not all(
            isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in keep_rates.values()):
        raise CheckpointError(f"{mfile}: 'keep_rates' must map modules to numbers in [0, 1]")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        part = next((p for p in _CHECKPOINT_PARTS if key.endswith("." + p)), None)
        if part is None:
            raise CheckpointError(f"{wfile}: unexpected key {key!r}")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{wfile}: {key} holds non-finite values")
        if part == "token_gate.tau" and (t.numel() != 1 or float(t) < 0):
            raise CheckpointError(f"{wfile}: {key} is {t.tolist()}; expected one tau >= 0")
        modules.setdefault(key[: -len(part) - 1], {})[part] = t
    return modules, meta


def weight_norm(m: dict[str, torch.Tensor], scaling: float) -> float:
    """||s B A||_F without forming B A: sqrt(trace((B^T B)(A A^T))) * s."""
    A, B = m["lora_A.weight"].double(), m["lora_B.weight"].double()
    return scaling * float(((B.t() @ B) * (A @ A.t())).sum().clamp_min(0).sqrt())


def choose_pruned(scores: dict[str, dict], prune_below: float | None, max_modules: float | None,
                  rank_by: str, seed: int) -> dict[str, dict]:
    """Which modules to drop, each with its keep rate, weight norm and the reason."""
    pruned = {}
    if prune_below is not None:
        for name, s in scores.items():
            if s["keep_rate"] < prune_below:
                pruned[name] = dict(s, reason=f"keep rate {s['keep_rate']:.4f} < {prune_below}")
    if max_modules is not None:
        n = len(scores)
        budget = int(max_modules) if max_modules >= 1 else max(1, round(max_modules * n))
        remaining = [m for m in scores if m not in pruned]
        if rank_by == "random":
            ranked = remaining[:]
            random.Random(seed).shuffle(ranked)
        else:
            key = "keep_rate" if rank_by == "keep" else "weight_norm"
            ranked = sorted(remaining, key=lambda m: -scores[m][key])
        for name in ranked[budget:]:
            pruned[name] = dict(scores[name], reason=f"outside the budget of {budget} modules ranked by {rank_by}")
    return pruned


def export_checkpoint(source: str | Path, out: str | Path, *, prune_below: float | None = None,
                      max_modules: float | None = None, rank_by: str = "keep", seed: int = 0,
                      overwrite: bool = False) -> Adapter:
    source, out = Path(source), Path(out)
    if rank_by not in RANK_BY:
        raise AdapterError(f"--rank-by: expected one of {', '.join(RANK_BY)}, got {rank_by!r}")
    if max_modules is not None and max_modules <= 0:
        raise AdapterError(f"--max-modules: expected a count >= 1 or a fraction in (0, 1), got {max_modules}")
    if out.exists() and not overwrite:
        raise AdapterError(f"{out}: already exists; pass --overwrite to replace it")
    ckpt = find_checkpoint(source)
    modules, meta = read_checkpoint(ckpt)
    cfg = build_config(meta["config"], f"{ckpt / 'meta.json'}")
    keep_rates = meta.get("keep_rates") or {}
    if cfg.gated and set(keep_rates) != set(modules):
        raise CheckpointError(f"{ckpt / 'meta.json'}: keep_rates must cover every module (the run logs them "
                              "every log_every steps)")
    if not cfg.gated and (prune_below is not None or max_modules is not None):
        # A dense run exports as a plain PEFT LoRA with no token_gate_config.json to record pruning in.
        raise AdapterError(f"{ckpt}: a dense {cfg.method} run exports as a plain PEFT adapter, which has no place "
                           "to record pruning; prune a TS run, or choose modules with target_modules when training")
    scales = {n: module_scaling(cfg, n, m["lora_A.weight"].shape[0]) for n, m in modules.items()}
    scores = {n: {"keep_rate": float(keep_rates.get(n, 1.0)), "weight_norm": weight_norm(m, scales[n])}
              for n, m in modules.items()}
    pruned = choose_pruned(scores, prune_below, max_modules, rank_by, seed)
    kept = {n: dict(m, keep_rate=scores[n]["keep_rate"], tau=float(m.get("token_gate.tau", torch.zeros(1))))
            for n, m in modules.items() if n not in pruned}
    if not kept:
        raise AdapterError("pruning removed every module; lower --prune-below or raise --max-modules")
    model_path = resolve_model_path(cfg.model)
    from transformers import AutoConfig

    identity = model_identity(AutoConfig.from_pretrained(model_path), cfg.model)
    skip = 1 - sum(keep_rates.values()) / len(keep_rates) if keep_rates else 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_adapter(tmp, method=cfg.method, base_model=str(model_path), identity=identity, modules=kept,
                      rank=cfg.rank, alpha=cfg.alpha, use_rslora=cfg.use_rslora, rank_pattern=cfg.rank_pattern,
                      alpha_pattern=cfg.alpha_pattern, pruned=pruned,
                      pruning={"prune_below": prune_below, "max_modules": max_modules, "rank_by": rank_by, "seed": seed},
                      training={"checkpoint": str(ckpt), "steps": meta["step"], "skip_rate": skip, "method": cfg.method})
        adapter = load_adapter(tmp)  # what was written must read back
        tmp.chmod(0o755)  # mkdtemp makes it private; an adapter is read by servers and other users
        for f in tmp.iterdir():
            f.chmod(0o644)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    adapter.path = out
    return adapter


def module_scaling(cfg, name: str, rank: int) -> float:
    return lora_scaling(float(pattern_value(name, cfg.alpha_pattern, cfg.alpha)), rank, cfg.use_rslora)


def _replace(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
