"""Gated subclasses of vLLM's dense LoRA linear layers.

vLLM wraps each adapted linear layer in a `*WithLoRA` class whose `_apply_lora_to_output(x, output)`
adds the delta of every token's adapter slot to `output = W0 x + b`. The subclasses here are thin:
they keep the layer's per-slot gate state (`tspeft_rt.serve.state.GatedSlots`: per slot and packed
slice (q, k, v; gate, up) a threshold and a Gram matrix, set when an adapter takes a slot) and hand
(x, output, that state) with the batch's slot metadata (`SlotBatch`, kept by the gated punica
wrapper, `tspeft_rt.serve.punica`) to `GatedSlots.apply`. A slot whose adapter has no gate files
runs as plain LoRA; tokens without an adapter never get a delta.

DoRA: a server whose layers are built with `serves_dora` (the model manager sets it from vLLM's
`--additional-config '{"tspeft_rt": {"dora": true}}'`, which the launcher passes when it serves a DoRA
adapter) keeps a per-slot DoRA scale in every gated layer, computed from the layer's base weight when
a DoRA adapter takes a slot (`set_dora`); both the PyTorch path and the Triton kernels apply it.

Under tensor parallelism (the PyTorch path, on CPU and CUDA) each rank holds a share of a layer;
`Shards` says how the gate's inputs are completed so that every rank takes the decision one device
would: column-parallel layers sum the per-token squared norms over the ranks, row-parallel layers sum
the shrink and decide on the all-reduced base output. Decisions are counted on rank 0 only.
"""

from __future__ import annotations

import torch
from vllm.distributed import get_pp_group, split_tensor_along_last_dim, tensor_model_parallel_all_reduce
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearVariableSliceWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)

from tspeft_rt.kernels.gated_lora import Shards
from tspeft_rt.serve.state import GatedSlots
from tspeft_rt.serve.telemetry import TELEMETRY


class GatedLoRALayer:
    """Mixin placed before a vLLM `*WithLoRA` class: per-slot gate state, gated forward."""

    serves_dora = False  # set for a whole model before its layers are built (GatedLoRAModelManager)

    def __init__(self, base_layer: torch.nn.Module) -> None:
        super().__init__(base_layer)
        # vLLM's dual-stream path computes the delta apart from the base output: it would bypass the gate.
        self._enable_aux_cuda_stream = False

    def create_lora_weights(self, max_loras: int, lora_config, model_config=None) -> None:
        if get_pp_group().world_size > 1:
            raise ValueError("tspeft-rt: token-gated LoRA layers do not support pipeline parallelism "
                             f"(--pipeline-parallel-size {get_pp_group().world_size}); use tensor parallelism")
        super().create_lora_weights(max_loras, lora_config, model_config)
        layer = self.base_layer
        bias = None if layer.bias is None or layer.skip_bias_add else layer.bias  # what the base output includes
        self.gated = GatedSlots(self.lora_a_stacked, self.lora_b_stacked, self.output_slices,
                                shards=self.shards() if self.tp_size > 1 else None, dora=self.serves_dora,
                                bias=bias)
        if self.serves_dora:
            self.w0_sq = self._base_row_sq_norms()
        TELEMETRY.ensure_slots(max_loras, self.device)
        TELEMETRY.counting = self.tp_rank == 0  # the ranks take the same decisions: count them once

    def shards(self) -> Shards | None:
        """How this layer's rank completes the gate's inputs under tensor parallelism (`Shards`)."""
        return None

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

    def dora_unsupported(self) -> str | None:
        """Why this layer cannot serve a DoRA adapter, or None."""
        if self.gated.packed.scale is None:
            return "the server was started without DoRA support"
        if self.tp_size > 1:
            return "DoRA is not served under tensor parallelism"
        return None

    def set_dora(self, index: int, magnitudes: list[torch.Tensor | None]) -> None:
        """Slot `index` holds a DoRA adapter: its magnitude vector per slice in slice order (None where
        it has no weights); the scale comes from this layer's base weight and the slot's A and B."""
        if why := self.dora_unsupported():
            raise ValueError(f"tspeft-rt: this layer cannot serve DoRA: {why}")
        self.gated.set_dora(index, magnitudes, self.w0_sq, self._base_forward)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W0 x (no bias) through the layer's own weight format: vLLM on CPU keeps W0 only packed for its
        GEMM, and a quantized layer only quantized (DoRA's norm is then the served weight's)."""
        return self._get_quant_method().apply(self.base_layer, x)

    def _base_row_sq_norms(self, chunk: int = 256) -> torch.Tensor:
        """||W0||^2 per output row [sum N] fp32, from the base forward of the identity, a chunk of input
        features at a time (once per layer, at start-up, on servers with DoRA state)."""
        in_features = self.lora_a_stacked[0].shape[-1]
        dtype = getattr(self.base_layer, "params_dtype", self.lora_a_stacked[0].dtype)
        sq = torch.zeros(sum(self.output_slices), dtype=torch.float64, device=self.device)
        for lo in range(0, in_features, chunk):
            rows = torch.arange(min(chunk, in_features - lo), device=self.device)
            eye = torch.zeros(len(rows), in_features, dtype=dtype, device=self.device)
            eye[rows, lo + rows] = 1
            sq += self._base_forward(eye).double().square().sum(0)
        return sq.float()

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        shape = output.shape
        if x.ndim == 3 and output.ndim == 3:  # transformers backend: (1, seq, hidden)
            x, output = x.flatten(0, 1), output.flatten(0, 1)
        counters = TELEMETRY.counters if TELEMETRY.counting else None
        self.gated.apply(x, output, self.punica_wrapper.slot_batch, counters)
        return output.reshape(shape)


class GatedColumnShardedLayer(GatedLoRALayer):
    """Column-parallel layers: each rank holds a share of the output features, so the squared norms of
    delta and base are summed over the ranks."""

    def shards(self) -> Shards:
        counted = None
        replicas = getattr(self.base_layer, "num_kv_head_replicas", 1)
        if replicas > 1 and self.tp_rank % replicas:  # this rank's K/V heads are counted by another
            counted = torch.ones(sum(self.output_slices), device=self.device)
            counted[self.base_layer.num_heads * self.base_layer.head_size:] = 0
        return Shards(sum_norms=tensor_model_parallel_all_reduce, counted=counted)


class GatedColumnParallelLinearWithLoRA(GatedColumnShardedLayer, ColumnParallelLinearWithLoRA):
    pass


class GatedMergedColumnParallelLinearWithLoRA(GatedColumnShardedLayer, MergedColumnParallelLinearWithLoRA):
    pass


class GatedQKVParallelLinearWithLoRA(GatedColumnShardedLayer, QKVParallelLinearWithLoRA):
    pass


class GatedMergedQKVParallelLinearWithLoRA(GatedColumnShardedLayer, MergedQKVParallelLinearWithLoRA):
    pass


class GatedRowParallelLinearWithLoRA(GatedLoRALayer, RowParallelLinearWithLoRA):
    """Row-parallel: each rank holds a share of the input features, so the base output is complete only
    after vLLM's all-reduce, and the shrink A x is a partial sum. Under tensor parallelism the forward
    all-reduces the base output first, then the gate sums the shrink over the ranks and decides on the
    full output, identically on every rank, and every rank adds the same delta."""

    def shards(self) -> Shards:
        if not self.base_layer.reduce_results:
            raise ValueError(f"tspeft-rt: a row-parallel layer that leaves its all-reduce to the caller "
                             f"({type(self.base_layer).__name__}, reduce_results=False) cannot be gated under "
                             "tensor parallelism: the gate needs the full base output")
        return Shards(sum_shrink=tensor_model_parallel_all_reduce)

    def forward(self, input_: torch.Tensor):
        if self.tp_size == 1:
            return super().forward(input_)
        layer = self.base_layer
        x = input_ if layer.input_is_parallel else \
            split_tensor_along_last_dim(input_, num_partitions=self.tp_size)[self.tp_rank].contiguous()
        bias = None if self.tp_rank > 0 or layer.skip_bias_add else layer.bias
        output = tensor_model_parallel_all_reduce(self._get_quant_method().apply(layer, x, bias))
        output = self._apply_lora_to_output(x, output)
        output_bias = layer.bias if layer.skip_bias_add else None
        return (output, output_bias) if layer.return_bias else output


class GatedReplicatedLinearWithLoRA(GatedLoRALayer, ReplicatedLinearWithLoRA):
    pass


class GatedMergedColumnParallelLinearVariableSliceWithLoRA(GatedColumnShardedLayer,
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
