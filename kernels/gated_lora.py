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

tau = 0 keeps every token (plain LoRA); tokens without an adapter never get a delta.

On CPU the cost is mostly per-op overhead, so the slices are packed per slot (`PackedLoRA`): one
shrink for all slices ([S*r, in]), one block-diagonal Gram product for all gates, and tokens are
grouped by slot so each group runs matmuls against its slot's weights instead of gathering a weight
matrix per token (what vLLM's CPU ops do). Groups of at least `COMPACT_MIN_TOKENS` expand only their
kept rows, slice by slice; smaller groups (decode steps) expand through the block-diagonal B with
off rows masked, since there the per-op overhead outweighs the saved multiply-adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tspeft_rt.gate import gate_thresholds, keep_from_thresholds

COMPACT_MIN_TOKENS = 64
"""Token groups this large expand only their kept rows; smaller ones mask (see the module docstring)."""


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
        return [SlotGroup(present[0], slice(None), slots.numel())] if present[0] >= 0 else []
    groups = []
    for slot in present:
        if slot >= 0:
            rows = (slots == slot).nonzero().squeeze(1)
            groups.append(SlotGroup(slot, rows, rows.numel()))
    return groups


class PackedLoRA:
    """Every slot's LoRA of one layer, slices packed: A [L, S*r, in], block-diagonal B [L, sum N, S*r]
    and Gram [L, S*r, S*r] (fp32), tau [L, S] (fp32), and whether each slot runs the gate."""

    def __init__(self, max_loras: int, rank: int, in_features: int, output_slices: Sequence[int],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        s, n = len(output_slices), sum(output_slices)
        self.rank, self.output_slices = rank, tuple(output_slices)
        self.offsets = [sum(output_slices[:i]) for i in range(s + 1)]
        self.a = torch.zeros(max_loras, s * rank, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, n, s * rank, dtype=dtype, device=device)
        self.gram = torch.zeros(max_loras, s * rank, s * rank, dtype=torch.float32, device=device)
        self.tau = torch.zeros(max_loras, s, dtype=torch.float32, device=device)
        self.tau_sq, self.floor = gate_thresholds(self.tau)  # what the gate compares against
        self.gated = [False] * max_loras
        # column -> slice one-hot: the per-slice squared norms of the base output in one matmul
        self.slice_of_column = torch.zeros(n, s, dtype=torch.float32, device=device)
        for i in range(s):
            self.slice_of_column[self.offsets[i]:self.offsets[i + 1], i] = 1

    def set_slot(self, slot: int, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor]) -> None:
        """Copy one slot's per-slice A_s [r, in] and B_s [N_s, r] (zero-padded to the rank)."""
        self.reset_slot(slot)
        r = self.rank
        for s, (a, b) in enumerate(zip(lora_a, lora_b)):
            cols = slice(s * r, (s + 1) * r)
            self.a[slot, cols] = a
            self.b[slot, self.offsets[s]:self.offsets[s + 1], cols] = b
            self.gram[slot, cols, cols] = gram(b)

    def reset_slot(self, slot: int) -> None:
        self.a[slot] = 0
        self.b[slot] = 0
        self.gram[slot] = 0
        self.set_gate(slot, [None] * len(self.output_slices))

    def set_gate(self, slot: int, taus: Sequence[float | None]) -> None:
        """Thresholds of one slot, one per slice; None = no gate (plain LoRA, tau 0)."""
        self.tau[slot] = torch.tensor([0.0 if t is None else t for t in taus])
        self.tau_sq[slot], self.floor[slot] = gate_thresholds(self.tau[slot])
        self.gated[slot] = any(t is not None for t in taus)


def gram(lora_b: Tensor) -> Tensor:
    """G = B^T B in fp32 for B [..., N, r]."""
    b = lora_b.float()
    return b.transpose(-1, -2) @ b


def gated_lora(output: Tensor, x: Tensor, packed: PackedLoRA, groups: Sequence[SlotGroup]) -> list[int]:
    """Add the gated LoRA delta to `output` [T, sum N] in place; returns the kept (token, slice)
    updates of each group."""
    kept = []
    for group in groups:
        slot, rows = group.slot, group.rows
        h = x[rows].to(packed.a.dtype) @ packed.a[slot].T  # [Tg, S*r]
        if not packed.gated[slot]:
            output[rows] += (h @ packed.b[slot].T).to(output.dtype)
            kept.append(group.count * len(packed.output_slices))
            continue
        on = slot_gate(h, output[rows], packed, slot)  # [Tg, S]
        kept.append(int(on.sum()))
        if group.count >= COMPACT_MIN_TOKENS:
            _expand_kept_rows(output, h, on, packed, group)
        else:
            masked = (h.unflatten(1, (-1, packed.rank)) * on.unsqueeze(-1)).flatten(1)
            output[rows] += (masked @ packed.b[slot].T).to(output.dtype)
    return kept


def slot_gate(h: Tensor, base: Tensor, packed: PackedLoRA, slot: int) -> Tensor:
    """on [Tg, S]: ||B_s h_s||^2 from the block-diagonal Gram matrix against tau_s^2 ||base_s||^2."""
    hf = h.float()
    delta_sq = ((hf @ packed.gram[slot]) * hf).unflatten(1, (-1, packed.rank)).sum(-1)
    base_sq = base.float().square() @ packed.slice_of_column
    return keep_from_thresholds(delta_sq, base_sq, packed.tau_sq[slot], packed.floor[slot])


def _expand_kept_rows(output: Tensor, h: Tensor, on: Tensor, packed: PackedLoRA, group: SlotGroup) -> None:
    r = packed.rank
    for s in range(len(packed.output_slices)):
        keep = on[:, s].nonzero().squeeze(1)
        if keep.numel() == 0:
            continue
        lo, hi = packed.offsets[s], packed.offsets[s + 1]
        delta = h[keep, s * r:(s + 1) * r] @ packed.b[group.slot, lo:hi, s * r:(s + 1) * r].T
        rows = keep if isinstance(group.rows, slice) else group.rows[keep]
        output[:, lo:hi].index_add_(0, rows, delta.to(output.dtype))
