"""Multiple-choice accuracy by log-likelihood, as the usual harnesses report it.

For each choice (context c, continuation y): score = sum_t log p(y_t | c, y_<t). `acc` picks the
highest score, `acc_norm` the highest score per byte of y (lm-eval-harness's length normalisation).
Gates are applied exactly as in training (the model is evaluated as it is).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tspeft_rt.data import MCExample, load_task


@torch.no_grad()
def choice_logliks(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16,
                   max_len: int = 1024, progress: bool = False) -> list[float]:
    """Sum of log-probabilities of each continuation given its context."""
    encoded = []
    for context, continuation in pairs:
        c = tokenizer.encode(context, add_special_tokens=False)
        y = tokenizer.encode(continuation, add_special_tokens=False)
        ids = (c + y)[-max_len:]
        encoded.append((ids, min(len(y), len(ids) - 1)))
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


def mc_accuracy(model, tokenizer, examples: list[MCExample], batch_size: int = 16,
                progress: bool = False) -> dict[str, float]:
    pairs = [(ch.context, ch.continuation) for ex in examples for ch in ex.choices]
    scores = choice_logliks(model, tokenizer, pairs, batch_size=batch_size, progress=progress)
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


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | None, batch_size: int = 16,
                   progress: bool = False) -> dict:
    """Validation accuracy per task and the average of `acc` over tasks."""
    was_training = model.training
    model.eval()
    try:
        results = {t: mc_accuracy(model, tokenizer, load_task(t, "validation", limit), batch_size, progress)
                   for t in tasks}
    finally:
        model.train(was_training)
    results["average"] = {"acc": sum(r["acc"] for r in results.values()) / max(1, len(tasks))}
    return results
