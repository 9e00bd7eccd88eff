"""Loading token-gated adapters into vLLM's worker: gates read by tspeft-rt's loader, set per slot.

vLLM reads `adapter_config.json` and `adapter_model.safetensors` as an ordinary LoRA and ignores the
other files of the directory. The worker-side LoRA manager below adds the gate: before vLLM reads the
weights it validates the whole directory with `tspeft_rt.adapter.load_adapter` (and the base model
identity), keeps the thresholds by vLLM module name on the loaded `LoRAModel`, and when the adapter
takes a slot, hands each gated layer the thresholds of its packed slices. Directories without gate
files are served as plain LoRA.

DoRA (gated or not), which vLLM's loader refuses: vLLM reads the directory as the LoRA it contains
(`use_dora` off for its checks, the magnitude vectors skipped), the magnitudes are kept by vLLM module
name from tspeft-rt's loader, and each layer turns them into its per-slot DoRA scale when the adapter
takes a slot. Only a server built with DoRA state (`tspeft_rt.serve.launcher.with_dora_enabled`), on
gated layers and without tensor parallelism, takes DoRA adapters; others refuse them with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from vllm.lora.model_manager import LRUCacheLoRAModelManager
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.request import LoRARequest
from vllm.lora.utils import get_adapter_absolute_path, parse_fine_tuned_lora_name
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from tspeft_rt.adapter import PREFIX, Adapter, AdapterError, check_identity
from tspeft_rt.serve.launcher import dora_enabled, read_tspeft_adapter
from tspeft_rt.serve.layers import GatedLoRALayer
from tspeft_rt.serve.telemetry import TELEMETRY, log


def by_vllm_name(adapter: Adapter, weights_mapper=None) -> dict:
    """The adapter's modules by vLLM module name (mapped exactly as vLLM maps the adapter's weight keys)."""
    return {parse_fine_tuned_lora_name(f"{PREFIX}{name}.lora_A.weight", weights_mapper)[0]: m
            for name, m in adapter.modules.items()}


@contextmanager
def read_as_lora(model) -> Iterator[None]:
    """While vLLM loads a DoRA directory: its config reads as use_dora false and the magnitude vectors
    are skipped (the rest of vLLM's checks and loading unchanged)."""
    from_local_dir = PEFTHelper.__dict__["from_local_dir"]
    skip = getattr(model, "lora_skip_prefixes", None)

    def as_lora(cls, *args, **kwargs) -> PEFTHelper:
        helper = from_local_dir.__func__(cls, *args, **kwargs)
        helper.use_dora = False
        return helper

    PEFTHelper.from_local_dir = classmethod(as_lora)
    model.lora_skip_prefixes = [*(skip or []), "lora_magnitude_vector"]
    try:
        yield
    finally:
        PEFTHelper.from_local_dir = from_local_dir
        model.lora_skip_prefixes = skip


class GatedLoRAModelManager(LRUCacheLoRAModelManager):
    """Sets each gated layer's thresholds when an adapter takes a slot; polls the device telemetry
    counters once per step (vLLM sets the adapter mapping before every forward). Logs how many modules
    have LoRA layers: the others (outside --lora-target-modules) do no LoRA work at all."""

    def __init__(self, *args, vllm_config, **kwargs) -> None:
        GatedLoRALayer.serves_dora = dora_enabled(vllm_config.additional_config)  # read as the layers are built
        super().__init__(*args, vllm_config=vllm_config, **kwargs)
        gated = sum(isinstance(m, GatedLoRALayer) for m in self.modules.values())
        log.info("tspeft-rt: LoRA layers on %d modules (%d gated%s)", len(self.modules), gated,
                 ", DoRA state on" if GatedLoRALayer.serves_dora else "")

    def set_adapter_mapping(self, mapping) -> None:
        super().set_adapter_mapping(mapping)
        TELEMETRY.poll()

    def activate_adapter(self, lora_id: int) -> bool:
        placed = super().activate_adapter(lora_id)
        if placed:
            index = self.lora_index_to_id.index(lora_id)
            lora = self._registered_adapters[lora_id]
            taus = getattr(lora, "gate_taus", None) or {}
            magnitudes = getattr(lora, "dora_magnitudes", None) or {}
            for name, module in self.modules.items():
                if isinstance(module, GatedLoRALayer):
                    children = self.packed_modules.get(name, [name])
                    module.set_gate(index, [taus.get(child) for child in children])
                    if any(child in magnitudes for child in children):
                        module.set_dora(index, [magnitudes.get(child) for child in children])
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
            adapter = read_tspeft_adapter(path)
            if adapter is not None:
                check_identity(adapter, self._hf_config)
        except AdapterError as e:
            raise ValueError(f"tspeft-rt: adapter {lora_request.lora_name!r} refused: {e}") from None
        model = self._adapter_manager.model
        if adapter is not None and adapter.dora:
            with read_as_lora(model):
                lora = super()._load_adapter(lora_request)
        else:
            lora = super()._load_adapter(lora_request)
        self._check_modules_served(lora_request, lora, gated=bool(adapter and adapter.gated),
                                   dora=bool(adapter and adapter.dora))
        if adapter is not None:
            mapper = getattr(model, "hf_to_vllm_mapper", None)
            modules = by_vllm_name(adapter, mapper.get_rename_mapper() if mapper is not None else None)
            lora.gate_taus = {name: m.tau for name, m in modules.items()}
            if adapter.dora:
                lora.dora_magnitudes = {name: m.magnitude.to(torch.float32) for name, m in modules.items()}
        TELEMETRY.names[lora_request.lora_int_id] = lora_request.lora_name
        return lora

    def _check_modules_served(self, lora_request: LoRARequest, lora, gated: bool, dora: bool) -> None:
        """vLLM silently ignores weights of modules it did not wrap, and a layer class the plugin does
        not gate would serve a gated adapter's module densely (and a DoRA module as LoRA): refuse such an
        adapter instead, as a DoRA adapter where a layer cannot take it."""
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
        if dora:
            unable = sorted(f"{m} ({why})" for m in lora.loras if (why := _dora_unsupported(serving[m])))
            if unable:
                raise ValueError(f"tspeft-rt: adapter {name!r} is a DoRA adapter, but these layers cannot serve "
                                 f"it: {_few(unable)}; a DoRA adapter among the served ones at start-up turns "
                                 "DoRA support on (or vLLM's --additional-config '{\"tspeft_rt\": {\"dora\": true}}')")


def _dora_unsupported(layer) -> str | None:
    return layer.dora_unsupported() if isinstance(layer, GatedLoRALayer) else \
        f"{type(layer).__name__} has no DoRA path"


def _few(names: list[str]) -> str:
    return f"{names[:4]}{' ...' if len(names) > 4 else ''}"
