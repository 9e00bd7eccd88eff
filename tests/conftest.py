"""Shared fixtures: a tiny randomly initialised Llama with the bundled model's real tokenizer; Triton's
interpreter mode on machines without CUDA."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # Triton reads this once, when first imported (vLLM imports it too): the kernel tests need the
    # interpreter on CPU, so it is set before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    from tspeft_rt.assets import bundled_model_dir

    return bundled_model_dir()


def make_tiny_llama(out: Path, tokenizer_src: Path, seed: int = 0, **overrides) -> Path:
    """Save a 2-layer Llama (hidden 64) with the given tokenizer into `out`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, bundled_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", bundled_dir)


@pytest.fixture
def tiny_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model folder, for tests that damage it."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst
