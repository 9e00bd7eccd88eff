"""Bad input never gives a traceback: each parser of a user's file, fed input nested 200,000 levels deep or
of the wrong type (and other input that breaks parsers: not UTF-8, too large, non-finite or overlong
numbers, unpaired surrogate escapes, invalid regular expressions), ends the real CLI
(`python -m tspeft_rt.cli`) with exit status 2 and one `error:` line that names the file (and key).

Parsers: adapter_config.json, token_gate_config.json and the two safetensors headers (`inspect`); the
YAML config file and `--set` values (`train`); JSON-lines data files (`train`); a checkpoint's meta.json
and the checkpoints/latest pointer (`train --resume`, `report`); the run logs (`train --resume`,
`report`); and `report --out`.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, clean_env
from test_train import cli_args, tiny_config

from tspeft_rt.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, GATE_CONFIG, GATE_WEIGHTS
from tspeft_rt.config import build_config
from tspeft_rt.errors import MAX_FILE_BYTES
from tspeft_rt.export import export_checkpoint
from tspeft_rt.trainer import train

DEEP = "[" * 200_000 + "]" * 200_000
# One command-line argument holds at most 128 KiB (Linux MAX_ARG_STRLEN): a --set value nests less deep.
DEEP_ARG = "[" * 60_000 + "]" * 60_000
NESTED = "nested deeper than 100 levels"


@pytest.fixture(scope="module")
def good_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ts-lora"
    train(build_config(tiny_config(tiny_model_dir, out, steps=2, save_every=2), "test"))
    return out


@pytest.fixture(scope="module")
def good_adapter(good_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapters") / "ts-lora"
    export_checkpoint(good_run, out)
    return out


@dataclass
class Ctx:
    """A case's scratch folder, with private copies of a good adapter and run made on request."""

    tmp: Path
    model: Path
    good_adapter: Path
    good_run: Path

    def adapter(self) -> Path:
        return Path(shutil.copytree(self.good_adapter, self.tmp / "adapter"))

    def run(self) -> Path:
        return Path(shutil.copytree(self.good_run, self.tmp / "run"))

    def resume(self, run: Path) -> list[str]:
        """`train --resume` of the copied run: its configuration, for two more steps."""
        return ["train", *cli_args(tiny_config(self.model, run, steps=4, save_every=2)), "--resume"]


Case = Callable[[Ctx], tuple[list, list[str]]]  # -> (CLI arguments, fragments of the error line)


CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__.replace("_", "-")] = fn
    return fn


def edit_json(path: Path, fn: Callable[[dict], None]) -> Path:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))
    return path


def with_raw(path: Path, key: str, raw: str) -> Path:
    """Set `key` of the JSON object in `path` to the JSON text `raw`."""
    obj = {k: v for k, v in json.loads(path.read_text()).items() if k != key}
    path.write_text(json.dumps(obj)[:-1] + f', "{key}": {raw}}}')
    return path


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def safetensors_header(path: Path, header: str) -> Path:
    return write(path, struct.pack("<Q", len(header)) + header.encode())


def inspect(path: Path, *fragments: str) -> tuple[list, list[str]]:
    """`inspect` of the adapter folder that holds `path`; the error must name `path`."""
    return ["inspect", path.parent], [str(path), *fragments]


# ---- adapter files (`inspect`) ---------------------------------------------------------------------------

@case
def adapter_config_deep(c: Ctx):
    return inspect(with_raw(c.adapter() / ADAPTER_CONFIG, "r", DEEP), NESTED)


@case
def adapter_config_a_list(c: Ctx):
    return inspect(write(c.adapter() / ADAPTER_CONFIG, '["LORA", 8]'), "expected a JSON object, found list")


@case
def adapter_config_not_utf8(c: Ctx):
    return inspect(write(c.adapter() / ADAPTER_CONFIG, b'{"peft_type": "LORA\xff"}'), "not UTF-8")


@case
def adapter_config_too_large(c: Ctx):
    return inspect(write(c.adapter() / ADAPTER_CONFIG, "{" + " " * MAX_FILE_BYTES + "}"), "larger than 16 MiB")


@case
def adapter_config_r_of_5000_digits(c: Ctx):
    return inspect(with_raw(c.adapter() / ADAPTER_CONFIG, "r", "1" * 5000), "more than 4300 digits")


@case
def adapter_config_rank_pattern_regex(c: Ctx):
    # compiles alone, but not inside the (.*\.)?(key)$ that matches it against module paths
    return inspect(with_raw(c.adapter() / ADAPTER_CONFIG, "rank_pattern", '{"(?i)q_proj": 4}'), "'rank_pattern'")


@case
def gate_config_deep(c: Ctx):
    """The reported case: `inspect` ended with a RecursionError traceback."""
    return inspect(write(c.adapter() / GATE_CONFIG, DEEP), NESTED)


@case
def gate_config_a_list(c: Ctx):
    return inspect(write(c.adapter() / GATE_CONFIG, "[]"), "expected a JSON object, found list")


@case
def gate_config_skip_rate_a_string(c: Ctx):
    path = edit_json(c.adapter() / GATE_CONFIG, lambda g: g["training"].update(skip_rate="high"))
    return inspect(path, "'training.skip_rate'", "number in [0, 1]")


@case
def gate_config_pruned_without_weight_norm(c: Ctx):
    pruned = {"model.layers.9.mlp.up_proj": {"keep_rate": 0.1, "reason": "keep rate 0.1 < 0.2"}}
    return inspect(edit_json(c.adapter() / GATE_CONFIG, lambda g: g.update(pruned=pruned)), "'pruned'", "weight_norm")


@case
def gate_config_unpaired_surrogate(c: Ctx):
    path = edit_json(c.adapter() / GATE_CONFIG, lambda g: g["base_model"].update(name="\ud800"))
    return inspect(path, "unpaired surrogate")


for _name in (ADAPTER_WEIGHTS, GATE_WEIGHTS):
    _stem = _name.split(".")[0].replace("_", "-")
    CASES[f"{_stem}-header-deep"] = lambda c, n=_name: inspect(
        safetensors_header(c.adapter() / n, '{"a": ' + DEEP + "}"), "corrupt")
    CASES[f"{_stem}-header-a-list"] = lambda c, n=_name: inspect(safetensors_header(c.adapter() / n, "[1, 2]"),
                                                                 "corrupt")


# ---- YAML config files and --set (`train`) ---------------------------------------------------------------

def config_file(c: Ctx, text: str | bytes, *fragments: str) -> tuple[list, list[str]]:
    path = write(c.tmp / "config.yaml", text)
    return ["train", path], [str(path), *fragments]


@case
def config_file_deep(c: Ctx):
    return config_file(c, "tasks: " + DEEP, NESTED)


@case
def config_file_a_list(c: Ctx):
    return config_file(c, "- rank\n- 4\n", "expected a mapping", "found list")


@case
def config_file_not_utf8(c: Ctx):
    return config_file(c, b"steps: 5\n# caf\xe9\n", "not UTF-8", "offset 14")


@case
def config_file_tasks_nested(c: Ctx):
    return config_file(c, "tasks: [[arc_easy]]\n", "'tasks'", "a list of task names")


@case
def config_file_lr_infinite(c: Ctx):
    return config_file(c, "lr: .inf\n", "'lr'", "finite float")


@case
def config_file_alpha_overlong(c: Ctx):
    return config_file(c, "alpha: 1" + "0" * 400 + "\n", "'alpha'", "finite float")


@case
def config_file_invalid_yaml(c: Ctx):
    return config_file(c, "rank: [4\nsteps: 2\n", "not valid YAML", "line 2, column 6")


@case
def config_file_impossible_date(c: Ctx):
    return config_file(c, "output_dir: 2024-13-45\n", "cannot convert")


@case
def config_file_number_keys(c: Ctx):
    return config_file(c, "1: a\nsteps: 2\nnull: b\n", "unknown config key(s) 1, None")


@case
def config_file_target_modules_regex(c: Ctx):
    return config_file(c, "target_modules: '(q_proj'\n", "'target_modules'", "regular expression")


@case
def config_file_alias_loop(c: Ctx):
    return config_file(c, "tasks: &t [*t]\n", "'tasks'")


@case
def set_deep(c: Ctx):
    return ["train", "--set", "tasks=" + DEEP_ARG], ["--set 'tasks=[[[", NESTED]


@case
def set_wrong_type(c: Ctx):
    return ["train", "--set", "tasks={a: 1}"], ["--set 'tasks={a: 1}'", "'tasks'", "expected list"]


@case
def set_after_a_file_names_the_set(c: Ctx):
    path = write(c.tmp / "config.yaml", "steps: 5\n")
    return ["train", path, "--set", "rank_pattern={q_proj: 0}"], ["--set 'rank_pattern={q_proj: 0}'", "rank > 0"]


@case
def set_invalid_yaml(c: Ctx):
    return ["train", "--set", "steps=["], ["--set 'steps=['", "not valid YAML"]


# ---- data files (`train`) -----------------------------------------------------------------------------

def data_file(c: Ctx, line: str | bytes, *fragments: str) -> tuple[list, list[str]]:
    line = line.encode() if isinstance(line, str) else line
    path = write(c.tmp / "data.jsonl", json.dumps({"prompt": "p", "completion": " c"}).encode() + b"\n" + line + b"\n")
    cfg = tiny_config(c.model, c.tmp / "out", data_files=[str(path)])
    return ["train", *cli_args(cfg)], [f"{path}:2", *fragments]


@case
def data_file_deep(c: Ctx):
    return data_file(c, '{"prompt": ' + DEEP + ', "completion": " c"}', NESTED)


@case
def data_file_a_list(c: Ctx):
    return data_file(c, '["p", " c"]', "expected an object")


@case
def data_file_not_utf8(c: Ctx):
    return data_file(c, b'{"prompt": "\xff", "completion": " c"}', "not UTF-8")


# ---- a plain PEFT LoRA directory given to `serve` (checked before vLLM starts) ----------------------------

def plain_lora(c: Ctx, config_text: str, *fragments: str) -> tuple[list, list[str]]:
    plain = c.adapter()
    for name in ("token_gate.safetensors", "token_gate_config.json"):
        (plain / name).unlink()
    path = write(plain / ADAPTER_CONFIG, config_text)
    return ["serve", "--model", c.model, str(plain), "--port", "9"], [str(path), *fragments]


@case
def serve_plain_config_deep(c: Ctx):
    return plain_lora(c, '{"r": ' + DEEP + "}", NESTED)


@case
def serve_plain_rank_pattern_a_string(c: Ctx):
    return plain_lora(c, '{"r": 8, "rank_pattern": {"q_proj": "eight"}}', "positive integer 'r'")


# ---- a run folder: checkpoint meta.json, checkpoints/latest, run logs (`train --resume`, `report`) --------

def meta(c: Ctx, damage: Callable[[Path], Path], *fragments: str) -> tuple[list, list[str]]:
    run = c.run()
    path = damage(run / "checkpoints" / "step-000002" / "meta.json")
    return c.resume(run), [str(path), *fragments]


@case
def meta_deep(c: Ctx):
    return meta(c, lambda p: with_raw(p, "config", DEEP), NESTED)


@case
def meta_a_list(c: Ctx):
    return meta(c, lambda p: write(p, "[2]"), "expected a JSON object, found list")


@case
def meta_step_a_string(c: Ctx):
    return meta(c, lambda p: edit_json(p, lambda m: m.update(step="2")), "'step'", "an integer > 0")


@case
def latest_names_another_folder(c: Ctx):
    run = c.run()
    pointer = write(run / "checkpoints" / "latest", "../../elsewhere")
    return ["report", run], [str(pointer), "step-NNNNNN"]


@case
def latest_not_utf8(c: Ctx):
    run = c.run()
    pointer = write(run / "checkpoints" / "latest", b"step-00000\xb2")
    return ["report", run], [str(pointer), "not UTF-8"]


@case
def metrics_deep_line(c: Ctx):
    run = c.run()
    path = run / "metrics.jsonl"
    write(path, '{"step": 1, "loss": ' + DEEP + "}\n" + path.read_text())
    return c.resume(run), [f"{path}:1", NESTED]


@case
def gate_stats_a_list_line(c: Ctx):
    run = c.run()
    path = run / "gate_stats.jsonl"
    write(path, "[1]\n" + path.read_text())
    return ["report", run], [f"{path}:1", "integer 'step'"]


@case
def gate_stats_modules_a_list(c: Ctx):
    run = c.run()
    path = run / "gate_stats.jsonl"
    write(path, path.read_text() + json.dumps({"step": 3, "modules": ["q_proj"]}) + "\n")
    return ["report", run], [str(path), "'modules'"]


@case
def report_out_in_a_missing_folder(c: Ctx):
    out = c.tmp / "missing" / "keep.png"
    return ["report", c.good_run, "--out", out], ["--out", str(out)]


@case
def eval_out_in_a_missing_folder(c: Ctx):
    out = c.tmp / "missing" / "eval.json"
    return ["eval", "--model", c.model, "--out", out, "--limit", "1"], ["--out", str(out), "does not exist"]


# ---- the test ------------------------------------------------------------------------------------------

@pytest.fixture
def ctx(tmp_path, tiny_model_dir, good_adapter, good_run) -> Ctx:
    return Ctx(tmp_path, tiny_model_dir, good_adapter, good_run)


def check(args: list, fragments: list[str], cwd: Path | None = None) -> None:
    r = subprocess.run([sys.executable, "-m", "tspeft_rt.cli", *map(str, args)], cwd=cwd, env=clean_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr}"
    assert_one_line_error(r, *fragments)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_error_line(name, ctx):
    args, fragments = CASES[name](ctx)
    check(args, fragments, cwd=ctx.tmp)


@pytest.mark.parametrize("raw", ["Infinity", "NaN", "1e999", "1" + "0" * 400], ids=["inf", "nan", "1e999", "1e400-int"])
def test_non_finite_or_overlong_alpha_in_adapter_config(raw, ctx):
    args, fragments = inspect(with_raw(ctx.adapter() / ADAPTER_CONFIG, "lora_alpha", raw), "'lora_alpha'", "finite")
    check(args, fragments, cwd=ctx.tmp)
