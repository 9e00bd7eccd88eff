"""Gated subclasses of vLLM's dense LoRA linear layers.

vLLM wraps each adapted linear layer in a `*WithLoRA` class whose `_apply_lora_to_output(x, output)`
adds the delta of every token's adapter slot to `output = W0 x + b`. The subclasses here are thin:
they keep the layer's per-slot gate state (`tspeft_rt.serve.state.GatedSlots`: per slot and packed
slice (q, k, v; gate, up) a threshold and a Gram matrix, set when an adapter takes a slot) and hand
(x, output, that state) with the batch's slot metadata (`SlotBatch`, kept by the gated punica
wrapper, `tspeft_rt.serve.punica`) to `GatedSlots.apply`. A slot whose adapter has no gate files
runs as plain LoRA; tokens without an adapter never get a delta.
"""

from __future__ import annotations

import torch
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearVariableSliceWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)

from tspeft_rt.serve.state import GatedSlots
from tspeft_rt.serve.telemetry import TELEMETRY


class GatedLoRALayer:
    """Mixin placed before a vLLM `*WithLoRA` class: per-slot gate state, gated forward."""

    def __init__(self, base_layer: torch.nn.Module) -> None:
        super().__init__(base_layer)
        # vLLM's dual-stream path computes the delta apart from the base output: it would bypass the gate.
        self._enable_aux_cuda_stream = False

    def create_lora_weights(self, max_loras: int, lora_config, model_config=None) -> None:
        if self.tp_size > 1:
            raise ValueError("tspeft-rt: token-gated LoRA layers support tensor parallel size 1 only "
                             f"(got {self.tp_size}); serve with --tensor-parallel-size 1, or disable the plugin "
                             "(VLLM_PLUGINS listing other plugins only) to serve plain LoRA with tensor parallelism")
        super().create_lora_weights(max_loras, lora_config, model_config)
        self.gated = GatedSlots(self.lora_a_stacked, self.lora_b_stacked, self.output_slices)
        TELEMETRY.ensure_slots(max_loras, self.device)

    def set_mapping(self, punica_wrapper) -> None:
        if not hasattr(punica_wrapper, "slot_batch"):
            raise TypeError(f"tspeft-rt: gated LoRA layers need the gated punica wrapper, got "
                            f"{type(punica_wrapper).__name__} (is the tspeft_rt plugin registered?)")
        super().set_mapping(punica_wrapper)

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        super().set_lora(index, lora_a, lora_b)  # vLLM's buffers, sliced and zero-padded
        # Packed layers get one entry per slice, None where the adapter lacks that module (k of q,v).
        self.gated.set_slot(index, [a is not None for a in lora_a] if isinstance(lora_a, (list, tuple))
                            else [True] * self.n_slices)

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        self.gated.reset_slot(index)

    def set_gate(self, index: int, taus: list[float | None]) -> None:
        """Thresholds of slot `index`, one per slice in slice order; None = no gate (plain LoRA)."""
        self.gated.set_gate(index, taus)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        shape = output.shape
        if x.ndim == 3 and output.ndim == 3:  # transformers backend: (1, seq, hidden)
            x, output = x.flatten(0, 1), output.flatten(0, 1)
        self.gated.apply(x, output, self.punica_wrapper.slot_batch, TELEMETRY)
        return output.reshape(shape)


class GatedColumnParallelLinearWithLoRA(GatedLoRALayer, ColumnParallelLinearWithLoRA):
    pass


class GatedMergedColumnParallelLinearWithLoRA(GatedLoRALayer, MergedColumnParallelLinearWithLoRA):
    pass


class GatedQKVParallelLinearWithLoRA(GatedLoRALayer, QKVParallelLinearWithLoRA):
    pass


class GatedMergedQKVParallelLinearWithLoRA(GatedLoRALayer, MergedQKVParallelLinearWithLoRA):
    pass


class GatedRowParallelLinearWithLoRA(GatedLoRALayer, RowParallelLinearWithLoRA):
    pass


class GatedReplicatedLinearWithLoRA(GatedLoRALayer, ReplicatedLinearWithLoRA):
    pass


class GatedMergedColumnParallelLinearVariableSliceWithLoRA(GatedLoRALayer,
                                                           MergedColumnParallelLinearVariableSliceWithLoRA):
    pass


GATED_CLASSES: dict[type, type] = {
    ColumnParallelLinearWithLoRA: GatedColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA: GatedMergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA: GatedQKVParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA: GatedMergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA: GatedRowParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA: GatedReplicatedLinearWithLoRA,
    MergedColumnParallelLinearVariableSliceWithLoRA: GatedMergedColumnParallelLinearVariableSliceWithLoRA,
}
"""vLLM's dense LoRA layer class -> its gated subclass (swapped into vLLM's class list by the plugin)."""
