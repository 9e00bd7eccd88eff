"""Users' data as they keep it: JSON lines, JSON, CSV, Parquet and `datasets.save_to_disk` folders read to the
same examples, their own column names mapped by `data_columns`, and one error line naming the file and column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tspeft_rt.config import build_config
from tspeft_rt.data import TextExample, load_data_file, training_examples
from tspeft_rt.errors import ConfigError, DataError

ROWS = [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}, {"prompt": "Q: capital of France?\nA:", "completion": " Paris"}]
CHAT = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]


def write(path: Path, rows: list[dict]) -> Path:
    """`rows` in the format `path`'s suffix names (a folder without one: save_to_disk)."""
    import datasets

    data = datasets.Dataset.from_list(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        data.to_csv(str(path), index=False)
    elif path.suffix == ".parquet":
        data.to_parquet(str(path))
    elif path.name.endswith("dict"):
        datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(path))
    else:
        data.save_to_disk(str(path))
    return path


FORMATS = ["data.jsonl", "data.json", "data.csv", "data.parquet", "saved", "saved_dict"]


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_reads_the_same_examples(tmp_path, name):
    expected = [TextExample(prompt=r["prompt"], completion=r["completion"]) for r in ROWS]
    assert load_data_file(write(tmp_path / name, ROWS)) == expected


@pytest.mark.parametrize("name", ["data.jsonl", "data.parquet", "saved"])
def test_chat_rows_in_every_nested_format(tmp_path, name):
    assert load_data_file(write(tmp_path / name, CHAT)) == [TextExample(messages=CHAT[0]["messages"])]


@pytest.mark.parametrize("name", ["data.jsonl", "data.csv", "data.parquet"])
def test_columns_mapped_by_name(tmp_path, name):
    rows = [{"id": i, "question": r["prompt"], "answer": r["completion"]} for i, r in enumerate(ROWS)]
    out = load_data_file(write(tmp_path / name, rows), {"prompt": "question", "completion": "answer"})
    assert out == [TextExample(prompt=r["prompt"], completion=r["completion"]) for r in ROWS]


@pytest.mark.parametrize("name", ["data.jsonl", "data.parquet"])
def test_sharegpt_conversations(tmp_path, name):
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello"}]}]
    out = load_data_file(write(tmp_path / name, rows), {"messages": "conversations", "role": "from", "content": "value"})
    assert out == [TextExample(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello"}])]


def test_training_reads_a_parquet_file_through_the_config(tmp_path):
    path = write(tmp_path / "data.parquet", [{"q": r["prompt"], "a": r["completion"]} for r in ROWS])
    cfg = build_config({"data_files": [str(path)], "data_columns": {"prompt": "q", "completion": "a"}}, "test")
    assert sorted(ex.completion for ex in training_examples(cfg)) == [" 2", " Paris"]


def test_bad_files_and_columns_name_file_and_column(tmp_path):
    csv = write(tmp_path / "data.csv", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=rf"data file '{csv}': no columns 'prompt' and 'completion', nor 'messages' "
                                        r"\(map yours with data_columns\); its columns: question, answer"):
        load_data_file(csv)
    with pytest.raises(DataError, match=rf"'{csv}': no columns 'query' and 'answer'"):
        load_data_file(csv, {"prompt": "query", "completion": "answer"})
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=rf"data file '{broken}': not readable as parquet"):
        load_data_file(broken)
    with pytest.raises(DataError, match=r"unknown format '\.txt'; expected \.jsonl, \.json, \.csv, \.parquet"):
        load_data_file(write(tmp_path / "data.jsonl", ROWS).rename(tmp_path / "data.txt"))
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match="a DatasetDict without a 'train' split \\(splits: test\\)"):
        load_data_file(tmp_path / "no_train")
    empty_answer = write(tmp_path / "gap.csv", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}])
    with pytest.raises(DataError, match=rf"{empty_answer}: row 1: expected an object with string 'prompt' and 'completion'"):
        load_data_file(empty_answer)


@pytest.mark.parametrize("columns, fragment", [({"answer": "a"}, "fields among prompt, completion, messages"),
                                               ({"prompt": ""}, "data_columns"), (["prompt"], "data_columns")])
def test_data_columns_is_validated(columns, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_config({"data_columns": columns}, "test")
