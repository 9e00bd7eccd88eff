"""Multiple-choice accuracy by log-likelihood, as the usual harnesses report it.

For each choice (context c, continuation y): score = sum_t log p(y_t | c, y_<t). `acc` picks the
highest score, `acc_norm` the highest score per byte of y (lm-eval-harness's length normalisation).
Gates are applied exactly as in training (the model is evaluated as it is). The same scores can come
from an OpenAI-compatible server (`endpoint_logliks`), so a served adapter is measured as deployed.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tspeft_rt.data import MCExample, encode_prompt, load_task, special_prefix, truncate_left
from tspeft_rt.errors import TspeftError


class EvalError(TspeftError):
    pass


Scorer = Callable[[list[tuple[str, str]]], list[float]]
"""Maps (context, continuation) pairs to the summed log-probability of each continuation."""


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int = 1024) -> list[tuple[list[int], int]]:
    """Token ids of context + continuation, and how many end tokens are scored. The context is encoded as a
    prompt (`encode_prompt`: with the BOS the tokenizer adds), the continuation without special tokens; cut
    from the left to max_len, the BOS staying in front (`truncate_left`). Both paths score these ids."""
    prefix = special_prefix(tokenizer)
    encoded = []
    for context, continuation in pairs:
        y = tokenizer.encode(continuation, add_special_tokens=False)
        ids = truncate_left(encode_prompt(tokenizer, context) + y, max_len, prefix)
        encoded.append((ids, min(len(y), len(ids) - 1)))
    return encoded


@torch.no_grad()
def choice_logliks(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16,
                   max_len: int = 1024, progress: bool = False) -> list[float]:
    """Sum of log-probabilities of each continuation given its context, on the Hugging Face model."""
    encoded = encode_pairs(tokenizer, pairs, max_len)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))  # less padding per batch
    scores = [0.0] * len(encoded)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="eval", disable=not progress, leave=False):
        width = max(len(encoded[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            seq = encoded[i][0]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = F.log_softmax(logits, dim=-1)
        for row, i in enumerate(batch):
            seq, n = encoded[i]
            targets = torch.tensor(seq[len(seq) - n :], device=device)
            positions = torch.arange(len(seq) - n - 1, len(seq) - 1, device=device)
            scores[i] = float(logprobs[row, positions, targets].sum())
    return scores


def endpoint_logliks(url: str, served_name: str, tokenizer, pairs: list[tuple[str, str]], max_len: int = 1024,
                     concurrency: int = 8, progress: bool = False) -> list[float]:
    """The same sums through an OpenAI-compatible completions endpoint: the prompt is sent as token ids
    (so both paths score the same tokens) with `echo` and `logprobs`, which return the log-probability
    of every prompt token."""
    encoded = encode_pairs(tokenizer, pairs, max_len)

    def score(item: tuple[list[int], int]) -> float:
        ids, n = item
        body = {"model": served_name, "prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 0}
        logprobs = _post_json(f"{url.rstrip('/')}/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
        return float(sum(logprobs[len(ids) - n : len(ids)]))

    with ThreadPoolExecutor(concurrency) as pool:  # the server batches concurrent requests
        return list(tqdm(pool.map(score, encoded), total=len(encoded), desc="eval", disable=not progress, leave=False))


def _post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        raise EvalError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:300]}") from None
    except urllib.error.URLError as e:
        raise EvalError(f"{url}: cannot reach the server ({e.reason})") from None
    try:
        return json.loads(raw)
    except (RecursionError, ValueError) as e:  # invalid JSON (JSONDecodeError is a ValueError), or too deep
        raise EvalError(f"{url}: the server's response is not readable JSON ({type(e).__name__})") from None


def mc_accuracy(score: Scorer, examples: list[MCExample]) -> dict[str, float]:
    pairs = [(ch.context, ch.continuation) for ex in examples for ch in ex.choices]
    scores = score(pairs)
    correct = correct_norm = 0
    k = 0
    for ex in examples:
        s = scores[k : k + len(ex.choices)]
        lens = [max(1, len(ch.continuation.encode())) for ch in ex.choices]
        k += len(ex.choices)
        correct += max(range(len(s)), key=s.__getitem__) == ex.gold
        correct_norm += max(range(len(s)), key=lambda j: s[j] / lens[j]) == ex.gold
    n = max(1, len(examples))
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": len(examples)}


def score_tasks(score: Scorer, tasks: list[str], limit: int | None) -> dict:
    """Validation accuracy per task and the averages of `acc` and `acc_norm` over tasks."""
    results = {t: mc_accuracy(score, load_task(t, "validation", limit)) for t in tasks}
    results["average"] = {m: sum(r[m] for r in results.values()) / max(1, len(tasks)) for m in ("acc", "acc_norm")}
    return results


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int = 16,
                   progress: bool = False) -> dict:
    """`score_tasks` on the Hugging Face model (gates applied as they are)."""
    was_training = model.training
    model.eval()
    try:
        return score_tasks(lambda pairs: choice_logliks(model, tokenizer, pairs, batch_size, progress=progress),
                           tasks, limit)
    finally:
        model.train(was_training)


def evaluate_endpoint(url: str, served_name: str, tokenizer, tasks: list[str], limit: int | None,
                      progress: bool = False) -> dict:
    """`score_tasks` through a served model or adapter, measured exactly as deployed."""
    return score_tasks(lambda pairs: endpoint_logliks(url, served_name, tokenizer, pairs, progress=progress),
                       tasks, limit)
