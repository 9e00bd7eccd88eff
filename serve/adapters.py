"""Loading token-gated adapters into vLLM's worker: gates read by tspeft-rt's loader, set per slot.

vLLM reads `adapter_config.json` and `adapter_model.safetensors` as an ordinary LoRA and ignores the
other files of the directory. The worker-side LoRA manager below adds the gate: before vLLM reads the
weights it validates the whole directory with `tspeft_rt.adapter.load_adapter` (and the base model
identity), keeps the thresholds by vLLM module name on the loaded `LoRAModel`, and when the adapter
takes a slot, hands each gated layer the thresholds of its packed slices. Directories without gate
files are served as plain LoRA.
"""

from __future__ import annotations

from vllm.lora.model_manager import LRUCacheLoRAModelManager
from vllm.lora.request import LoRARequest
from vllm.lora.utils import get_adapter_absolute_path, parse_fine_tuned_lora_name
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from tspeft_rt.adapter import PREFIX, Adapter, AdapterError, check_identity
from tspeft_rt.serve.launcher import read_gated_adapter
from tspeft_rt.serve.layers import GatedLoRALayer
from tspeft_rt.serve.telemetry import TELEMETRY, log


def gate_taus(adapter: Adapter, weights_mapper=None) -> dict[str, float]:
    """tau by vLLM module name (mapped exactly as vLLM maps the adapter's weight keys)."""
    return {parse_fine_tuned_lora_name(f"{PREFIX}{name}.lora_A.weight", weights_mapper)[0]: m.tau
            for name, m in adapter.modules.items()}


class GatedLoRAModelManager(LRUCacheLoRAModelManager):
    """Sets each gated layer's thresholds when an adapter takes a slot; polls the device telemetry
    counters once per step (vLLM sets the adapter mapping before every forward). Logs how many modules
    have LoRA layers: the others (outside --lora-target-modules) do no LoRA work at all."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        gated = sum(isinstance(m, GatedLoRALayer) for m in self.modules.values())
        log.info("tspeft-rt: LoRA layers on %d modules (%d gated)", len(self.modules), gated)

    def set_adapter_mapping(self, mapping) -> None:
        super().set_adapter_mapping(mapping)
        TELEMETRY.poll()

    def activate_adapter(self, lora_id: int) -> bool:
        placed = super().activate_adapter(lora_id)
        if placed:
            index = self.lora_index_to_id.index(lora_id)
            taus = getattr(self._registered_adapters[lora_id], "gate_taus", None) or {}
            for name, module in self.modules.items():
                if isinstance(module, GatedLoRALayer):
                    module.set_gate(index, [taus.get(child) for child in self.packed_modules.get(name, [name])])
            TELEMETRY.bind(index, lora_id)
        return placed


class GatedWorkerLoRAManager(LRUCacheWorkerLoRAManager):
    """vLLM's worker LoRA manager with tspeft-rt's gate loading (swapped in by the plugin)."""

    _manager_cls = GatedLoRAModelManager

    def __init__(self, vllm_config, device, embedding_modules, **kwargs) -> None:
        super().__init__(vllm_config, device, embedding_modules, **kwargs)
        self._hf_config = vllm_config.model_config.hf_config

    def _load_adapter(self, lora_request: LoRARequest):
        path = get_adapter_absolute_path(lora_request.lora_path)
        try:
            adapter = read_gated_adapter(path)
            if adapter is not None:
                check_identity(adapter, self._hf_config)
        except AdapterError as e:
            raise ValueError(f"tspeft-rt: adapter {lora_request.lora_name!r} refused: {e}") from None
        lora = super()._load_adapter(lora_request)
        self._check_modules_served(lora_request, lora, gated=adapter is not None)
        if adapter is not None:
            mapper = getattr(self._adapter_manager.model, "hf_to_vllm_mapper", None)
            lora.gate_taus = gate_taus(adapter, mapper.get_rename_mapper() if mapper is not None else None)
        TELEMETRY.names[lora_request.lora_int_id] = lora_request.lora_name
        return lora

    def _check_modules_served(self, lora_request: LoRARequest, lora, gated: bool) -> None:
        """vLLM silently ignores weights of modules it did not wrap, and a layer class the plugin does
        not gate would serve a gated adapter's module densely: refuse such an adapter instead."""
        manager = self._adapter_manager
        serving = dict(manager.modules)
        for parent, children in manager.packed_modules.items():
            serving.update(dict.fromkeys(children, manager.modules[parent]))
        name = lora_request.lora_name
        missing = sorted(m for m in lora.loras if m not in serving)
        if missing:
            raise ValueError(f"tspeft-rt: adapter {name!r} has weights for modules this server does not adapt: "
                             f"{_few(missing)}; widen --lora-target-modules to include them")
        dense = gated and sorted(f"{m} ({type(serving[m]).__name__})" for m in lora.loras
                                 if not isinstance(serving[m], GatedLoRALayer))
        if dense:
            raise ValueError(f"tspeft-rt: adapter {name!r} is token-gated, but these modules would be served by "
                             f"LoRA layers without a gate: {_few(dense)}; serve it without --fully-sharded-loras "
                             "and with a supported layer type, or export it without its gates to serve plain LoRA")


def _few(names: list[str]) -> str:
    return f"{names[:4]}{' ...' if len(names) > 4 else ''}"
