"""Gated multi-LoRA for serving, in PyTorch: the CPU path of the vLLM plugin and the kernels' oracle.

A batch of T tokens, each mapped to an adapter slot (`slots[t]`, -1 = no adapter). A layer has S
output slices (q, k, v of a fused qkv projection; gate, up of gate_up; one for the others), and per
slot and slice a LoRA pair A_s [r, in], B_s [N_s, r] (the scaling folded into B, as vLLM stores it),
a threshold tau_s and the Gram matrix G_s = B_s^T B_s. With `base = W0 x + b` already in `output`:

    h_s   = A_s[slot] x                               shrink: every token with an adapter
    d2_s  = h_s^T G_s[slot] h_s   (= ||B_s h_s||^2)   O(r^2) per token, no expand needed
    b2_s  = ||output[:, slice s]||^2                  fp32
    on_s  = slot >= 0  and  d2_s >= tau_s^2 max(b2_s, eps^2)      (as tspeft_rt.gate.gate_keep)
    output[on_s, slice s] += B_s[slot] h_s                        expand: kept tokens only

tau = 0 keeps every token (plain LoRA); tokens without an adapter never get a delta. A slice the
slot's adapter has no weights for (k of a q,v adapter; a module pruned at export) has tau =
`UNCOVERED`: its tokens are neither gated, expanded nor counted as routed updates.

On CPU the cost is mostly per-op overhead, so the slices are packed per slot (`PackedLoRA`): one
shrink for all slices ([S*r, in]), one block-diagonal Gram product for all gates, and tokens are
grouped by slot so each group runs matmuls against its slot's weights instead of gathering a weight
matrix per token (what vLLM's CPU ops do). Groups of at least `COMPACT_MIN_TOKENS` (prefill)
expand slice by slice: a slice that keeps few rows gathers and expands only those, others mask the
off rows in an in-place matmul over all rows (cheaper on CPU than gathering, `COMPACT_BELOW_KEEP`).
Smaller groups (decode steps) expand through the block-diagonal B in one masked matmul, since there
the per-op overhead outweighs any saved multiply-adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tspeft_rt.gate import gate_thresholds, keep_from_thresholds, row_sq_norm

UNCOVERED = -1.0
"""tau of a slice the slot's adapter does not cover (the method's thresholds are >= 0)."""
COMPACT_MIN_TOKENS = 64
"""Token groups this large expand slice by slice; smaller ones in one masked matmul (module docstring)."""
COMPACT_BELOW_KEEP = 0.15
"""A slice keeping fewer than this fraction of its group's rows gathers them and expands those only.
Measured on the 2-core EPYC (2048 tokens, rank 8): gathering plus `index_add_` cost 3.5x a masked
in-place `addmm_` over all rows at 50 % kept, so the gather pays only below about 15 %."""


@dataclass(frozen=True)
class SlotGroup:
    """The rows of one adapter slot in the batch: `rows` is a slice when the slot covers them all."""

    slot: int
    rows: Tensor | slice
    count: int


def group_by_slot(slots: Tensor) -> list[SlotGroup]:
    """Split token rows by adapter slot, dropping slot -1 (no adapter)."""
    present = torch.unique(slots).tolist()
    if len(present) == 1:
        return [SlotGroup(present[0], slice(0, slots.numel()), slots.numel())] if present[0] >= 0 else []
    groups = []
    for slot in present:
        if slot >= 0:
            rows = (slots == slot).nonzero().squeeze(1)
            groups.append(SlotGroup(slot, rows, rows.numel()))
    return groups


def lora_segments(slots: Tensor, max_loras: int) -> tuple[Tensor, Tensor, Tensor]:
    """(sorted_idx [T], counts [L], starts [L]), all int32, from per-token slots in [-1, L) (-1 = no
    adapter): the device-side grouping the Triton kernels read.

    sorted_idx is the stable argsort of the slots; slot l's tokens are
    sorted_idx[starts[l] : starts[l] + counts[l]]. Device ops only (no bincount: it syncs on CUDA).
    """
    slots = slots.long()
    sorted_idx = torch.argsort(slots, stable=True).to(torch.int32)
    counts = torch.zeros(max_loras + 1, dtype=torch.int32, device=slots.device)
    counts.scatter_add_(0, slots + 1, torch.ones_like(slots, dtype=torch.int32))
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts  # slot -1 sorts first: index 0
    return sorted_idx, counts[1:], starts[1:]


class PackedLoRA:
    """Every slot's LoRA of one layer, slices packed: A [L, S*r, in], block-diagonal B [L, sum N, S*r]
    and Gram [L, S*r, S*r] (fp32), tau [L, S] (fp32; `UNCOVERED` where the slot's adapter has no
    weights), which slices each slot covers and whether it runs the gate. Without `pack_weights`
    (the Triton path, which reads vLLM's own buffers) only the gate state is kept."""

    def __init__(self, max_loras: int, rank: int, in_features: int, output_slices: Sequence[int],
                 dtype: torch.dtype, device: torch.device | str, pack_weights: bool = True) -> None:
        s, n = len(output_slices), sum(output_slices)
        self.rank, self.output_slices = rank, tuple(output_slices)
        self.offsets = [sum(output_slices[:i]) for i in range(s + 1)]
        self.a = torch.zeros(max_loras, s * rank, in_features, dtype=dtype, device=device) if pack_weights else None
        self.b = torch.zeros(max_loras, n, s * rank, dtype=dtype, device=device) if pack_weights else None
        self.gram = torch.zeros(max_loras, s * rank, s * rank, dtype=torch.float32, device=device)
        self.tau = torch.full((max_loras, s), UNCOVERED, dtype=torch.float32, device=device)
        self.tau_sq, self.floor = gate_thresholds(self.tau)  # what the gate compares against
        self.covered = torch.zeros(max_loras, s, dtype=torch.bool, device=device)
        self.covered_slices = [0] * max_loras  # host copy of covered.sum(1)
        self.gated = [False] * max_loras

    def set_slot(self, slot: int, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
                 covered: Sequence[bool] | None = None) -> None:
        """Copy one slot's per-slice A_s [r, in] and B_s [N_s, r] (zero-padded to the rank); `covered`:
        the slices the adapter has weights for (default: all)."""
        self.reset_slot(slot)
        covered = [True] * len(self.output_slices) if covered is None else list(covered)
        self.covered[slot] = torch.tensor(covered)
        self.covered_slices[slot] = sum(covered)
        self.set_gate(slot, [None] * len(covered))  # plain LoRA on the covered slices until a gate is set
        r = self.rank
        for s, (a, b) in enumerate(zip(lora_a, lora_b)):
            cols = slice(s * r, (s + 1) * r)
            if self.a is not None:
                self.a[slot, cols] = a
                self.b[slot, self.offsets[s]:self.offsets[s + 1], cols] = b
            self.gram[slot, cols, cols] = gram(b)

    def reset_slot(self, slot: int) -> None:
        if self.a is not None:
            self.a[slot] = 0
            self.b[slot] = 0
        self.gram[slot] = 0
        self.covered[slot] = False
        self.covered_slices[slot] = 0
        self.set_gate(slot, [None] * len(self.output_slices))

    def set_gate(self, slot: int, taus: Sequence[float | None]) -> None:
        """Thresholds of one slot, one per slice; None = no gate (plain LoRA, tau 0). Slices the slot
        does not cover stay `UNCOVERED`."""
        covered = self.covered[slot].tolist()
        self.tau[slot] = torch.tensor([(0.0 if t is None else t) if c else UNCOVERED for t, c in zip(taus, covered)])
        self.tau_sq[slot], self.floor[slot] = gate_thresholds(self.tau[slot])
        self.gated[slot] = any(t is not None and c for t, c in zip(taus, covered))


def gram(lora_b: Tensor) -> Tensor:
    """G = B^T B in fp32 for B [..., N, r]."""
    b = lora_b.float()
    return b.transpose(-1, -2) @ b


def gated_lora(output: Tensor, x: Tensor, packed: PackedLoRA,
               groups: Sequence[SlotGroup]) -> list[tuple[int, int]]:
    """Add the gated LoRA delta to `output` [T, sum N] in place; returns the (routed, kept) (token,
    slice) updates of each group (routed: the slices its slot covers)."""
    counts = []
    for group in groups:
        slot, rows, covered = group.slot, group.rows, packed.covered_slices[group.slot]
        if covered == 0:  # the adapter has no weights in this layer (pruned, or not targeted)
            counts.append((0, 0))
            continue
        h = x[rows].to(packed.a.dtype) @ packed.a[slot].T  # [Tg, S*r]
        on = slot_gate(h, output[rows], packed, slot) if packed.gated[slot] else None  # [Tg, S]
        if covered < len(packed.output_slices):
            on = packed.covered[slot].expand(group.count, -1) if on is None else on & packed.covered[slot]
        per_slice = [group.count] * len(packed.output_slices) if on is None else on.sum(0).tolist()
        counts.append((group.count * covered, sum(per_slice)))
        if group.count >= COMPACT_MIN_TOKENS:
            _expand_by_slice(output, h, on, per_slice, packed, group)
        else:
            if on is not None:
                h = (h.unflatten(1, (-1, packed.rank)) * on.unsqueeze(-1)).flatten(1)
            output[rows] += (h @ packed.b[slot].T).to(output.dtype)
    return counts


def slot_gate(h: Tensor, base: Tensor, packed: PackedLoRA, slot: int) -> Tensor:
    """on [Tg, S]: ||B_s h_s||^2 from the block-diagonal Gram matrix against tau_s^2 ||base_s||^2."""
    hf = h.float()
    delta_sq = ((hf @ packed.gram[slot]) * hf).unflatten(1, (-1, packed.rank)).sum(-1)
    base_sq = torch.stack([row_sq_norm(base[:, lo:hi]) for lo, hi in zip(packed.offsets, packed.offsets[1:])], dim=1)
    return keep_from_thresholds(delta_sq, base_sq, packed.tau_sq[slot], packed.floor[slot])


def _expand_by_slice(output: Tensor, h: Tensor, on: Tensor | None, per_slice: list[int], packed: PackedLoRA,
                     group: SlotGroup) -> None:
    """Slice by slice (no multiply-adds on the zero blocks of B): a slice that keeps few rows expands
    those rows only; one that keeps many masks the others (cheaper on CPU than the row gather)."""
    r = packed.rank
    for s, (lo, hi) in enumerate(zip(packed.offsets, packed.offsets[1:])):
        if per_slice[s] == 0:
            continue
        h_s, rows = h[:, s * r:(s + 1) * r], group.rows
        if per_slice[s] < COMPACT_BELOW_KEEP * group.count:
            keep = on[:, s].nonzero().squeeze(1)
            h_s, rows = h_s[keep], keep if isinstance(rows, slice) else rows[keep]
        elif per_slice[s] < group.count:
            h_s = h_s * on[:, s:s + 1]
        b = packed.b[group.slot, lo:hi, s * r:(s + 1) * r]
        if isinstance(rows, slice) and h_s.dtype == output.dtype:
            output[rows, lo:hi].addmm_(h_s, b.T)  # contiguous rows: the add fused into the matmul
        else:
            output[:, lo:hi].index_add_(0, rows, (h_s @ b.T).to(output.dtype))
