"""Reference inference: generation on the Hugging Face model with an adapter's gates applied.

    tspeft-rt generate --model smollm2-135m-instruct --adapter runs/demo/adapter "The capital of France is"

Serving must match this token for token (greedy). Each prompt runs on its own (no padding), and the
gate of a token depends only on that token's activations, so cached decoding gives the same tokens
as a full forward would.
"""

from __future__ import annotations

import torch

from tspeft_rt.adapter import Adapter, attach_adapter, load_adapter
from tspeft_rt.data import encode_chat, encode_prompt
from tspeft_rt.errors import DataError
from tspeft_rt.inject import load_base_model


def load_model_with_adapter(model: str, adapter_dir: str | None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, adapter or None); the adapter is validated before the model is loaded."""
    adapter: Adapter | None = load_adapter(adapter_dir) if adapter_dir else None
    hf_model, tokenizer = load_base_model(model, dtype)
    if adapter is not None:
        attach_adapter(hf_model, adapter)
    hf_model.eval()
    return hf_model, tokenizer, adapter


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, chat: bool = False, seed: int = 0) -> list[str]:
    """Completions of each prompt: greedy at temperature 0, else sampled (seeded)."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, chat=chat, seed=seed)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in ids]


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, chat: bool = False, seed: int = 0) -> list[list[int]]:
    """The generated token ids of each prompt (up to and including EOS). Prompts are encoded as vLLM encodes
    them (`tspeft_rt.data`'s rule): plain text with the tokenizer's BOS, `chat` through the chat template."""
    outputs = []
    for prompt in prompts:
        encoded = encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True) \
            if chat else encode_prompt(tokenizer, prompt)
        if not encoded:
            raise DataError(f"prompt {prompt!r} encodes to no tokens (the tokenizer adds no BOS): nothing to continue")
        ids = torch.tensor([encoded])
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs
