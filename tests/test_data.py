"""Training data: the bundled commonsense tasks, users' JSON-lines files (and their error messages),
tokenization with prompt masking and truncation, batch collation and the seeded batch order.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tspeft_rt.data import (IGNORE, TASK_DIRS, MCExample, TextExample, batch_indices, collate, epoch_order,
                            load_data_file, load_task, mc_to_text, tokenize, training_examples)
from tspeft_rt.errors import DataError, TspeftError

TASKS = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
N_CHOICES = {"boolq": {2}, "piqa": {2}, "siqa": {3}, "hellaswag": {4}, "winogrande": {2},
             "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "openbookqa": {4}}


@pytest.fixture(scope="module")
def tok(bundled_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_dir)


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ---- bundled tasks ---------------------------------------------------------------------------------


def test_task_list_is_the_eight_tasks():
    assert sorted(TASK_DIRS) == sorted(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_load_task_validation(task):
    examples = load_task(task, "validation", limit=5)
    assert len(examples) == 5
    for ex in examples:
        assert isinstance(ex, MCExample)
        assert ex.task == task
        assert len(ex.choices) in N_CHOICES[task]
        assert isinstance(ex.gold, int) and 0 <= ex.gold < len(ex.choices)
        for c in ex.choices:
            assert isinstance(c.context, str) and c.context.strip()
            assert isinstance(c.continuation, str) and c.continuation.strip()
        if task != "winogrande":  # one shared question, distinct answers
            assert len({c.context for c in ex.choices}) == 1
            assert len({c.continuation for c in ex.choices}) == len(ex.choices)


@pytest.mark.parametrize("task", ["piqa", "winogrande"])
def test_load_task_is_deterministic_and_limit_is_a_prefix(task):
    five = load_task(task, "validation", limit=5)
    assert load_task(task, "validation", limit=5) == five
    assert load_task(task, "validation", limit=2) == five[:2]


def test_load_task_train_split():
    train = load_task("arc_easy", "train", limit=3)
    val = load_task("arc_easy", "validation", limit=3)
    assert len(train) == 3
    assert train != val


def test_winogrande_partial_scoring():
    for ex in load_task("winogrande", "validation", limit=5):
        assert len(ex.choices) == 2
        a, b = ex.choices
        assert a.continuation == b.continuation
        assert a.context != b.context
        assert "_" not in a.context and "_" not in b.context
        assert a.continuation.startswith(" ")


def test_unknown_task_lists_bundled_tasks():
    with pytest.raises(DataError) as ei:
        load_task("mmlu", "validation")
    msg = str(ei.value)
    assert "mmlu" in msg
    for task in TASKS:
        assert task in msg


def test_mc_to_text_uses_gold_choice():
    ex = load_task("arc_easy", "validation", limit=1)[0]
    text = mc_to_text(ex)
    assert text.prompt == ex.choices[ex.gold].context
    assert text.completion == ex.choices[ex.gold].continuation
    assert text.messages is None


# ---- users' JSON-lines files -----------------------------------------------------------------------


def write_lines(tmp_path, lines: list[str], name: str = "train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_load_jsonl_prompt_completion(tmp_path):
    rows = [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}, {"prompt": "", "completion": "hello"}]
    path = write_lines(tmp_path, [json.dumps(r) for r in rows])
    out = load_data_file(path)
    assert out == [TextExample(prompt=r["prompt"], completion=r["completion"]) for r in rows]


def test_load_jsonl_messages(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    path = write_lines(tmp_path, [json.dumps({"messages": msgs})])
    out = load_data_file(str(path))
    assert len(out) == 1
    assert out[0].messages == msgs


def test_load_jsonl_mixed_formats_and_blank_lines(tmp_path):
    lines = [json.dumps({"prompt": "a", "completion": "b"}), "", "   ",
             json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]})]
    out = load_data_file(write_lines(tmp_path, lines))
    assert len(out) == 2
    assert out[0].completion == "b" and out[0].messages is None
    assert out[1].messages[-1]["content"] == "v"


GOOD = json.dumps({"prompt": "p", "completion": " c"})
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}

# (id, lines or None for a missing file, line number named in the message or None, a fragment of the message)
MALFORMED = [
    ("invalid-json-line-3", [GOOD, GOOD, '{"prompt": "p", "completion": '], 3, "JSON"),
    ("array-line", [GOOD, json.dumps(["p", "c"])], 2, "prompt"),
    ("string-line", ['"just text"'], 1, "prompt"),
    ("missing-completion", [json.dumps({"prompt": "p"})], 1, "completion"),
    ("empty-completion", [GOOD, json.dumps({"prompt": "p", "completion": ""})], 2, "completion"),
    ("non-string-completion", [json.dumps({"prompt": "p", "completion": 3})], 1, "completion"),
    ("last-role-not-assistant", [GOOD, json.dumps({"messages": [USER, ASSISTANT, USER]})], 2, "assistant"),
    ("message-missing-content", [json.dumps({"messages": [USER, {"role": "assistant"}]})], 1, "content"),
    ("message-missing-role", [json.dumps({"messages": [{"content": "hi"}, ASSISTANT]})], 1, "role"),
    ("empty-messages", [json.dumps({"messages": []})], 1, "messages"),
    ("bad-line-after-blank-lines", [GOOD, "", "", "{oops"], 4, "JSON"),
    ("empty-file", [], None, "no examples"),
    ("whitespace-only-file", ["   ", "", "\t"], None, "no examples"),
    ("missing-file", None, None, "does not exist"),
]


@pytest.mark.parametrize("lines, lineno, fragment", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_load_jsonl_malformed(tmp_path, lines, lineno, fragment):
    path = tmp_path / "data" / "bad.jsonl"
    if lines is not None:
        path.parent.mkdir()
        path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DataError) as ei:
        load_data_file(path)
    msg = str(ei.value)
    assert str(path) in msg
    if lineno is not None:
        assert f"{path}:{lineno}:" in msg
    assert fragment in msg
    assert isinstance(ei.value, TspeftError)


def test_training_examples_from_files_seeded_shuffle_and_limit(tmp_path):
    a = write_lines(tmp_path, [json.dumps({"prompt": f"a{i}", "completion": "x"}) for i in range(6)], "a.jsonl")
    b = write_lines(tmp_path, [json.dumps({"prompt": f"b{i}", "completion": "y"}) for i in range(4)], "b.jsonl")
    cfg = SimpleNamespace(data_files=[str(a), str(b)], tasks=["arc_easy"], seed=0, max_train_examples=None,
                          data_columns={})
    full = training_examples(cfg)
    assert sorted(e.prompt for e in full) == sorted([f"a{i}" for i in range(6)] + [f"b{i}" for i in range(4)])
    assert [e.prompt for e in training_examples(cfg)] == [e.prompt for e in full]
    cfg.max_train_examples = 3
    assert [e.prompt for e in training_examples(cfg)] == [e.prompt for e in full[:3]]


# ---- tokenization ----------------------------------------------------------------------------------

PROMPT = "Question: Which gas do plants take in for photosynthesis?\nAnswer:"
COMPLETION = " carbon dioxide"


def test_tokenize_masks_prompt_and_labels_completion_and_eos(tok):
    p, c = enc(tok, PROMPT), enc(tok, COMPLETION)
    ids, labels = tokenize(tok, TextExample(prompt=PROMPT, completion=COMPLETION), "plain", 256)
    assert ids == p + c + [tok.eos_token_id]
    assert labels == [IGNORE] * len(p) + c + [tok.eos_token_id]
    assert len(ids) == len(labels)


@pytest.mark.parametrize("keep_prompt", [0, 1, 3])
def test_tokenize_truncation_cuts_prompt_from_the_left(tok, keep_prompt):
    p, c = enc(tok, PROMPT), enc(tok, COMPLETION)
    target = c + [tok.eos_token_id]
    max_len = len(target) + keep_prompt
    assert max_len < len(p) + len(target)
    ids, labels = tokenize(tok, TextExample(prompt=PROMPT, completion=COMPLETION), "plain", max_len)
    assert len(ids) == len(labels) == max_len
    assert ids[keep_prompt:] == target and labels[keep_prompt:] == target
    assert ids[:keep_prompt] == p[len(p) - keep_prompt:]
    assert labels[:keep_prompt] == [IGNORE] * keep_prompt


def test_tokenize_no_truncation_when_it_fits(tok):
    p, c = enc(tok, PROMPT), enc(tok, COMPLETION)
    exact = len(p) + len(c) + 1
    assert tokenize(tok, TextExample(prompt=PROMPT, completion=COMPLETION), "plain", exact)[0] == \
        p + c + [tok.eos_token_id]


def test_tokenize_completion_longer_than_max_len_stays_within_max_len(tok):
    ids, labels = tokenize(tok, TextExample(prompt=PROMPT, completion=" word" * 50), "plain", 8)
    assert len(ids) == len(labels) == 8
    assert IGNORE not in labels


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Goodbye"},
]


def test_tokenize_messages_labels_only_last_assistant_turn(tok):
    ids, labels = tokenize(tok, TextExample(messages=MESSAGES), "plain", 512)
    full = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert tok.decode(ids) == full
    n_masked = labels.index(next(y for y in labels if y != IGNORE))
    assert all(y == IGNORE for y in labels[:n_masked])
    assert all(y != IGNORE for y in labels[n_masked:])  # one contiguous labelled suffix
    assert labels[n_masked:] == ids[n_masked:]
    labelled = tok.decode(ids[n_masked:])
    assert labelled.startswith("Goodbye")
    assert "Hello there" not in labelled and "Bye" not in labelled.replace("Goodbye", "")
    assert "Hello there" in tok.decode(ids[:n_masked])
    assert tok.eos_token in labelled  # the turn's end token is learned


def test_tokenize_chat_format_for_prompt_completion(tok):
    ids, labels = tokenize(tok, TextExample(prompt=PROMPT, completion=COMPLETION), "chat", 512)
    n_masked = sum(1 for y in labels if y == IGNORE)
    assert labels[:n_masked] == [IGNORE] * n_masked
    assert PROMPT in tok.decode(ids[:n_masked])
    assert tok.decode(ids[n_masked:]).startswith(COMPLETION.strip())


def test_tokenize_chat_truncation_keeps_last_turn(tok):
    ids, labels = tokenize(tok, TextExample(messages=MESSAGES), "plain", 6)
    assert len(ids) == 6
    full_ids, full_labels = tokenize(tok, TextExample(messages=MESSAGES), "plain", 512)
    completion = [y for y in full_labels if y != IGNORE]
    assert len(completion) <= 6
    assert ids[-len(completion):] == completion
    assert ids == full_ids[-6:]


# ---- collation -------------------------------------------------------------------------------------


def test_collate_pads_right():
    items = [([5, 6, 7], [IGNORE, 6, 7]), ([8, 9, 10, 11, 12], [IGNORE, IGNORE, 10, 11, 12]), ([13], [13])]
    b = collate(items, pad_id=0)
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 5) for t in b.values())
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE], [IGNORE, IGNORE, 10, 11, 12],
                                    [13, IGNORE, IGNORE, IGNORE, IGNORE]]


def test_collate_real_examples_pad_equal_to_eos(tok):
    # The bundled tokenizer pads with its eos id: padding must still be unlabelled and unattended.
    a = tokenize(tok, TextExample(prompt="Q?", completion=" yes"), "plain", 64)
    b = tokenize(tok, TextExample(prompt=PROMPT, completion=COMPLETION), "plain", 64)
    batch = collate([a, b], tok.pad_token_id)
    n = len(a[0])
    assert batch["input_ids"].shape[1] == len(b[0])
    assert batch["labels"][0, n - 1].item() == tok.eos_token_id
    assert (batch["labels"][0, n:] == IGNORE).all()
    assert (batch["attention_mask"][0, n:] == 0).all() and (batch["attention_mask"][0, :n] == 1).all()
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()
    assert batch["input_ids"][1].tolist() == b[0]


# ---- batch order -----------------------------------------------------------------------------------


def test_epoch_order_is_a_seeded_permutation():
    assert sorted(epoch_order(17, 3, 0)) == list(range(17))
    assert epoch_order(17, 3, 0) == epoch_order(17, 3, 0)
    assert epoch_order(17, 3, 0) != epoch_order(17, 3, 1)
    assert epoch_order(17, 3, 0) != epoch_order(17, 4, 0)


def test_batch_indices_deterministic():
    assert batch_indices(10, 0, 3, 4) == batch_indices(10, 0, 3, 4)
    assert [batch_indices(10, 0, s, 4) for s in range(5)] != [batch_indices(10, 1, s, 4) for s in range(5)]


@pytest.mark.parametrize("n, batch", [(10, 5), (10, 3), (7, 4), (3, 7), (1, 2), (12, 12)])
def test_batch_indices_cover_each_example_once_per_epoch(n, batch):
    steps = 3 * n  # several epochs
    flat = [i for s in range(steps) for i in batch_indices(n, 42, s, batch)]
    for s in range(steps):
        assert len(batch_indices(n, 42, s, batch)) == batch
    full_epochs = len(flat) // n
    for e in range(full_epochs):
        chunk = flat[e * n:(e + 1) * n]
        assert sorted(chunk) == list(range(n)), f"epoch {e} is not a permutation"
        assert chunk == epoch_order(n, 42, e)
    assert full_epochs >= 2
    epochs = {tuple(flat[e * n:(e + 1) * n]) for e in range(full_epochs)}
    assert len(epochs) > 1 or n == 1  # epochs are reshuffled


def test_batch_indices_no_repeats_within_a_batch_inside_an_epoch():
    for s in range(20):
        idx = batch_indices(10, 7, s, 5)  # 10 / 5: batches never straddle an epoch
        assert len(set(idx)) == 5


def test_batch_indices_cross_epoch_boundary():
    n, batch = 10, 4
    e0, e1 = epoch_order(n, 1, 0), epoch_order(n, 1, 1)
    assert batch_indices(n, 1, 0, batch) == e0[0:4]
    assert batch_indices(n, 1, 1, batch) == e0[4:8]
    assert batch_indices(n, 1, 2, batch) == e0[8:10] + e1[0:2]  # crosses into epoch 1
    assert batch_indices(n, 1, 3, batch) == e1[2:6]


def test_batch_indices_resume_equals_uninterrupted():
    # A pure function of (seed, step): a resumed run at step 7 reads what an uninterrupted one reads.
    uninterrupted = [batch_indices(9, 5, s, 4) for s in range(12)]
    resumed = [batch_indices(9, 5, s, 4) for s in range(7, 12)]
    assert uninterrupted[7:] == resumed
