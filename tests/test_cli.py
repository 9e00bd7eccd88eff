"""The installed `tspeft-rt` command: help and config listing, and bad input reported as one `error:` line
with a non-zero exit and no Python traceback. Also: the project installs no top-level `kernels` or
`serve` package (transformers probes for a `kernels` package, and both names are far too generic).

Runs the console script of the Python running the tests, in a subprocess, from a scratch folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tspeft_rt.config import TrainConfig


def cli_path() -> str:
    exe = Path(sys.executable).with_name("tspeft-rt")
    if exe.is_file():
        return str(exe)
    found = shutil.which("tspeft-rt")
    assert found, "the tspeft-rt console script is not installed"
    return found


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([cli_path(), *args], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def q(value) -> str:
    """A --set value quoted as YAML (JSON is YAML), safe for any path."""
    return json.dumps(value)


# ---- help and config -----------------------------------------------------------------------------------


def test_help_lists_commands(tmp_path):
    r = run_cli(["--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train" in r.stdout.split()
    assert "config" in r.stdout.split()


def test_train_help_mentions_set_and_resume(tmp_path):
    r = run_cli(["train", "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--set" in r.stdout and "--resume" in r.stdout


def test_config_lists_every_field(tmp_path):
    r = run_cli(["config"], tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    listed = [line.split(" = ", 1)[0] for line in lines if line and not line[0].isspace()]
    assert listed == [f.name for f in dataclasses.fields(TrainConfig)]
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["help"] in r.stdout


# ---- errors as one line --------------------------------------------------------------------------------


def assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    assert r.returncode != 0, f"expected a failure, got exit 0\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == errors[0], "the error line must be the last thing printed"
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def not_causal_dir(tmp_path_factory) -> Path:
    from transformers import T5Config

    path = tmp_path_factory.mktemp("t5") / "t5-model"
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100).save_pretrained(path)
    return path


def _case_unknown_key(tmp_path, tiny_model_dir, not_causal_dir):
    return ["train", "--set", "nonsense_key=1"], ["nonsense_key", "valid keys"]


def _case_bad_value(tmp_path, tiny_model_dir, not_causal_dir):
    return ["train", "--set", "target_skip=1.5"], ["target_skip", "expected"]


def _case_missing_config_file(tmp_path, tiny_model_dir, not_causal_dir):
    return ["train", str(tmp_path / "missing.yaml")], [str(tmp_path / "missing.yaml")]


def _case_malformed_jsonl(tmp_path, tiny_model_dir, not_causal_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": " c"}) + "\n" + '{"prompt": "p", "completion": \n')
    args = ["train", "--set", f"model={q(str(tiny_model_dir))}", "--set", f"data_files={q([str(data)])}",
            "--set", f"output_dir={q(str(tmp_path / 'run'))}", "--set", "progress=false"]
    return args, [f"{data}:2"]


def _case_not_causal(tmp_path, tiny_model_dir, not_causal_dir):
    args = ["train", "--set", f"model={q(str(not_causal_dir))}", "--set", f"output_dir={q(str(tmp_path / 'run'))}"]
    return args, [str(not_causal_dir), "causal"]


def _case_missing_model_dir(tmp_path, tiny_model_dir, not_causal_dir):
    path = tmp_path / "no-such-model"
    args = ["train", "--set", f"model={q(str(path))}", "--set", f"output_dir={q(str(tmp_path / 'run'))}"]
    return args, [str(path)]


CASES = {
    "unknown-set-key": _case_unknown_key,
    "out-of-range-value": _case_bad_value,
    "missing-config-file": _case_missing_config_file,
    "malformed-jsonl": _case_malformed_jsonl,
    "not-a-causal-lm": _case_not_causal,
    "missing-model-dir": _case_missing_model_dir,
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_bad_input_is_one_error_line(tmp_path, tiny_model_dir, not_causal_dir, case):
    args, fragments = CASES[case](tmp_path, tiny_model_dir, not_causal_dir)
    r = run_cli(args, tmp_path)
    assert_one_line_error(r, *fragments)
    assert not (tmp_path / "run").exists(), "a failed start must not leave a run folder"
    assert not (tmp_path / "runs").exists()


# ---- installed names -----------------------------------------------------------------------------------


def test_no_top_level_kernels_or_serve_package(tmp_path):
    # From a scratch folder: run from the repository root, `kernels/` and `serve/` would be found via
    # the current directory, which says nothing about what the installation provides.
    code = (
        "import importlib.util, json, tspeft_rt.kernels, tspeft_rt.serve\n"
        "print(json.dumps({'kernels': importlib.util.find_spec('kernels') is None,\n"
        "                  'serve': importlib.util.find_spec('serve') is None,\n"
        "                  'sub': [tspeft_rt.kernels.__name__, tspeft_rt.serve.__name__]}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["sub"] == ["tspeft_rt.kernels", "tspeft_rt.serve"]
    assert out["kernels"], "a top-level `kernels` package is importable"
    assert out["serve"], "a top-level `serve` package is importable"


# ---- eval ------------------------------------------------------------------------------------------


def test_eval_prints_and_writes_per_task_and_average_accuracy(tmp_path, tiny_model_dir):
    r = run_cli(["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easy,piqa", "--limit", "3",
                 "--out", "eval.json"], tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    assert [result[t]["n"] for t in ("arc_easy", "piqa")] == [3, 3]
    for metric in ("acc", "acc_norm"):
        assert result["average"][metric] == pytest.approx((result["arc_easy"][metric] + result["piqa"][metric]) / 2)


# ---- eval --endpoint -------------------------------------------------------------------------------


def test_eval_endpoint_unreachable_is_one_error_line(tmp_path, tiny_model_dir):
    r = run_cli(["eval", "--model", str(tiny_model_dir), "--endpoint", "http://127.0.0.1:9", "--served-name", "x",
                 "--limit", "1"], tmp_path)
    assert_one_line_error(r, "http://127.0.0.1:9", "cannot reach")


def test_eval_endpoint_needs_served_name(tmp_path, tiny_model_dir):
    r = run_cli(["eval", "--model", str(tiny_model_dir), "--endpoint", "http://127.0.0.1:9"], tmp_path)
    assert r.returncode == 2 and "--served-name" in r.stderr and "Traceback" not in r.stderr
