"""Gated subclasses of vLLM's dense LoRA linear layers.

vLLM wraps each adapted linear layer in a `*WithLoRA` class whose `_apply_lora_to_output(x, output)`
adds the delta of every token's adapter slot to `output = W0 x + b`. The subclasses here override
that one funnel with the gated multi-LoRA of `tspeft_rt.kernels.gated_lora`: per slot and packed
slice (q, k, v; gate, up) a threshold and a Gram matrix, held with the slot's weights in a
`PackedLoRA` and set when an adapter is activated in a slot. A slot whose adapter has no gate files runs as plain
LoRA; tokens without an adapter never get a delta.
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

from tspeft_rt.kernels.gated_lora import PackedLoRA, SlotGroup, gated_lora, group_by_slot
from tspeft_rt.serve.telemetry import TELEMETRY


class GatedLoRALayer:
    """Mixin placed before a vLLM `*WithLoRA` class: per-slot tau and Gram buffers, gated forward."""

    def __init__(self, base_layer: torch.nn.Module) -> None:
        super().__init__(base_layer)
        # vLLM's dual-stream path computes the delta apart from the base output: it would bypass the gate.
        self._enable_aux_cuda_stream = False

    def create_lora_weights(self, max_loras: int, lora_config, model_config=None) -> None:
        if self.tp_size > 1:
            raise ValueError("tspeft-rt: token-gated LoRA layers support tensor parallel size 1 only "
                             f"(got {self.tp_size}); serve with --tensor-parallel-size 1, or disable the plugin "
                             "(VLLM_PLUGINS listing other plugins only) to serve plain LoRA with tensor parallelism")
        if lora_config.fully_sharded_loras:
            raise ValueError("tspeft-rt: --fully-sharded-loras is not supported with token-gated adapters")
        super().create_lora_weights(max_loras, lora_config, model_config)
        self.packed = PackedLoRA(max_loras, lora_config.max_lora_rank, self.lora_a_stacked[0].shape[-1],
                                 self.output_slices, self.lora_a_stacked[0].dtype, self.device)
        TELEMETRY.ensure_slots(max_loras)
        if self.device.type == "cuda":  # counted on the device; the telemetry thread collects them
            self.device_kept = torch.zeros(max_loras, dtype=torch.int64, device=self.device)
            self.device_updates = torch.zeros(max_loras, dtype=torch.int64, device=self.device)
            TELEMETRY.device_counters.append((self.device_updates, self.device_kept))

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        super().set_lora(index, lora_a, lora_b)  # vLLM's buffers, sliced and zero-padded
        self.packed.set_slot(index, [a[index, 0] for a in self.lora_a_stacked],
                             [b[index, 0] for b in self.lora_b_stacked])

    def reset_lora(self, index: int) -> None:
        super().reset_lora(index)
        self.packed.reset_slot(index)

    def set_gate(self, index: int, taus: list[float | None]) -> None:
        """Thresholds of slot `index`, one per slice in slice order; None = no gate (plain LoRA)."""
        if len(taus) != self.n_slices:
            raise ValueError(f"tspeft-rt: {len(taus)} thresholds for a layer of {self.n_slices} slices")
        self.packed.set_gate(index, taus)

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        shape = output.shape
        if x.ndim == 3 and output.ndim == 3:  # transformers backend: (1, seq, hidden)
            x, output = x.flatten(0, 1), output.flatten(0, 1)
        if output.is_cuda:
            self._apply_triton(x, output)
            return output.reshape(shape)
        groups = _slot_groups(self.punica_wrapper, x.size(0))
        if groups:
            kept = gated_lora(output, x, self.packed, groups)
            for group, k in zip(groups, kept):
                TELEMETRY.record(group.slot, group.count * self.n_slices, k)
        return output.reshape(shape)

    def _apply_triton(self, x: torch.Tensor, output: torch.Tensor) -> None:
        """Device side, no host synchronisation (CUDA graphs): tspeft_rt.kernels.triton_gated_lora.
        The slot segments are recomputed per layer, never cached across calls: a cache keyed on the
        host would be skipped by graph replays."""
        from tspeft_rt.kernels.triton_gated_lora import gated_lora_triton, lora_segments, packed_gate_views

        slots = self.punica_wrapper.token_mapping_meta.token_lora_mapping[: x.size(0)]
        segments = lora_segments(slots, self.packed.tau.shape[0])
        gated_lora_triton(output, x, self.lora_a_stacked, self.lora_b_stacked,
                          *packed_gate_views(self.packed.gram, self.packed.tau), slots, self.output_slices,
                          kept=self.device_kept, segments=segments)
        self.device_updates.add_(segments[1], alpha=self.n_slices)


def _slot_groups(punica_wrapper, num_tokens: int) -> list[SlotGroup]:
    """Token rows grouped by adapter slot, computed once per batch and shared by every layer (CPU)."""
    slots = punica_wrapper.token_lora_indices[:num_tokens]
    # The slot buffer is rewritten in place each step, which bumps its version counter.
    key = (slots.data_ptr(), slots._version, num_tokens)
    cached = getattr(punica_wrapper, "_tspeft_slot_groups", None)
    if cached is None or cached[0] != key:
        cached = (key, group_by_slot(slots))
        punica_wrapper._tspeft_slot_groups = cached
    return cached[1]


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
