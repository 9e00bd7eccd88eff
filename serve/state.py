"""Serving state of the gated layers, apart from vLLM's classes (the GPU check drives it without vLLM).

Two kinds of state, following vLLM's own split between the punica wrapper and the LoRA layers:

- `SlotBatch`, per batch, shared by every gated layer: each token's adapter slot (-1: none) and, for
  the Triton kernels, the grouping of tokens by slot, computed once per batch by `update` from the
  slot indices vLLM refreshes for every batch (`PunicaWrapperBase.token_lora_indices`; the gated
  punica wrapper calls it). The buffers are allocated once at their largest size, so CUDA graphs captured over them stay
  valid; rows past the batch's tokens (CUDA-graph padding) hold slot -1, and a batch without adapter
  tokens has empty segments: neither gets a delta nor is counted.
- `GatedSlots`, per layer: per slot and slice the threshold, the Gram matrix, whether the slot's
  adapter covers the slice and, for DoRA, the per-row scale (`PackedLoRA`), set when an adapter takes
  a slot, and for the Triton path
  the pointer tables of vLLM's weight buffers (`LoRAWeights`), built once when the layer's buffers are
  created, never inside a forward.

`GatedSlots.apply` adds the gated delta: the Triton kernels on CUDA, the PyTorch path on CPU. Both
are device-only (no host synchronisation, no Python branch on data), so vLLM's compilation traces
them into the model's graph. Telemetry counters are only ever incremented here
(`tspeft_rt.serve.telemetry`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tspeft_rt.kernels.gated_lora import PackedLoRA, Shards, dora_scale, gated_lora, lora_segments
from tspeft_rt.kernels.gated_lora_cpu import cpu_op_loaded, gated_lora_cpu
from tspeft_rt.kernels.triton_gated_lora import LoRAWeights, gated_lora_triton, packed_gate_views


class SlotBatch:
    """Per-batch token -> adapter slot metadata, for up to `max_tokens` tokens and `max_loras` slots."""

    def __init__(self, max_tokens: int, max_loras: int, device: torch.device | str) -> None:
        self.max_loras = max_loras
        self.slots = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        self.sorted_idx = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        self.counts = torch.zeros(max_loras, dtype=torch.int32, device=device)
        self.starts = torch.zeros(max_loras, dtype=torch.int32, device=device)

    def update(self, token_slots: Tensor) -> None:
        """Take the batch's per-token slots [n] (-1: no adapter); rows from n on become -1."""
        n = token_slots.numel()
        if n > self.slots.numel():
            raise ValueError(f"tspeft-rt: a batch of {n} tokens exceeds the {self.slots.numel()} the "
                             "gated layers were sized for")
        self.slots.fill_(-1)
        self.slots[:n].copy_(token_slots)
        sorted_idx, counts, starts = lora_segments(self.slots[:n], self.max_loras)
        self.sorted_idx[:n].copy_(sorted_idx)
        self.counts.copy_(counts)
        self.starts.copy_(starts)

    def segments(self) -> tuple[Tensor, Tensor, Tensor]:
        """(sorted_idx, counts, starts) for the Triton kernels (`lora_segments`)."""
        return self.sorted_idx, self.counts, self.starts


class GatedSlots:
    """A gated layer's per-slot state over vLLM's stacked buffers lora_a[s] [L, 1, r, in] and
    lora_b[s] [L, 1, N_s, r]. `use_triton`: the Triton kernels (default on CUDA at one device; the
    tests also run them on CPU under the interpreter). `use_cpu_op`: the C++ op (`gated_lora_cpu`: one
    call per layer, each token's own slot only, off tokens skip the expand; default on CPU for LoRA
    layers on one device, where it can be built), else the PyTorch path. `dora`: the layer keeps
    DoRA's per-slot scale (`bias`: the bias its base output includes). A tensor-parallel layer
    (`shards`) runs the PyTorch path on any device: the kernels fuse the decision into the expand, with
    no room for the all-reduce between the norms and the expand."""

    def __init__(self, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], output_slices: Sequence[int],
                 use_triton: bool | None = None, shards: Shards | None = None, dora: bool = False,
                 bias: Tensor | None = None, use_cpu_op: bool | None = None) -> None:
        device = lora_a[0].device
        self.shards = shards
        self.use_triton = (device.type == "cuda" and shards is None) if use_triton is None else use_triton
        if self.use_triton and shards is not None:
            raise ValueError("tspeft-rt: the Triton kernels do not take tensor-parallel shards")
        cpu_op_fits = device.type == "cpu" and not self.use_triton and shards is None and not dora
        if use_cpu_op and not cpu_op_fits:
            raise ValueError("tspeft-rt: the CPU op serves LoRA layers on one CPU device only")
        self.use_cpu_op = cpu_op_fits and cpu_op_loaded() if use_cpu_op is None else use_cpu_op
        self.lora_a, self.lora_b = list(lora_a), list(lora_b)
        self.num_slices = len(output_slices)
        max_loras, rank, in_features = lora_a[0].shape[0], lora_a[0].shape[-2], lora_a[0].shape[-1]
        self.packed = PackedLoRA(max_loras, rank, in_features, output_slices, lora_a[0].dtype, device,
                                 pack_weights=not self.use_triton, dora=dora, bias=bias,
                                 counted=None if shards is None else shards.counted)
        if self.use_triton:
            self.weights = LoRAWeights.from_buffers(lora_a, lora_b, output_slices)
            self.grams, self.taus = packed_gate_views(self.packed.gram, self.packed.tau)

    def set_slot(self, index: int, covered: Sequence[bool]) -> None:
        """Slot `index` of vLLM's buffers now holds an adapter with weights for the `covered` slices:
        its Gram matrices (and packed copy)."""
        self.packed.set_slot(index, [a[index, 0] for a in self.lora_a], [b[index, 0] for b in self.lora_b], covered)

    def reset_slot(self, index: int) -> None:
        self.packed.reset_slot(index)

    def set_dora(self, index: int, magnitudes: Sequence[Tensor | None], w0_sq: Tensor,
                 base_forward: Callable[[Tensor], Tensor]) -> None:
        """Slot `index` holds a DoRA adapter with these per-slice magnitude vectors (None: a slice it has
        no weights for): its scale (`dora_scale`) from the base weight's squared row norms `w0_sq`
        [sum N] and `base_forward` (x -> W0 x, no bias), applied to the slot's A of every slice at once."""
        a = [a_s[index, 0] for a_s in self.lora_a]
        w0_a = base_forward(torch.cat(a))  # [S*r, sum N]: row block s is W0 A_s^T, transposed
        r, offsets = a[0].shape[0], self.packed.offsets
        per_slice = [w0_a[s * r:(s + 1) * r, offsets[s]:offsets[s + 1]].T for s in range(self.num_slices)]
        self.packed.set_scale(index, dora_scale(w0_sq, per_slice, a, [b[index, 0] for b in self.lora_b],
                                                magnitudes))

    def set_gate(self, index: int, taus: Sequence[float | None]) -> None:
        """Thresholds of slot `index`, one per slice in slice order; None = no gate (plain LoRA)."""
        if len(taus) != self.num_slices:
            raise ValueError(f"tspeft-rt: {len(taus)} thresholds for a layer of {self.num_slices} slices")
        self.packed.set_gate(index, taus)

    def apply(self, x: Tensor, output: Tensor, batch: SlotBatch, counters: Tensor | None) -> None:
        """output [T, sum N] += the gated delta of each token's slot (T may exceed the batch: padding);
        `counters`: the telemetry's, or None on a rank whose decisions another rank counts."""
        if self.use_triton:
            gated_lora_triton(output, x, self.weights, self.grams, self.taus, batch.segments(), counters,
                              self.packed.scale, self.packed.bias)
        elif self.use_cpu_op:
            gated_lora_cpu(output, x, self.packed, batch.slots, counters)
        else:
            gated_lora(output, x, self.packed, batch.slots, counters, self.shards)
