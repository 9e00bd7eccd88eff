"""Tokenization for a model whose tokenizer adds a BOS (as Llama 3, Gemma, Mistral do), which the bundled
SmolLM2 does not: training, `eval` (Hugging Face and `--endpoint`), `generate` and the vLLM server must all
encode a prompt as the tokenizer is meant to be used, and agree token for token.

The model is a tiny random Llama (head_dim 32, which vLLM's CPU attention supports) whose tokenizer is the
bundled one made Llama-3-like: BOS `<|endoftext|>` added by the post-processor, and a chat template that
writes `{{ bos_token }}` itself.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from tokenizers.processors import TemplateProcessing

from tspeft_rt.data import (IGNORE, TextExample, encode_chat, encode_prompt, load_task, special_prefix,
                            tokenize)
from tspeft_rt.errors import DataError
from tspeft_rt.evaluate import choice_logliks, encode_pairs
from tspeft_rt.generate import generate_ids, load_model_with_adapter

BOS = "<|endoftext|>"
PROMPTS = ["The capital of France is", "Question: Which gas do plants take in?\nAnswer:", "def fibonacci(n):"]
MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
MAX_TOKENS = 12


def save_tokenizer(src: Path, out: Path, template: str) -> Path:
    """The bundled tokenizer with `template` as its post-processor, BOS `<|endoftext|>`, and a chat template
    that starts with `{{ bos_token }}`, saved so that AutoTokenizer (and so vLLM) loads it as such."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    specials = [(t, tok.convert_tokens_to_ids(t)) for t in (BOS, tok.eos_token)]
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=template, special_tokens=specials)
    tok.bos_token = BOS
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bos_model_dir(tmp_path_factory, bundled_dir) -> Path:
    root = tmp_path_factory.mktemp("bos")
    tok_dir = save_tokenizer(bundled_dir, root / "tokenizer", f"{BOS} $A")
    from transformers import AutoTokenizer

    bos_id = AutoTokenizer.from_pretrained(tok_dir).bos_token_id
    # initializer_range 0.2: a random model with clear argmax margins, so that greedy decoding does not hinge
    # on float rounding differences between Hugging Face and vLLM
    return make_tiny_llama(root / "model", tok_dir, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                           num_key_value_heads=2, bos_token_id=bos_id, initializer_range=0.2)


@pytest.fixture(scope="module")
def bos_model(bos_model_dir):
    model, tok, _ = load_model_with_adapter(str(bos_model_dir), None)
    return model, tok


@pytest.fixture(scope="module")
def tok(bos_model):
    return bos_model[1]


def bare(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ---- the fixture is what it claims -----------------------------------------------------------------


def test_fixture_tokenizer_adds_bos_and_its_template_writes_one(tok):
    assert tok.bos_token == BOS
    assert tok("hi").input_ids == [tok.bos_token_id] + bare(tok, "hi")
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert rendered.startswith(BOS) and not rendered.startswith(BOS * 2)


# ---- the helpers -----------------------------------------------------------------------------------


def test_special_prefix(tok, bundled_dir, tmp_path):
    from transformers import AutoTokenizer

    assert special_prefix(tok) == [tok.bos_token_id]
    assert special_prefix(AutoTokenizer.from_pretrained(bundled_dir)) == []
    bos_eos = AutoTokenizer.from_pretrained(save_tokenizer(bundled_dir, tmp_path, f"{BOS} $A <|im_end|>"))
    assert bos_eos("hi").input_ids[-1] == bos_eos.eos_token_id  # it appends an EOS too ...
    assert special_prefix(bos_eos) == [bos_eos.bos_token_id]  # ... which is not part of the prefix


def test_encode_prompt_is_what_the_tokenizer_adds_in_front(tok, bundled_dir, tmp_path):
    from transformers import AutoTokenizer

    for text in PROMPTS:
        assert encode_prompt(tok, text) == tok(text).input_ids == [tok.bos_token_id] + bare(tok, text)
    assert encode_prompt(tok, "") == [tok.bos_token_id]
    smol = AutoTokenizer.from_pretrained(bundled_dir)
    assert encode_prompt(smol, PROMPTS[0]) == bare(smol, PROMPTS[0])  # SmolLM2: unchanged, no BOS
    bos_eos = AutoTokenizer.from_pretrained(save_tokenizer(bundled_dir, tmp_path, f"{BOS} $A <|im_end|>"))
    assert encode_prompt(bos_eos, PROMPTS[0]) == [bos_eos.bos_token_id] + bare(bos_eos, PROMPTS[0])  # no EOS


def test_encode_prompt_never_doubles_a_bos_the_text_already_has(tok):
    assert encode_prompt(tok, BOS + PROMPTS[0]) == encode_prompt(tok, PROMPTS[0])


def test_encode_prompt_refuses_a_non_string(tok):
    with pytest.raises(DataError, match="string"):
        encode_prompt(tok, ["not", "text"])


def test_encode_chat_has_the_template_bos_once(tok):
    ids = encode_chat(tok, MESSAGES[:1], add_generation_prompt=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # what transformers' own tokenizing apply_chat_template gives, and vLLM's chat endpoint sends
    assert ids == tok.apply_chat_template(MESSAGES[:1], add_generation_prompt=True, return_dict=False)


def test_encode_chat_without_template_is_a_clear_error(tok):
    template, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(DataError, match="chat template"):
            encode_chat(tok, MESSAGES)
    finally:
        tok.chat_template = template


# ---- training examples -----------------------------------------------------------------------------


def test_training_example_starts_with_bos_and_masks_the_prompt(tok):
    prompt, completion = PROMPTS[1], " carbon dioxide"
    ids, labels = tokenize(tok, TextExample(prompt=prompt, completion=completion), "plain", 256)
    p, c = [tok.bos_token_id] + bare(tok, prompt), bare(tok, completion) + [tok.eos_token_id]
    assert ids == p + c
    assert labels == [IGNORE] * len(p) + c


def test_training_truncation_keeps_the_bos(tok):
    prompt, completion = PROMPTS[1], " carbon dioxide"
    c = bare(tok, completion) + [tok.eos_token_id]
    ids, labels = tokenize(tok, TextExample(prompt=prompt, completion=completion), "plain", len(c) + 3)
    assert ids == [tok.bos_token_id] + bare(tok, prompt)[-2:] + c
    assert labels == [IGNORE] * 3 + c
    ids, labels = tokenize(tok, TextExample(prompt=prompt, completion=" word" * 50), "plain", 8)
    assert len(ids) == 8 and ids[0] == tok.bos_token_id and labels[1:] == ids[1:]


@pytest.mark.parametrize("prompt_format, example", [("plain", TextExample(messages=MESSAGES)),
                                                    ("chat", TextExample(prompt="Hi", completion=" Hello"))])
def test_chat_training_example_has_one_bos(tok, prompt_format, example):
    ids, labels = tokenize(tok, example, prompt_format, 256)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert labels[0] == IGNORE
    n_prompt = labels.count(IGNORE)
    messages = example.messages or [{"role": "user", "content": "Hi"}]
    assert ids[:n_prompt] == encode_chat(tok, messages[:1], add_generation_prompt=True)


# ---- generate and eval on the Hugging Face model ---------------------------------------------------


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, temperature=None,
                         top_p=None, top_k=None, pad_token_id=model.config.pad_token_id)
    return out[0, len(ids):].tolist()


def test_generate_feeds_the_bos(bos_model):
    model, tok = bos_model
    with_bos = [hf_greedy(model, tok(p).input_ids, MAX_TOKENS) for p in PROMPTS]
    without = [hf_greedy(model, bare(tok, p), MAX_TOKENS) for p in PROMPTS]
    assert with_bos != without  # the BOS matters to this model: the check below can tell
    assert generate_ids(model, tok, PROMPTS, max_new_tokens=MAX_TOKENS) == with_bos


def test_generate_chat_has_the_template_bos_once(bos_model):
    model, tok = bos_model
    ids = tok.apply_chat_template(MESSAGES[:1], add_generation_prompt=True, return_dict=False)
    assert generate_ids(model, tok, ["Hi"], max_new_tokens=MAX_TOKENS, chat=True) == \
        [hf_greedy(model, ids, MAX_TOKENS)]


def test_eval_scores_continuations_after_bos_and_context(bos_model):
    model, tok = bos_model
    pairs = [(c.context, c.continuation) for ex in load_task("arc_easy", "validation", 2) for c in ex.choices]
    encoded = encode_pairs(tok, pairs)
    for (context, continuation), (ids, n) in zip(pairs, encoded):
        assert ids == tok(context).input_ids + bare(tok, continuation)
        assert n == len(bare(tok, continuation))
    context, continuation = pairs[0]
    ids = tok(context).input_ids + bare(tok, continuation)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    n = len(bare(tok, continuation))
    want = sum(float(logprobs[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
    assert choice_logliks(model, tok, pairs[:1])[0] == pytest.approx(want, abs=1e-4)


def test_eval_truncation_keeps_the_bos(tok):
    context, continuation = PROMPTS[1], " carbon dioxide"
    y = bare(tok, continuation)
    [(ids, n)] = encode_pairs(tok, [(context, continuation)], max_len=len(y) + 3)
    assert ids == [tok.bos_token_id] + bare(tok, context)[-2:] + y and n == len(y)


# ---- the vLLM server agrees -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bos_adapter(tmp_path_factory, bos_model_dir) -> Path:
    """A TS-LoRA export trained for a few steps on the BOS model (training encodes with BOS)."""
    from test_train import tiny_config

    from tspeft_rt.config import build_config
    from tspeft_rt.export import export_checkpoint
    from tspeft_rt.trainer import train

    root = tmp_path_factory.mktemp("bos_run")
    train(build_config(tiny_config(bos_model_dir, root / "run", target_modules=["q_proj", "v_proj"], rank=8,
                                   lr=5e-3, save_every=0, log_every=3), "test"))
    export_checkpoint(root / "run", root / "adapter")
    return root / "adapter"


@pytest.fixture(scope="module")
def server(bos_model_dir, bos_adapter, tmp_path_factory):
    pytest.importorskip("vllm")
    from tspeft_rt.serve.launcher import Server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = Server(model=str(bos_model_dir), adapters=[f"gated={bos_adapter}"], port=port,
                 log_file=tmp_path_factory.mktemp("log") / "vllm.log",
                 extra_args=["--max-num-seqs", "8", "--max-model-len", "512",
                             "--kv-cache-memory-bytes", str(64 << 20)])
    with srv:
        yield srv


@pytest.mark.slow
def test_served_greedy_completions_and_chat_equal_generate(server, bos_model_dir, bos_adapter):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    for name, adapter in [(server.base_name, None), ("gated", bos_adapter)]:
        model, tok, _ = load_model_with_adapter(str(bos_model_dir), str(adapter) if adapter else None)
        served = [client.completions.create(model=name, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                            extra_body={"return_token_ids": True}).choices[0].token_ids
                  for p in PROMPTS]
        assert served == generate_ids(model, tok, PROMPTS, max_new_tokens=MAX_TOKENS), name
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPTS[0]}],
                                              max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"return_token_ids": True})
        assert chat.choices[0].token_ids == generate_ids(model, tok, PROMPTS[:1], max_new_tokens=MAX_TOKENS,
                                                         chat=True)[0], name


@pytest.mark.slow
def test_eval_endpoint_equals_hugging_face_path(server, bos_model_dir, bos_adapter, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tspeft_rt.cli", "eval", "--model", str(bos_model_dir),
                        "--endpoint", server.url, "--served-name", "gated", "--tasks", "arc_easy,piqa",
                        "--limit", "4"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from tspeft_rt.evaluate import endpoint_logliks, evaluate_tasks

    model, tok, _ = load_model_with_adapter(str(bos_model_dir), str(bos_adapter))
    assert json.loads(r.stdout) == evaluate_tasks(model, tok, ["arc_easy", "piqa"], 4)
    pairs = [(c.context, c.continuation) for ex in load_task("arc_easy", "validation", 3) for c in ex.choices]
    local, served = choice_logliks(model, tok, pairs), endpoint_logliks(server.url, "gated", tok, pairs)
    assert max(abs(a - b) for a, b in zip(local, served)) < 1e-3
