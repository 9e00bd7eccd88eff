"""Malformed adapters and failing exports: every damage is refused with one clear error.

A tiny TS-LoRA and TS-DoRA run are trained and exported once (module fixtures). Each corpus case copies
one good adapter directory and damages one thing; `load_adapter` must raise `AdapterError` naming the
damaged file (and key), and `tspeft-rt inspect` must exit 2 with a single `error:` line, no traceback.
Then: `attach_adapter` against the wrong model, and `export_checkpoint` on bad checkpoints and options
(nothing left behind in OUT_DIR's parent).

The CLI is driven in-process with click's CliRunner (catch_exceptions=False, so an uncaught exception
fails the test with its traceback); three checks run the real `tspeft-rt` executable.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny_llama
from safetensors.torch import load_file, save_file
from test_train import tiny_config

from tspeft_rt.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, GATE_CONFIG, GATE_WEIGHTS, PREFIX, AdapterError,
                               attach_adapter, load_adapter)
from tspeft_rt.checkpoint import latest_checkpoint
from tspeft_rt.cli import main
from tspeft_rt.config import build_config
from tspeft_rt.errors import CheckpointError, TspeftError
from tspeft_rt.export import export_checkpoint
from tspeft_rt.inject import load_base_model
from tspeft_rt.layers import GatedLinear
from tspeft_rt.trainer import train

BIN = Path(sys.executable).parent
NAN, INF = float("nan"), float("inf")


def _train(model_dir: Path, out: Path, method: str, steps: int) -> Path:
    train(build_config(tiny_config(model_dir, out, method=method, steps=steps, save_every=steps), "test"))
    return out


@pytest.fixture(scope="module")
def ts_lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    return _train(tiny_model_dir, tmp_path_factory.mktemp("runs") / "ts-lora", "ts-lora", 2)


@pytest.fixture(scope="module")
def ts_dora_run(tiny_model_dir, tmp_path_factory) -> Path:
    return _train(tiny_model_dir, tmp_path_factory.mktemp("runs") / "ts-dora", "ts-dora", 2)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    return _train(tiny_model_dir, tmp_path_factory.mktemp("runs") / "lora", "lora", 1)


@pytest.fixture(scope="module")
def good(ts_lora_run, ts_dora_run, tmp_path_factory) -> dict[str, Path]:
    """The good exported adapter directories, by method. Never modified: cases work on copies."""
    root = tmp_path_factory.mktemp("good")
    out = {}
    for method, run in (("ts-lora", ts_lora_run), ("ts-dora", ts_dora_run)):
        out[method] = root / method
        export_checkpoint(run, out[method])
    return out


def first_module(adapter_dir: Path) -> str:
    return sorted(json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["target_modules"])[0]


# ---- the corpus -------------------------------------------------------------------------------
# A damage gets (adapter dir, module path m) and changes one thing. Expected substrings may use
# {k} (= base_model.model.<m>, the damaged module's key prefix) and {m}.
Damage = Callable[[Path, str], None]


@dataclass(frozen=True)
class Case:
    id: str
    damage: Damage
    file: str | None  # the file the message must name by its full path; None: the directory itself
    expect: tuple[str, ...] = ()
    base: str = "ts-lora"


def edit_json(name: str, fn: Callable[[dict, str], object]) -> Damage:
    def damage(d: Path, m: str) -> None:
        path = d / name
        path.write_text(json.dumps(fn(json.loads(path.read_text()), m)))
    return damage


def edit_tensors(name: str, fn: Callable[[dict, str], None]) -> Damage:
    """Load the good tensors with load_file, let `fn(tensors, key prefix)` change them, save_file."""
    def damage(d: Path, m: str) -> None:
        tensors = load_file(d / name)
        fn(tensors, PREFIX + m)
        save_file(tensors, d / name, metadata={"format": "pt"})
    return damage


def write_bytes(name: str, data: Callable[[bytes], bytes]) -> Damage:
    def damage(d: Path, m: str) -> None:
        path = d / name
        path.write_bytes(data(path.read_bytes() if path.exists() else b""))
    return damage


def delete(name: str) -> Damage:
    return lambda d, m: (d / name).unlink()


def replace_dir_by_file(d: Path, m: str) -> None:
    shutil.rmtree(d)
    d.write_text("an adapter directory was expected here\n")


def set_key(key: str, value) -> Callable[[dict, str], dict]:
    return lambda c, m: {**c, key: value}


def drop_key(key: str) -> Callable[[dict, str], dict]:
    return lambda c, m: {k: v for k, v in c.items() if k != key}


def setitem(key_suffix: str, make: Callable[[dict, str], torch.Tensor]) -> Callable[[dict, str], None]:
    """Set tensors[k + key_suffix] = make(tensors, k)."""
    def fn(t: dict, k: str) -> None:
        t[k + key_suffix] = make(t, k)
    return fn


def delitem(key_suffix: str) -> Callable[[dict, str], None]:
    def fn(t: dict, k: str) -> None:
        del t[k + key_suffix]
    return fn


def add_ghost_weights(t: dict, k: str) -> None:
    ghost = PREFIX + "model.layers.0.self_attn.ghost_proj"
    for part in ("lora_A.weight", "lora_B.weight"):
        t[f"{ghost}.{part}"] = t[f"{k}.{part}"].clone()


def add_ghost_gate(t: dict, k: str) -> None:
    ghost = PREFIX + "model.layers.0.self_attn.ghost_proj"
    t[f"{ghost}.token_gate.tau"] = torch.tensor([0.1])
    t[f"{ghost}.token_gate.keep_rate"] = torch.tensor([0.5])


def no_modules_at_all(d: Path, m: str) -> None:
    edit_json(ADAPTER_CONFIG, set_key("target_modules", []))(d, m)
    save_file({}, d / ADAPTER_WEIGHTS)
    save_file({}, d / GATE_WEIGHTS)


A, B, MAG = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"
TAU, KEEP = ".token_gate.tau", ".token_gate.keep_rate"
half = lambda b: b[: len(b) // 2]  # noqa: E731

CASES = [
    # the directory itself
    Case("dir-is-a-file", replace_dir_by_file, None, ("not a directory",)),
    Case("dir-missing", lambda d, m: shutil.rmtree(d), None),
    # adapter_config.json
    Case("config-missing", delete(ADAPTER_CONFIG), ADAPTER_CONFIG, ("missing",)),
    Case("config-invalid-json", write_bytes(ADAPTER_CONFIG, lambda b: b'{"peft_type": "LORA", "r": '), ADAPTER_CONFIG,
         ("not valid JSON",)),
    Case("config-json-list", write_bytes(ADAPTER_CONFIG, lambda b: b'["LORA", 8]'), ADAPTER_CONFIG,
         ("JSON object", "list")),
    Case("config-peft-type", edit_json(ADAPTER_CONFIG, set_key("peft_type", "PREFIX_TUNING")), ADAPTER_CONFIG,
         ("'peft_type'", "PREFIX_TUNING")),
    Case("config-r-string", edit_json(ADAPTER_CONFIG, set_key("r", "8")), ADAPTER_CONFIG, ("'r'", "positive integer")),
    Case("config-r-negative", edit_json(ADAPTER_CONFIG, set_key("r", -8)), ADAPTER_CONFIG, ("'r'", "-8")),
    Case("config-r-not-the-tensors-rank", edit_json(ADAPTER_CONFIG, set_key("r", 4)), ADAPTER_WEIGHTS,
         ("{k}.lora_A.weight", "shape")),
    Case("config-target-modules-missing", edit_json(ADAPTER_CONFIG, drop_key("target_modules")), ADAPTER_CONFIG,
         ("'target_modules'",)),
    Case("config-use-dora-string", edit_json(ADAPTER_CONFIG, set_key("use_dora", "false")), ADAPTER_CONFIG,
         ("'use_dora'",)),
    Case("config-bias-all", edit_json(ADAPTER_CONFIG, set_key("bias", "all")), ADAPTER_CONFIG, ("'bias'", "all")),
    Case("config-lora-alpha-nan", edit_json(ADAPTER_CONFIG, set_key("lora_alpha", NAN)), ADAPTER_CONFIG,
         ("'lora_alpha'",)),
    Case("config-rank-pattern-not-an-int", edit_json(ADAPTER_CONFIG, set_key("rank_pattern", {"down_proj": "four"})),
         ADAPTER_CONFIG, ("rank_pattern",)),
    Case("config-rank-pattern-bad-regex", edit_json(ADAPTER_CONFIG, set_key("rank_pattern", {"down_proj(": 4})),
         ADAPTER_CONFIG, ("rank_pattern",)),
    Case("no-modules-at-all", no_modules_at_all, None, ("adapter_",)),
    # adapter_model.safetensors
    Case("weights-missing", delete(ADAPTER_WEIGHTS), ADAPTER_WEIGHTS, ("missing",)),
    Case("weights-truncated", write_bytes(ADAPTER_WEIGHTS, half), ADAPTER_WEIGHTS, ("truncated",)),
    Case("weights-random-bytes", write_bytes(ADAPTER_WEIGHTS, lambda b: random.Random(0).randbytes(len(b))),
         ADAPTER_WEIGHTS, ("corrupt",)),
    Case("weights-empty-file", write_bytes(ADAPTER_WEIGHTS, lambda b: b""), ADAPTER_WEIGHTS),
    Case("weights-int32", edit_tensors(ADAPTER_WEIGHTS, setitem(A, lambda t, k: t[k + A].to(torch.int32))),
         ADAPTER_WEIGHTS, ("{k}.lora_A.weight", "dtype", "int32")),
    Case("weights-lora-A-rank", edit_tensors(ADAPTER_WEIGHTS, setitem(A, lambda t, k: torch.cat([t[k + A], t[k + A][:1]]))),
         ADAPTER_WEIGHTS, ("{k}.lora_A.weight", "shape")),
    Case("weights-lora-B-rank", edit_tensors(ADAPTER_WEIGHTS, setitem(B, lambda t, k: t[k + B][:, :-1].contiguous())),
         ADAPTER_WEIGHTS, ("{k}.lora_B.weight", "shape")),
    Case("weights-lora-A-vector", edit_tensors(ADAPTER_WEIGHTS, setitem(A, lambda t, k: t[k + A].flatten())),
         ADAPTER_WEIGHTS, ("{k}", "matrices")),
    Case("weights-lora-B-nan", edit_tensors(ADAPTER_WEIGHTS, setitem(B, lambda t, k: torch.full_like(t[k + B], NAN))),
         ADAPTER_WEIGHTS, ("{k}.lora_B.weight", "non-finite")),
    Case("weights-lora-B-missing", edit_tensors(ADAPTER_WEIGHTS, delitem(B)), ADAPTER_WEIGHTS,
         ("{k}.lora_B.weight", "missing")),
    Case("weights-unknown-key", edit_tensors(ADAPTER_WEIGHTS, setitem(".lora_C.weight", lambda t, k: t[k + A].clone())),
         ADAPTER_WEIGHTS, ("{k}.lora_C.weight", "unexpected key")),
    Case("weights-module-not-in-target-modules", edit_tensors(ADAPTER_WEIGHTS, add_ghost_weights), ADAPTER_WEIGHTS,
         ("ghost_proj", "target_modules")),
    Case("target-modules-lists-module-without-weights",
         edit_json(ADAPTER_CONFIG, lambda c, m: {**c, "target_modules": c["target_modules"] + ["model.layers.0.mlp.ghost_proj"]}),
         ADAPTER_WEIGHTS, ("ghost_proj", "target_modules")),
    Case("weights-magnitude-with-use-dora-false",
         edit_tensors(ADAPTER_WEIGHTS, setitem(MAG, lambda t, k: torch.ones(t[k + B].shape[0]))),
         ADAPTER_WEIGHTS, ("{k}.lora_magnitude_vector", "use_dora")),
    # DoRA
    Case("dora-use-dora-false", edit_json(ADAPTER_CONFIG, set_key("use_dora", False)), ADAPTER_WEIGHTS,
         ("lora_magnitude_vector", "use_dora"), base="ts-dora"),
    Case("dora-magnitude-missing", edit_tensors(ADAPTER_WEIGHTS, delitem(MAG)), ADAPTER_WEIGHTS,
         ("{k}.lora_magnitude_vector", "missing"), base="ts-dora"),
    Case("dora-magnitude-wrong-shape", edit_tensors(ADAPTER_WEIGHTS, setitem(MAG, lambda t, k: torch.ones(3))),
         ADAPTER_WEIGHTS, ("{k}.lora_magnitude_vector", "shape"), base="ts-dora"),
    Case("dora-magnitude-inf", edit_tensors(ADAPTER_WEIGHTS, setitem(MAG, lambda t, k: torch.full_like(t[k + MAG], INF))),
         ADAPTER_WEIGHTS, ("{k}.lora_magnitude_vector", "non-finite"), base="ts-dora"),
    # token_gate.safetensors
    Case("gate-weights-missing", delete(GATE_WEIGHTS), None, (GATE_WEIGHTS, GATE_CONFIG)),
    Case("gate-config-missing", delete(GATE_CONFIG), None, (GATE_CONFIG, GATE_WEIGHTS)),
    Case("gate-weights-truncated", write_bytes(GATE_WEIGHTS, half), GATE_WEIGHTS),
    Case("gate-tau-negative", edit_tensors(GATE_WEIGHTS, setitem(TAU, lambda t, k: torch.tensor([-0.5]))), GATE_WEIGHTS,
         ("{k}.token_gate.tau", ">= 0")),
    Case("gate-tau-nan", edit_tensors(GATE_WEIGHTS, setitem(TAU, lambda t, k: torch.tensor([NAN]))), GATE_WEIGHTS,
         ("{k}.token_gate.tau", "non-finite")),
    Case("gate-tau-float64", edit_tensors(GATE_WEIGHTS, setitem(TAU, lambda t, k: t[k + TAU].double())), GATE_WEIGHTS,
         ("{k}.token_gate.tau", "dtype", "float64")),
    Case("gate-tau-shape-2", edit_tensors(GATE_WEIGHTS, setitem(TAU, lambda t, k: t[k + TAU].repeat(2))), GATE_WEIGHTS,
         ("{k}.token_gate.tau", "shape")),
    Case("gate-keep-rate-1.5", edit_tensors(GATE_WEIGHTS, setitem(KEEP, lambda t, k: torch.tensor([1.5]))), GATE_WEIGHTS,
         ("{k}.token_gate.keep_rate", "1.5")),
    Case("gate-tau-deleted", edit_tensors(GATE_WEIGHTS, delitem(TAU)), GATE_WEIGHTS, ("{k}.token_gate.tau", "missing")),
    Case("gate-for-module-without-weights", edit_tensors(GATE_WEIGHTS, add_ghost_gate), GATE_WEIGHTS,
         ("ghost_proj", "without adapter weights")),
    Case("gate-unknown-key", edit_tensors(GATE_WEIGHTS, setitem(".token_gate.bias", lambda t, k: torch.zeros(1))),
         GATE_WEIGHTS, ("{k}.token_gate.bias", "unexpected key")),
    # token_gate_config.json
    Case("gate-config-invalid-json", write_bytes(GATE_CONFIG, lambda b: b[:-5]), GATE_CONFIG, ("not valid JSON",)),
    Case("gate-config-format", edit_json(GATE_CONFIG, set_key("format", "peft")), GATE_CONFIG, ("'format'", "peft")),
    Case("gate-config-format-version-99", edit_json(GATE_CONFIG, set_key("format_version", 99)), GATE_CONFIG,
         ("unknown format_version", "99")),
    Case("gate-config-criterion", edit_json(GATE_CONFIG, set_key("criterion", "abs_ge")), GATE_CONFIG,
         ("'criterion'", "abs_ge")),
    Case("gate-config-eps", edit_json(GATE_CONFIG, set_key("eps", 0.1)), GATE_CONFIG, ("'eps'",)),
    Case("gate-config-base-model-missing", edit_json(GATE_CONFIG, drop_key("base_model")), GATE_CONFIG, ("'base_model'",)),
    Case("gate-config-pruned-entry-not-an-object",
         edit_json(GATE_CONFIG, set_key("pruned", {"model.layers.1.mlp.up_proj": 0.1})), GATE_CONFIG, ("pruned",)),
    Case("gate-config-training-not-an-object", edit_json(GATE_CONFIG, set_key("training", ["steps", 3])), GATE_CONFIG,
         ("training",)),
]
assert len({c.id for c in CASES}) == len(CASES) >= 24


def make_damaged(case: Case, good: dict[str, Path], tmp_path: Path) -> tuple[Path, str]:
    src = good[case.base]
    d = tmp_path / "adapter"
    shutil.copytree(src, d)
    m = first_module(src)
    case.damage(d, m)
    return d, m


def check_message(msg: str, case: Case, d: Path, m: str) -> None:
    where = str(d / case.file) if case.file else str(d)
    assert where in msg, f"the message does not name {where}: {msg}"
    for s in case.expect:
        s = s.format(k=PREFIX + m, m=m)
        assert s in msg, f"the message does not mention {s!r}: {msg}"


def assert_cli_error(result) -> str:
    """Exit status 2, nothing on stdout, exactly one `error:` line on stderr, no traceback."""
    assert "Traceback" not in result.output
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("method", ["ts-lora", "ts-dora"])
def test_good_adapter_loads_and_inspects(good, method):
    adapter = load_adapter(good[method])
    assert adapter.kind == {"ts-lora": "TS-LoRA", "ts-dora": "TS-DoRA"}[method]
    assert len(adapter.modules) == 14 and first_module(good[method]) in adapter.modules
    for m in adapter.modules.values():
        assert m.tau is not None and m.tau >= 0 and 0 <= m.keep_rate <= 1
        assert (m.magnitude is not None) == (method == "ts-dora")
    result = cli("inspect", good[method])
    assert result.exit_code == 0 and result.stderr == "", result.output
    assert f"{adapter.kind} adapter" in result.stdout and "WARNING: stock PEFT" in result.stdout


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_load_adapter_rejects(case, good, tmp_path):
    d, m = make_damaged(case, good, tmp_path)
    with pytest.raises(AdapterError) as err:
        load_adapter(d)
    check_message(str(err.value), case, d, m)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_inspect_rejects(case, good, tmp_path):
    d, m = make_damaged(case, good, tmp_path)
    line = assert_cli_error(cli("inspect", d))
    check_message(line, case, d, m)


def test_inspect_executable(good, tmp_path):
    """The installed `tspeft-rt` on a good and on a damaged directory (real processes)."""
    ok = subprocess.run([BIN / "tspeft-rt", "inspect", good["ts-lora"]], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "TS-LoRA adapter" in ok.stdout, ok.stderr
    d, _ = make_damaged(next(c for c in CASES if c.id == "weights-truncated"), good, tmp_path)
    bad = subprocess.run([BIN / "tspeft-rt", "inspect", d], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert str(d / ADAPTER_WEIGHTS) in bad.stderr


# ---- attach_adapter against a model -----------------------------------------------------------
@pytest.fixture(scope="module")
def three_layer_dir(tmp_path_factory, bundled_dir) -> Path:
    """Same module shapes as the tiny model, one layer more: only the identity check can tell."""
    return make_tiny_llama(tmp_path_factory.mktemp("other") / "three-layers", bundled_dir, num_hidden_layers=3)


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory, bundled_dir) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("other") / "hidden-32", bundled_dir, hidden_size=32)


def gated_layers(model) -> list[str]:
    return [n for n, mod in model.named_modules() if isinstance(mod, GatedLinear)]


def test_attach_good_adapter(good, tiny_model_dir):
    model, _ = load_base_model(str(tiny_model_dir))
    names = attach_adapter(model, load_adapter(good["ts-lora"]))
    assert len(names) == 14 and sorted(gated_layers(model)) == sorted(names)


def test_attach_to_other_base_model_names_config_hash(good, three_layer_dir):
    adapter = load_adapter(good["ts-lora"])
    model, _ = load_base_model(str(three_layer_dir))
    with pytest.raises(AdapterError) as err:
        attach_adapter(model, adapter)
    msg = str(err.value)
    assert str(good["ts-lora"] / GATE_CONFIG) in msg
    assert "config hash" in msg and adapter.gate_config["base_model"]["config_hash"] in msg
    assert gated_layers(model) == []


def test_attach_plain_lora_to_other_shapes(good, narrow_dir, tmp_path):
    """Without the gate files there is no identity: the feature sizes must still be checked."""
    d = tmp_path / "plain"
    shutil.copytree(good["ts-lora"], d)
    (d / GATE_CONFIG).unlink()
    (d / GATE_WEIGHTS).unlink()
    adapter = load_adapter(d)
    assert adapter.kind == "LoRA"
    model, _ = load_base_model(str(narrow_dir))
    with pytest.raises(AdapterError) as err:
        attach_adapter(model, adapter)
    assert str(d / ADAPTER_WEIGHTS) in str(err.value) and first_module(d) in str(err.value)
    assert gated_layers(model) == []


def rename_module(d: Path, old: str, new: str) -> None:
    edit_json(ADAPTER_CONFIG, lambda c, m: {**c, "target_modules": sorted(
        new if t == old else t for t in c["target_modules"])})(d, old)
    for name in (ADAPTER_WEIGHTS, GATE_WEIGHTS):
        t = load_file(d / name)
        save_file({k.replace(PREFIX + old + ".", PREFIX + new + "."): v for k, v in t.items()}, d / name)


@pytest.mark.parametrize("new, expect", [("model.layers.7.mlp.down_proj", "does not exist"),
                                         ("model.layers.1.input_layernorm", "expected nn.Linear")],
                         ids=["module-not-in-model", "module-not-linear"])
def test_attach_module_path_not_in_model(good, tiny_model_dir, tmp_path, new, expect):
    d = tmp_path / "renamed"
    shutil.copytree(good["ts-lora"], d)
    rename_module(d, "model.layers.0.mlp.down_proj", new)
    adapter = load_adapter(d)  # the loader cannot know; attaching must
    assert new in adapter.modules
    model, _ = load_base_model(str(tiny_model_dir))
    with pytest.raises(AdapterError) as err:
        attach_adapter(model, adapter)
    assert str(d / ADAPTER_WEIGHTS) in str(err.value) and new in str(err.value) and expect in str(err.value)
    assert gated_layers(model) == []  # nothing half-attached


# ---- export errors ----------------------------------------------------------------------------
def copy_checkpoint(run: Path, tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(latest_checkpoint(run), ckpt)
    return ckpt


def edit_ckpt_tensors(fn: Callable[[dict, str], None]) -> Callable[[Path], Path]:
    def damage(ckpt: Path) -> Path:
        t = load_file(ckpt / "adapter.safetensors")
        fn(t, sorted(k for k in t if k.endswith("token_gate.tau"))[0].removesuffix(".token_gate.tau"))
        save_file(t, ckpt / "adapter.safetensors")
        return ckpt
    return damage


def edit_meta(fn: Callable[[dict], dict]) -> Callable[[Path], Path]:
    def damage(ckpt: Path) -> Path:
        (ckpt / "meta.json").write_text(json.dumps(fn(json.loads((ckpt / "meta.json").read_text()))))
        return ckpt
    return damage


def write_into(ckpt: Path, name: str, data) -> Path:
    """Overwrite ckpt/name with `data` (bytes, or a function of the old bytes)."""
    path = ckpt / name
    path.write_bytes(data(path.read_bytes()) if callable(data) else data)
    return ckpt


def replace_ckpt(ckpt: Path, by: str | None) -> Path:
    """Replace the checkpoint folder by an empty folder ("dir"), a file ("file") or nothing (None)."""
    shutil.rmtree(ckpt)
    if by == "dir":
        ckpt.mkdir()
    elif by == "file":
        ckpt.write_text("not a checkpoint\n")
    return ckpt


def set_tau(value) -> Callable[[dict, str], None]:
    return lambda t, m: t.__setitem__(m + ".token_gate.tau", torch.tensor(value))


@dataclass(frozen=True)
class ExportCase:
    id: str
    source: Callable[[Path], Path]  # copied checkpoint -> the source to export
    error: type
    expect: tuple[str, ...]  # substrings; {ckpt} = the checkpoint folder, {m} = its first gated module
    kwargs: tuple = ()
    run: str = "ts-lora"


EXPORT_CASES = [
    ExportCase("tau-negative", edit_ckpt_tensors(set_tau([-1.0])), CheckpointError,
               ("{ckpt}/adapter.safetensors", "{m}.token_gate.tau", "-1.0")),
    ExportCase("tau-nan", edit_ckpt_tensors(set_tau([NAN])), CheckpointError, ("{m}.token_gate.tau", "nan")),
    ExportCase("tau-inf", edit_ckpt_tensors(set_tau([INF])), CheckpointError, ("{m}.token_gate.tau", "inf")),
    ExportCase("tau-shape-2", edit_ckpt_tensors(set_tau([0.1, 0.2])), CheckpointError, ("{m}.token_gate.tau",)),
    ExportCase("lora-B-nan-names-the-checkpoint",
               edit_ckpt_tensors(lambda t, m: t[m + ".lora_B.weight"].fill_(NAN)), TspeftError,
               ("{ckpt}/adapter.safetensors", "{m}.lora_B.weight")),
    ExportCase("keep-rate-1.5-names-the-checkpoint",
               edit_meta(lambda meta: {**meta, "keep_rates": {k: 1.5 for k in meta["keep_rates"]}}), TspeftError,
               ("{ckpt}/meta.json", "keep_rate")),
    ExportCase("keep-rates-missing", edit_meta(lambda meta: {**meta, "keep_rates": {}}), CheckpointError,
               ("{ckpt}/meta.json", "keep_rates")),
    ExportCase("meta-without-config", edit_meta(lambda meta: {k: v for k, v in meta.items() if k != "config"}),
               CheckpointError, ("{ckpt}/meta.json", "config")),
    ExportCase("meta-invalid-json", lambda c: write_into(c, "meta.json", b"{"), CheckpointError,
               ("{ckpt}", "unreadable")),
    ExportCase("adapter-truncated", lambda c: write_into(c, "adapter.safetensors", half), CheckpointError,
               ("{ckpt}", "unreadable")),
    ExportCase("prune-everything", lambda c: c, AdapterError, ("pruning removed every module",),
               (("prune_below", 2.0),)),
    ExportCase("max-modules-zero", lambda c: c, AdapterError, ("--max-modules",), (("max_modules", 0),)),
    ExportCase("rank-by-unknown", lambda c: c, AdapterError, ("--rank-by",), (("rank_by", "loudest"),)),
    ExportCase("dense-lora-prune-below", lambda c: c, AdapterError, ("{ckpt}", "dense lora", "record pruning"),
               (("prune_below", 0.5),), run="lora"),
    ExportCase("dense-lora-max-modules-by-keep", lambda c: c, AdapterError, ("dense lora",),
               (("max_modules", 2), ("rank_by", "keep")), run="lora"),
    ExportCase("dense-lora-max-modules-by-norm", lambda c: c, AdapterError, ("dense lora", "record pruning"),
               (("max_modules", 2), ("rank_by", "norm")), run="lora"),
    ExportCase("source-empty-dir", lambda c: replace_ckpt(c, "dir"), CheckpointError, ("{ckpt}", "not a checkpoint")),
    ExportCase("source-missing", lambda c: replace_ckpt(c, None), CheckpointError, ("{ckpt}", "not a checkpoint")),
    ExportCase("source-is-a-file", lambda c: replace_ckpt(c, "file"), CheckpointError, ("{ckpt}", "not a checkpoint")),
]


@pytest.fixture
def runs(request) -> Callable[[str], Path]:
    return lambda name: request.getfixturevalue({"ts-lora": "ts_lora_run", "lora": "lora_run"}[name])


@pytest.mark.parametrize("case", EXPORT_CASES, ids=[c.id for c in EXPORT_CASES])
def test_export_rejects(case, runs, tmp_path):
    run = runs(case.run)
    ckpt = copy_checkpoint(run, tmp_path)
    m = min(json.loads((ckpt / "meta.json").read_text())["keep_rates"] or [""])
    source = case.source(ckpt)
    parent = tmp_path / "exports"
    parent.mkdir()
    (parent / "neighbour.txt").write_text("untouched")
    with pytest.raises(case.error) as err:
        export_checkpoint(source, parent / "adapter", **dict(case.kwargs))
    msg = str(err.value)
    for s in case.expect:
        assert s.format(ckpt=ckpt, m=m) in msg, f"{s!r} not in: {msg}"
    assert "/.adapter." not in msg, f"the message names a temporary folder that no longer exists: {msg}"
    assert sorted(p.name for p in parent.iterdir()) == ["neighbour.txt"]  # no OUT_DIR, no .adapter.* left


def test_export_refuses_existing_out_dir(ts_lora_run, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(AdapterError, match="--overwrite"):
        export_checkpoint(ts_lora_run, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_export_overwrite_replaces_out_dir(ts_lora_run, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "mine.txt").write_text("old")
    adapter = export_checkpoint(ts_lora_run, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, GATE_CONFIG, GATE_WEIGHTS])
    assert adapter.kind == "TS-LoRA" and load_adapter(out).modules.keys() == adapter.modules.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no .adapter.* nor .adapter.old left


def test_failed_export_with_overwrite_keeps_old_out_dir(ts_lora_run, tmp_path):
    """A checkpoint that fails validation after the temporary folder was written: OUT_DIR stays as it was."""
    ckpt = edit_ckpt_tensors(lambda t, m: t[m + ".lora_B.weight"].fill_(NAN))(copy_checkpoint(ts_lora_run, tmp_path))
    out = tmp_path / "exports" / "adapter"
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("old")
    with pytest.raises(TspeftError):
        export_checkpoint(ckpt, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]


def test_export_cli_bad_checkpoint(ts_lora_run, tmp_path):
    ckpt = edit_ckpt_tensors(set_tau([-1.0]))(copy_checkpoint(ts_lora_run, tmp_path))
    out = tmp_path / "exports" / "adapter"
    line = assert_cli_error(cli("export", ckpt, out))
    assert "token_gate.tau" in line and str(ckpt / "adapter.safetensors") in line
    assert not out.exists()
    proc = subprocess.run([BIN / "tspeft-rt", "export", ckpt, out], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "token_gate.tau" in proc.stderr
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())




@pytest.mark.parametrize("damage", [edit_ckpt_tensors(set_tau([0.1, 0.2])),
                                    edit_meta(lambda meta: {k: v for k, v in meta.items() if k != "config"})],
                         ids=["tau-shape-2", "meta-without-config"])
def test_export_cli_later_errors_are_one_line(ts_lora_run, tmp_path, damage):
    """Checkpoint damage that gets past the first checks must still end as one `error:` line."""
    ckpt = damage(copy_checkpoint(ts_lora_run, tmp_path))
    assert_cli_error(cli("export", ckpt, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
