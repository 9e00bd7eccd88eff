"""TrainConfig: defaults, YAML files and `--set` overrides, and the ConfigError messages for bad input.

Every bad value must raise `ConfigError` (never a bare ValueError/KeyError/TypeError) whose message names
the offending key and says what was expected, so that the CLI can print it as one line.
"""

from __future__ import annotations

import dataclasses

import pytest

from tspeft_rt.config import METHODS, TrainConfig, build_config, field_help, load_config, parse_overrides
from tspeft_rt.errors import ConfigError, TspeftError

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def write_yaml(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- defaults -------------------------------------------------------------------------------------


def test_defaults_validate():
    cfg = TrainConfig()
    assert cfg.validate() is cfg
    assert cfg.method in METHODS
    assert cfg.rank == 8 and isinstance(cfg.rank, int)
    assert cfg.gated and not cfg.dora


def test_load_config_without_file_gives_defaults():
    assert load_config(None) == TrainConfig()


def test_list_and_dict_defaults_are_not_shared():
    a, b = TrainConfig(), TrainConfig()
    a.tasks.append("piqa")
    a.rank_pattern["q_proj"] = 4
    assert b.tasks == ["arc_easy"]
    assert b.rank_pattern == {}


def test_every_field_has_help():
    helps = field_help()
    assert list(helps) == FIELDS
    assert all(isinstance(h, str) and h.strip() for h in helps.values())


def test_config_error_is_a_tspeft_error():
    assert issubclass(ConfigError, TspeftError)


@pytest.mark.parametrize("method, gated, dora", [("ts-lora", True, False), ("ts-dora", True, True),
                                                 ("lora", False, False), ("dora", False, True)])
def test_method_properties(method, gated, dora):
    cfg = load_config(None, [f"method={method}"])
    assert (cfg.gated, cfg.dora) == (gated, dora)


# ---- YAML files -----------------------------------------------------------------------------------


def test_yaml_file_values_are_applied(tmp_path):
    path = write_yaml(tmp_path, "method: ts-dora\nrank: 4\ntasks: [piqa, boolq]\ntarget_skip: 0.3\n"
                                "rank_pattern: {q_proj: 16}\n")
    cfg = load_config(path)
    assert cfg.method == "ts-dora"
    assert cfg.rank == 4
    assert cfg.tasks == ["piqa", "boolq"]
    assert cfg.target_skip == 0.3
    assert cfg.rank_pattern == {"q_proj": 16}
    assert cfg.steps == TrainConfig().steps  # untouched keys keep their defaults


def test_set_overrides_take_precedence_over_the_file(tmp_path):
    path = write_yaml(tmp_path, "rank: 4\nsteps: 20\n")
    cfg = load_config(path, ["rank=2"])
    assert cfg.rank == 2 and cfg.steps == 20


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == TrainConfig()


def test_unknown_key_in_yaml_names_key_and_lists_valid_keys(tmp_path):
    path = write_yaml(tmp_path, "rank: 4\nlearning_rate: 0.001\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert "learning_rate" in msg
    assert str(path) in msg
    assert "valid keys" in msg
    for name in FIELDS:
        assert name in msg


@pytest.mark.parametrize("key", ["learning_rate", "Rank", "tasks_", "gated", "dora"])
def test_unknown_key_via_set_names_key_and_lists_valid_keys(key):
    # `gated` and `dora` are read-only properties of TrainConfig, not settable keys.
    with pytest.raises(ConfigError) as ei:
        load_config(None, [f"{key}=1"])
    msg = str(ei.value)
    assert repr(key) in msg
    assert "valid keys" in msg
    for name in FIELDS:
        assert name in msg


def test_several_unknown_keys_are_all_named():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["foo=1", "bar=2"])
    assert "'foo'" in str(ei.value) and "'bar'" in str(ei.value)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(path) in str(ei.value)
    assert "does not exist" in str(ei.value)


@pytest.mark.parametrize("text", ["- rank\n- 4\n", "just a string\n", "42\n"], ids=["list", "string", "int"])
def test_non_mapping_yaml_file(tmp_path, text):
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(path) in str(ei.value)
    assert "mapping" in str(ei.value)


def test_invalid_yaml_file(tmp_path):
    path = write_yaml(tmp_path, "rank: [4\nsteps: 2\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(path) in str(ei.value)
    assert "YAML" in str(ei.value)


# ---- wrong types and out-of-range values ------------------------------------------------------------

WRONG_TYPES = [
    ("rank", '"eight"', "int"),
    ("rank", "8.0", "int"),
    ("rank", "true", "int"),
    ("steps", "1.5", "int"),
    ("alpha", '"high"', "float"),
    ("alpha", "true", "float"),
    ("lr", "[0.1]", "float"),
    ("tasks", "piqa", "list"),
    ("data_files", "train.jsonl", "list"),
    ("rank_pattern", "[q_proj]", "dict"),
    ("use_rslora", "1", "bool"),
    ("method", "3", "str"),
    ("target_skip", '"high"', "target_skip"),
    ("tau_init_quantile", '"median"', "tau_init_quantile"),
]


@pytest.mark.parametrize("key, raw, expected", WRONG_TYPES, ids=[f"{k}={v}" for k, v, _ in WRONG_TYPES])
def test_wrong_type_in_yaml_names_key_and_expected(tmp_path, key, raw, expected):
    path = write_yaml(tmp_path, f"{key}: {raw}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert repr(key) in msg
    assert "expected" in msg and expected in msg


@pytest.mark.parametrize("key, raw, expected", WRONG_TYPES, ids=[f"{k}={v}" for k, v, _ in WRONG_TYPES])
def test_wrong_type_via_set_names_key_and_expected(key, raw, expected):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [f"{key}={raw}"])
    msg = str(ei.value)
    assert repr(key) in msg
    assert "expected" in msg and expected in msg


OUT_OF_RANGE = [
    ("target_skip", "1.5", "[0, 1)"),
    ("target_skip", "1.0", "[0, 1)"),
    ("target_skip", "-0.1", "[0, 1)"),
    ("method", "foo", "ts-lora"),
    ("dtype", "fp8", "fp32 or bf16"),
    ("rank", "0", "positive"),
    ("rank", "-4", "positive"),
    ("steps", "0", "positive"),
    ("batch_size", "0", "positive"),
    ("micro_batch_size", "0", "positive"),
    ("dropout", "1.0", "[0, 1)"),
    ("sparsity_lambda", "-1", ">= 0"),
    ("gate_temperature", "0", "> 0"),
    ("tau_init_quantile", "1.0", "[0, 1)"),
    ("prompt_format", "markdown", "plain or chat"),
    ("lr_schedule", "step", "cosine"),
    ("tasks", "[]", "at least one"),
    # Used as a divisor (`done % log_every`) and a sequence length by the trainer.
    ("log_every", "0", ""),
    ("max_seq_len", "0", ""),
]


@pytest.mark.parametrize("key, raw, expected", OUT_OF_RANGE, ids=[f"{k}={v}" for k, v, _ in OUT_OF_RANGE])
def test_out_of_range_names_key_and_expected(key, raw, expected):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [f"{key}={raw}"])
    msg = str(ei.value)
    assert repr(key) in msg
    assert "expected" in msg and expected in msg


def test_out_of_range_in_yaml_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(write_yaml(tmp_path, "target_skip: 1.5\n"))
    assert "'target_skip'" in str(ei.value) and "1.5" in str(ei.value)


def test_empty_tasks_are_fine_with_data_files():
    cfg = load_config(None, ["tasks=[]", "data_files=[train.jsonl]"])
    assert cfg.tasks == [] and cfg.data_files == ["train.jsonl"]


# ---- --set parsing ---------------------------------------------------------------------------------

SET_VALUES = [
    ("steps=10", "steps", 10),
    ("rank=16", "rank", 16),
    ("target_skip=0.3", "target_skip", 0.3),
    ("lr=0.001", "lr", 0.001),
    ("lr=1e-4", "lr", 1e-4),
    ("lr=3.0e-4", "lr", 3e-4),
    ("alpha=32", "alpha", 32.0),
    ("tasks=[piqa,boolq]", "tasks", ["piqa", "boolq"]),
    ("tasks=[piqa, boolq]", "tasks", ["piqa", "boolq"]),
    ("target_modules=[q_proj,v_proj]", "target_modules", ["q_proj", "v_proj"]),
    ("target_modules=.*q_proj", "target_modules", ".*q_proj"),
    ("target_skip=null", "target_skip", None),
    ("max_train_examples=null", "max_train_examples", None),
    ("max_train_examples=100", "max_train_examples", 100),
    ("rank_pattern={q_proj: 4}", "rank_pattern", {"q_proj": 4}),
    ("use_rslora=true", "use_rslora", True),
    ("progress=false", "progress", False),
    ("output_dir=runs/x=1", "output_dir", "runs/x=1"),
    (" method = ts-dora", "method", "ts-dora"),
]


@pytest.mark.parametrize("pair, key, value", SET_VALUES, ids=[p for p, _, _ in SET_VALUES])
def test_set_parsing(pair, key, value):
    cfg = load_config(None, [pair])
    got = getattr(cfg, key)
    assert got == value
    assert type(got) is type(value)


def test_parse_overrides_types():
    out = parse_overrides(["steps=10", "lr=0.5", "tasks=[piqa,boolq]", "target_skip=null"])
    assert out == {"steps": 10, "lr": 0.5, "tasks": ["piqa", "boolq"], "target_skip": None}
    assert type(out["steps"]) is int and type(out["lr"]) is float


def test_later_set_wins():
    assert load_config(None, ["rank=2", "rank=4"]).rank == 4


@pytest.mark.parametrize("pair", ["steps", "=10", ""])
def test_set_without_key_value(pair):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [pair])
    assert "key=value" in str(ei.value)


@pytest.mark.parametrize("field_name, value", [("alpha", 32), ("lr", 1), ("dropout", 0), ("sparsity_lambda", 2),
                                               ("weight_decay", 0), ("max_grad_norm", 2), ("gate_temperature", 2)])
def test_int_accepted_for_float_fields(tmp_path, field_name, value):
    cfg = load_config(write_yaml(tmp_path, f"{field_name}: {value}\n"))
    got = getattr(cfg, field_name)
    assert got == value
    assert type(got) is float


def test_int_accepted_for_float_fields_keeps_value():
    cfg = load_config(None, ["alpha=32", "lr=1", "max_grad_norm=2"])
    assert (cfg.alpha, cfg.lr, cfg.max_grad_norm) == (32.0, 1.0, 2.0)
    assert all(type(v) is float for v in (cfg.alpha, cfg.lr, cfg.max_grad_norm))


def test_build_config_names_its_source():
    with pytest.raises(ConfigError) as ei:
        build_config({"nope": 1}, "my-source.yaml")
    assert "my-source.yaml" in str(ei.value)


def test_hash_and_signature():
    a, b = TrainConfig(), TrainConfig()
    assert a.hash() == b.hash()
    assert load_config(None, ["steps=5"]).hash() != a.hash()
    sig = load_config(None, ["rank=4"]).adapter_signature()
    assert sig["rank"] == 4 and "steps" not in sig
