"""The vLLM plugin's registration, its fix of vLLM 0.32's CPU ops, telemetry and the launcher's command."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

pytest.importorskip("vllm")

import vllm.lora.model_manager as model_manager  # noqa: E402
import vllm.lora.ops.torch_ops.lora_ops as lora_ops  # noqa: E402
import vllm.lora.utils as lora_utils  # noqa: E402
import vllm.v1.worker.lora_model_runner_mixin as runner_mixin  # noqa: E402

from tspeft_rt.serve import plugin  # noqa: E402
from tspeft_rt.serve.launcher import (Server, ServedAdapter, ServeError, lora_rank_limit, lora_targets,  # noqa: E402
                                      parse_adapter)
from tspeft_rt.serve.telemetry import GateTelemetry, read_stats, write_stats  # noqa: E402


def test_entry_point_is_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps["tspeft_rt"] == "tspeft_rt.serve.plugin:register"


def test_register_swaps_classes_in_place_and_is_idempotent():
    from tspeft_rt.serve.adapters import GatedWorkerLoRAManager
    from tspeft_rt.serve.layers import GATED_CLASSES
    from tspeft_rt.serve.punica import get_gated_punica_wrapper

    plugin.register()
    once = lora_utils._all_lora_classes
    plugin.register()
    assert lora_utils._all_lora_classes is once
    gated = set(GATED_CLASSES.values())
    assert not set(GATED_CLASSES) & set(once), "a dense linear LoRA class was left in vLLM's list"
    assert gated <= set(once)
    assert runner_mixin.LRUCacheWorkerLoRAManager is GatedWorkerLoRAManager
    assert model_manager.get_punica_wrapper is get_gated_punica_wrapper


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.0.0", "dev"])
def test_untested_vllm_versions_are_refused(version):
    with pytest.raises(plugin.PluginError, match="not supported"):
        plugin.check_version(version)


def test_renamed_private_name_fails_loudly(monkeypatch):
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delattr(lora_utils, "_all_lora_classes")
    with pytest.raises(plugin.PluginError, match="_all_lora_classes"):
        plugin.register()


@pytest.mark.parametrize("plugin_on,eager,mode", [(True, False, "DYNAMO_TRACE_ONCE"), (True, True, "NONE"),
                                                   (False, False, "NONE")], ids=["plugin", "plugin-eager", "stock"])
def test_cpu_compilation_stays_on_with_lora(tiny_model_dir, monkeypatch, plugin_on, eager, mode):
    """vLLM on CPU turns compilation off whenever LoRA is enabled (stock); with the plugin a LoRA
    config keeps vLLM's default compilation, and --enforce-eager still turns it off."""
    from vllm.config import CompilationMode
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    plugin.register()
    cls = type(current_platform)
    if not plugin_on:
        monkeypatch.setattr(cls, "check_and_update_config", classmethod(cls.check_and_update_config.vllm_check))
    config = EngineArgs(model=str(tiny_model_dir), dtype="float32", max_model_len=256, enable_lora=True,
                        max_lora_rank=8, enforce_eager=eager).create_engine_config()
    assert config.lora_config is not None
    assert config.compilation_config.mode == CompilationMode[mode]


def test_cpu_ops_give_unmapped_tokens_no_delta():
    """vLLM 0.32's bgmv_expand applies the last slot's adapter to slot -1; the plugin's wrapper does not."""
    torch.manual_seed(0)
    weights = torch.randn(2, 1, 6, 4)  # [slots, 1, out, rank]
    h = torch.randn(3, 4)
    indices = torch.tensor([0, -1, 1])
    original = getattr(lora_ops.bgmv_expand, "__wrapped__", lora_ops.bgmv_expand)
    stock, fixed = torch.zeros(3, 6), torch.zeros(3, 6)
    original(h, weights, stock, indices, add_inputs=True)
    plugin._masked(original)(h, weights, fixed, indices, add_inputs=True)
    assert stock[1].abs().sum() > 0  # the bug this guards against (gone in vLLM >= 0.33)
    assert fixed[1].abs().sum() == 0
    torch.testing.assert_close(fixed[[0, 2]], stock[[0, 2]])


def test_telemetry_attributes_slot_counts_to_adapters(tmp_path):
    t = GateTelemetry()
    t.ensure_slots(2, "cpu")
    t.names.update({1: "ts", 2: "lora"})
    t.bind(0, 1)
    t.counters[:, 0] += torch.tensor([100, 40])  # what the layers add in forwards
    t.bind(0, 2)  # slot 0 changes hands: the 100 updates so far belong to "ts"
    t.counters[:, 0] += torch.tensor([10, 10])
    t.bind(1, 99)  # a warm-up adapter without a name is not reported
    t.counters[:, 1] += torch.tensor([5, 5])
    assert t.snapshot() == {"ts": {"updates": 100, "skipped": 60, "skip_rate": 0.6},
                            "lora": {"updates": 10, "skipped": 0, "skip_rate": 0.0}}
    write_stats(tmp_path / "s.json", t.snapshot())
    assert read_stats(tmp_path / "s.json")["ts"]["skipped"] == 60
    assert read_stats(tmp_path / "missing.json") == {}


def test_telemetry_reads_counters_and_never_writes_them():
    """A slot's counts are attributed when it changes hands, the reporter's snapshot only reads (CPU
    counters as they are: an idle server reports its last batch), and re-binding the same adapter
    counts nothing twice."""
    t = GateTelemetry()
    t.ensure_slots(2, "cpu")
    t.names.update({1: "ts"})
    t.bind(0, 1)
    t.counters[:, 0] += torch.tensor([50, 20])
    assert t.snapshot() == {"ts": {"updates": 50, "skipped": 30, "skip_rate": 0.6}}
    t.counters[:, 0] += torch.tensor([10, 5])
    t.bind(0, None)  # slot 0 freed: its counts so far belong to "ts"
    counters = t.counters.clone()
    expected = {"ts": {"updates": 60, "skipped": 35, "skip_rate": 35 / 60}}
    assert t.snapshot() == expected and t.snapshot() == expected
    assert torch.equal(t.counters, counters)
    t.bind(1, 1)
    t.counters[:, 1] += torch.tensor([4, 4])
    t.bind(1, 1)  # re-bound to the same adapter: nothing counted twice
    assert t.snapshot()["ts"]["updates"] == 64


def test_telemetry_counters_grow_and_keep_counts():
    t = GateTelemetry()
    t.ensure_slots(2, "cpu")
    first = t.counters
    t.ensure_slots(1, "cpu")
    assert t.counters is first  # layers asking for fewer slots share the tensor their graphs read
    t.counters[:, 1] += 3
    t.ensure_slots(4, "cpu")
    assert t.counters.tolist() == [[0, 3, 0, 0], [0, 3, 0, 0]] and len(t.slot_adapter) == 4


def test_lora_rank_limit():
    assert [lora_rank_limit(r) for r in (1, 4, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]
    with pytest.raises(ServeError, match="largest"):
        lora_rank_limit(1024)


def test_server_command(tiny_gated_adapter, tiny_model_dir):
    server = Server(model=str(tiny_model_dir), adapters=[f"gated={tiny_gated_adapter}"], port=9999,
                    extra_args=["--max-num-seqs", "4"])
    cmd = server.command()
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--lora-modules") + 1] == f"gated={tiny_gated_adapter.resolve()}"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8"
    targets = cmd[cmd.index("--lora-target-modules") + 1:cmd.index("--max-num-seqs")]
    assert set(targets) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1)
                            for m in ("q_proj", "v_proj", "qkv_proj")}  # the adapted modules and their packed layer
    assert cmd[-2:] == ["--max-num-seqs", "4"]
    env = server.environment()
    assert env["HF_HUB_OFFLINE"] == env["VLLM_NO_USAGE_STATS"] == env["DO_NOT_TRACK"] == "1"
    assert env["VLLM_HOST_IP"] == "127.0.0.1"


def test_lora_targets_are_the_modules_some_adapter_has(tiny_gated_adapter, tiny_model_dir, tmp_path):
    """A module every served adapter pruned gets no LoRA layer; run-time loading may need any layer."""
    from tspeft_rt.export import export_checkpoint

    pruned = export_checkpoint(tiny_gated_adapter.parent / "run", tmp_path / "pruned", max_modules=1)
    (kept,) = pruned.modules
    layer, leaf = kept.rsplit(".", 1)
    served = [parse_adapter(str(pruned.path))]
    assert lora_targets(served, False, tiny_model_dir) == sorted([kept, f"{layer}.qkv_proj"])
    assert lora_targets(served, True, tiny_model_dir) == [leaf]
    assert len(lora_targets([*served, parse_adapter(str(tiny_gated_adapter))], False, tiny_model_dir)) == 6
    # paths the checkpoint does not have (vLLM may rename them): the projection names, as before
    renamed = ServedAdapter("x", pruned.path, 8, {f"language_model.{kept}"})
    assert lora_targets([renamed], False, tiny_model_dir) == [leaf]


def test_server_command_refuses_duplicate_names(tiny_gated_adapter, tiny_model_dir):
    server = Server(model=str(tiny_model_dir), adapters=[f"a={tiny_gated_adapter}", f"a={tiny_gated_adapter}"])
    with pytest.raises(ServeError, match="unique"):
        server.command()


def test_serve_cli_rejects_a_bad_adapter_before_starting_vllm(tiny_gated_adapter, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_gated_adapter.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "token_gate_config.json").read_text())
    cfg["format_version"] = 99
    (bad / "token_gate_config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "tspeft_rt.cli", "serve", str(bad), "--port", "9"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "format_version" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def tiny_gated_adapter(tmp_path_factory, tiny_model_dir):
    """A TS-LoRA export of the tiny model: rank 8 on q_proj and v_proj."""
    from test_train import tiny_config

    from tspeft_rt.config import build_config
    from tspeft_rt.export import export_checkpoint
    from tspeft_rt.trainer import train

    run = tmp_path_factory.mktemp("run")
    train(build_config(tiny_config(tiny_model_dir, run / "run", target_modules=["q_proj", "v_proj"], rank=8), "test"))
    out = run / "adapter"
    export_checkpoint(run / "run", out)
    return out


def test_adapter_with_unwrapped_modules_is_refused():
    """vLLM silently drops weights of modules it did not wrap (e.g. outside --lora-target-modules)."""
    from types import SimpleNamespace

    from tspeft_rt.serve.adapters import GatedWorkerLoRAManager

    manager = SimpleNamespace(modules={"model.layers.0.self_attn.qkv_proj": None},
                              packed_modules={"model.layers.0.self_attn.qkv_proj": [
                                  f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]})
    worker = SimpleNamespace(_adapter_manager=manager)
    request = SimpleNamespace(lora_name="x")
    ok = SimpleNamespace(loras={"model.layers.0.self_attn.q_proj": None, "model.layers.0.self_attn.v_proj": None})
    GatedWorkerLoRAManager._check_modules_served(worker, request, ok, gated=False, dora=False)
    bad = SimpleNamespace(loras={**ok.loras, "model.layers.0.mlp.down_proj": None})
    with pytest.raises(ValueError, match="down_proj.*--lora-target-modules"):
        GatedWorkerLoRAManager._check_modules_served(worker, request, bad, gated=False, dora=False)


def test_dora_directories_are_read_by_tspeft_and_marked(tiny_model_dir, tmp_path):
    """A DoRA directory (gated or plain) is read by tspeft-rt's loader, marked DoRA, and its server gets
    the plugin's DoRA state through vLLM's --additional-config, merged with the user's own."""
    from test_train import tiny_config

    from tspeft_rt.config import build_config
    from tspeft_rt.export import export_checkpoint
    from tspeft_rt.serve.launcher import dora_enabled, read_tspeft_adapter, with_dora_enabled
    from tspeft_rt.trainer import train

    train(build_config(tiny_config(tiny_model_dir, tmp_path / "run", method="ts-dora", target_modules=["q_proj"],
                                   steps=2), "test"))
    gated = export_checkpoint(tmp_path / "run", tmp_path / "ts-dora").path
    plain = tmp_path / "dora"
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (plain / name).write_bytes((gated / name).read_bytes())
    for path, kind in ((gated, "TS-DoRA"), (plain, "DoRA")):
        assert read_tspeft_adapter(path).kind == kind and parse_adapter(str(path)).dora
    server = Server(model=str(tiny_model_dir), adapters=[f"d={plain}"], extra_args=[
        "--additional-config", '{"mine": 1}', "--max-num-seqs", "4"])
    cmd = server.command()
    assert cmd[-2:] == ["--additional-config", '{"mine": 1, "tspeft_rt": {"dora": true}}']
    assert cmd[-4:-2] == ["--max-num-seqs", "4"]
    assert with_dora_enabled(["--additional-config={}"]) == ["--additional-config", '{"tspeft_rt": {"dora": true}}']
    with pytest.raises(ServeError, match="--additional-config: expected a JSON object"):
        with_dora_enabled(["--additional-config", "[1]"])
    assert dora_enabled(json.loads(cmd[-1])) and not dora_enabled({}) and not dora_enabled(None)


def test_vllm_still_refuses_dora_outside_the_plugins_loading(tmp_path):
    """The plugin reads a DoRA directory as LoRA only while it loads one: vLLM's own check stays."""
    from types import SimpleNamespace

    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    from tspeft_rt.serve.adapters import read_as_lora

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "use_dora": True,
                                                              "target_modules": ["q_proj"]}))
    model = SimpleNamespace(lora_skip_prefixes=None)
    with read_as_lora(model):
        assert not PEFTHelper.from_local_dir(str(tmp_path), None).use_dora
        assert model.lora_skip_prefixes == ["lora_magnitude_vector"]
    assert model.lora_skip_prefixes is None
    with pytest.raises(ValueError, match="vLLM does not yet support DoRA"):
        PEFTHelper.from_local_dir(str(tmp_path), None).validate_legal(LoRAConfig(max_lora_rank=8))
