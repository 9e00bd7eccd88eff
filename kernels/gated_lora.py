"""Gated multi-LoRA for serving, in PyTorch: the CPU path of the vLLM plugin and the kernels' oracle.

A batch of T tokens, each mapped to an adapter slot (`slots[t]`, -1 = no adapter). A layer has S
output slices (q, k, v of a fused qkv projection; gate, up of gate_up; one for the others), and per
slot l and slice s a LoRA pair A_s[l] [r, in], B_s[l] [N_s, r] (the scaling folded into B, as vLLM
stores it) and a threshold tau_s[l]. With `base = W0 x + b` already in `output`:

    h       = A[slot] x                    every slot's shrink at once, then each token keeps its own slot's
    on_s    = slot >= 0  and  ||m_s||^2 >= max(tau_s^2 max(||base_s||^2, eps^2), floor)   fp32, as
              tspeft_rt.gate.gate_keep decides in training, with ||m_s||^2 = ||B_s h_s||^2 = h_s^T G_s h_s
              from the slot's Gram matrix G_s = B_s^T B_s (fp32): the decision needs no delta
    output[:, slice s] += B_s[slot] (on_s * h_s)       one expand, the off tokens' shrink zeroed

For a DoRA adapter the delta is DoRA's output minus the base's, with c_s[slot] = mag / ||W0 + B A||_row
per output row of the slice (a constant once the adapter takes its slot; `dora_scale`):

    m_s     = (c_s[slot] - 1) * (W0 x)_s + c_s[slot] * B_s[slot] h_s        (W0 x = base minus the bias)

and the gate reads the norm of that delta, as TS-DoRA does in training (the delta is built first, then
masked: its norm has no Gram form). A layer built with `dora` holds
c for every slot (1 for LoRA slots and slices without a magnitude, which leaves their delta exact).

tau = 0 keeps every token (plain LoRA); tokens without an adapter never get a delta. A slice the
slot's adapter has no weights for (k of a q,v adapter; a module pruned at export) has tau =
`UNCOVERED`: its tokens are neither gated, expanded nor counted as routed updates.

Under tensor parallelism a rank holds part of a layer, and `Shards` completes what the gate reads
with an all-reduce: the shrink h of a row-parallel layer (a partial sum over its share of the inputs;
`output` already all-reduced), or ||m_s||^2 and ||base_s||^2 of a column-parallel one (partial sums
over its share of the outputs: its Gram matrices are those of its rows of B). Every rank then takes the
decision one device takes.

The path is written for vLLM's Inductor compilation: a fixed sequence of tensor ops whose shapes
depend only on T and the layer, with no host synchronisation and no Python branch on data or on which
adapters are loaded, so vLLM traces it once into the model's graph. The price of that shape is
arithmetic: every token runs every slot's shrink and expand ([T, in] x [in, L*S*r] and
[T, L*S*r] x [L*S*r, N], the other slots' blocks of h zeroed) and off tokens are masked, not skipped;
and in a decode step its ~8 kernels per layer call cost more in call overhead than in arithmetic. So
on CPU a LoRA layer on one device runs `tspeft_rt.kernels.gated_lora_cpu` instead (the same decisions in
one C++ op per call, each token's own slot only, off tokens skipping the expand); this path serves DoRA
slots, tensor-parallel layers and CPUs where that op cannot be built, and is the oracle of both the op
and the Triton kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tspeft_rt.gate import gate_thresholds, keep_from_thresholds, row_sq_norm

UNCOVERED = -1.0
"""tau of a slice the slot's adapter does not cover (the method's thresholds are >= 0)."""


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
    """Every slot's LoRA of one layer, slots and slices packed side by side: A [L*S*r, in] and the
    block-diagonal B stored transposed, b_t [L*S*r, sum N] (row block l*S + s holds B_s[l]^T), the gate
    state per slot and slice: tau [L, S] fp32 (`UNCOVERED` where the slot's adapter has no weights),
    tau^2 and floor, which slices each slot covers, and the Gram matrices [L, S*r, S*r] fp32 the gate
    decides with (every path).
    Without `pack_weights` (the Triton path, which reads vLLM's own buffers) the weights are not copied.
    With `dora`: the DoRA scale c [L, sum N] fp32 per slot (ones: LoRA) and the `bias` the base output
    includes (None: no bias), to recover W0 x. `counted` [sum N] (1/0, `Shards.counted`): the output rows
    the Gram matrices sum over (None: all). Every tensor is allocated once and updated in place, so a
    graph traced over them stays valid."""

    def __init__(self, max_loras: int, rank: int, in_features: int, output_slices: Sequence[int],
                 dtype: torch.dtype, device: torch.device | str, pack_weights: bool = True, dora: bool = False,
                 bias: Tensor | None = None, counted: Tensor | None = None) -> None:
        s, n = len(output_slices), sum(output_slices)
        self.max_loras, self.rank, self.output_slices = max_loras, rank, tuple(output_slices)
        self.offsets = [sum(output_slices[:i]) for i in range(s + 1)]
        self.a = torch.zeros(max_loras * s * rank, in_features, dtype=dtype, device=device) if pack_weights else None
        self.b_t = torch.zeros(max_loras * s * rank, n, dtype=dtype, device=device) if pack_weights else None
        self.gram = torch.zeros(max_loras, s * rank, s * rank, dtype=torch.float32, device=device)
        self.tau = torch.full((max_loras, s), UNCOVERED, dtype=torch.float32, device=device)
        self.tau_sq, self.floor = gate_thresholds(self.tau)  # what the gate compares against
        self.covered = torch.zeros(max_loras, s, dtype=torch.bool, device=device)
        self.covered_count = torch.zeros(max_loras, dtype=torch.int64, device=device)  # routed updates per token
        self.slot_ids = torch.arange(max_loras, device=device)
        self.column_slice = torch.repeat_interleave(torch.arange(s, device=device),
                                                    torch.tensor(output_slices, device=device))
        self.scale = torch.ones(max_loras, n, dtype=torch.float32, device=device) if dora else None
        self.bias = bias
        self.counted = counted

    def set_slot(self, slot: int, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
                 covered: Sequence[bool] | None = None) -> None:
        """Copy one slot's per-slice A_s [r, in] and B_s [N_s, r] (zero-padded to the rank); `covered`:
        the slices the adapter has weights for (default: all)."""
        self.reset_slot(slot)
        covered = [True] * len(self.output_slices) if covered is None else list(covered)
        self.covered[slot] = torch.tensor(covered)
        self.covered_count[slot] = sum(covered)
        self.set_gate(slot, [None] * len(covered))  # plain LoRA on the covered slices until a gate is set
        r, sr = self.rank, len(self.output_slices) * self.rank
        for s, (a, b) in enumerate(zip(lora_a, lora_b)):
            if self.a is not None:
                cols = slice(slot * sr + s * r, slot * sr + (s + 1) * r)
                self.a[cols] = a
                self.b_t[cols, self.offsets[s]:self.offsets[s + 1]] = b.T
            if self.counted is not None:
                b = b * self.counted[self.offsets[s]:self.offsets[s + 1], None].to(b.dtype)
            self.gram[slot, s * r:(s + 1) * r, s * r:(s + 1) * r] = gram(b)

    def reset_slot(self, slot: int) -> None:
        if self.a is not None:
            sr = len(self.output_slices) * self.rank
            self.a[slot * sr:(slot + 1) * sr] = 0
            self.b_t[slot * sr:(slot + 1) * sr] = 0
        self.gram[slot] = 0
        self.covered[slot] = False
        self.covered_count[slot] = 0
        if self.scale is not None:
            self.scale[slot] = 1.0
        self.set_gate(slot, [None] * len(self.output_slices))

    def set_scale(self, slot: int, scale: Tensor) -> None:
        """DoRA's c [sum N] for one slot (`dora_scale`); the layer must have been built with `dora`."""
        if self.scale is None:
            raise ValueError("tspeft-rt: this layer was built without DoRA state")
        self.scale[slot] = scale

    def set_gate(self, slot: int, taus: Sequence[float | None]) -> None:
        """Thresholds of one slot, one per slice; None = no gate (plain LoRA, tau 0). Slices the slot
        does not cover stay `UNCOVERED`."""
        covered = self.covered[slot].tolist()
        self.tau[slot] = torch.tensor([(0.0 if t is None else t) if c else UNCOVERED for t, c in zip(taus, covered)])
        self.tau_sq[slot], self.floor[slot] = gate_thresholds(self.tau[slot])


def dora_scale(w0_sq: Tensor, w0_a: Sequence[Tensor], lora_a: Sequence[Tensor], lora_b: Sequence[Tensor],
               magnitudes: Sequence[Tensor | None]) -> Tensor:
    """c [sum N] fp32 of one slot: for each slice s with a magnitude vector (B with the scaling folded in)

        c_s = mag_s / ||W0_s + B_s A_s||_row,
        ||W0 + B A||_row^2 = ||W0||_row^2 + 2 sum_j B_ij (W0 A^T)_ij + sum_jk B_ij (A A^T)_jk B_ik

    from the layer's squared row norms of W0 (`w0_sq` [sum N]) and W0 A_s^T (`w0_a[s]` [N_s, r]), which a
    serving layer gets from its base forward (vLLM on CPU keeps W0 only in a packed form); 1 elsewhere."""
    scale = torch.ones(w0_sq.shape[0], dtype=torch.float32, device=w0_sq.device)
    lo = 0
    for wa, a, b, mag in zip(w0_a, lora_a, lora_b, magnitudes):
        n = b.shape[0]
        if mag is not None:
            a, b, wa = a.double(), b.double(), wa.double()
            sq = w0_sq[lo:lo + n].double() + 2 * (b * wa).sum(1) + ((b @ (a @ a.T)) * b).sum(1)
            scale[lo:lo + n] = (mag.to(scale.device).double() / sq.sqrt()).float()
        lo += n
    return scale


def gram(lora_b: Tensor) -> Tensor:
    """G = B^T B in fp32 for B [..., N, r]."""
    b = lora_b.float()
    return b.transpose(-1, -2) @ b


def gated_lora(output: Tensor, x: Tensor, packed: PackedLoRA, slots: Tensor, counters: Tensor | None = None,
               shards: Shards | None = None) -> None:
    """Add the gated LoRA delta to `output` [T, sum N] in place, for the tokens' `slots` (the first T
    entries are read; -1 = no adapter). `counters` [2, L] int64, when given, gets each slot's routed
    (token, covered slice) and kept updates added. `shards`: how a tensor-parallel layer completes what
    its rank holds in part (None: one device)."""
    h, dora_delta, on, mine = gate_decisions(output, x, packed, slots, shards)
    if dora_delta is None:  # one expand of the kept (token, slice) pairs' shrink, each token's own slot's
        kept = h * (mine.unsqueeze(2) & on.unsqueeze(1)).unsqueeze(3)
        output += (kept.flatten(1) @ packed.b_t).to(output.dtype)
    else:
        output += (dora_delta * on[:, packed.column_slice]).to(output.dtype)
    if counters is not None:
        counters[0] += mine.sum(0) * packed.covered_count
        counters[1] += (mine * on.sum(1, keepdim=True)).sum(0)


@dataclass(frozen=True)
class Shards:
    """What a tensor-parallel rank holds in part, and the sums over the ranks that complete it, so that
    every rank takes the decision one device would (up to the rounding of the sums):

    - row-parallel layers (`sum_shrink`): x and A hold this rank's share of the input features, so the
      shrink h = A x is a partial sum; `output` is already the full, all-reduced base output;
    - column-parallel layers (`sum_norms`): `output` and B hold this rank's share of the output
      features, so the squared norms of delta and base are partial sums. `counted` [sum N] (1/0) leaves
      out the columns another rank also holds (K/V heads replicated when the ranks outnumber them)."""

    sum_shrink: Callable[[Tensor], Tensor] | None = None
    sum_norms: Callable[[Tensor], Tensor] | None = None
    counted: Tensor | None = None


def gate_decisions(output: Tensor, x: Tensor, packed: PackedLoRA, slots: Tensor,
                   shards: Shards | None = None) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(h [T, L, S, r] every slot's shrink (a token's own slot is its True in `mine`), DoRA's delta
    [T, sum N] (None on a layer without DoRA state: LoRA decides from h and the Gram matrices), on [T, S]
    the gate's decisions, mine [T, L] each token's slot as a mask) for the base output `output` (read only)."""
    t, s = x.shape[0], len(packed.output_slices)
    mine = slots[:t].unsqueeze(1) == packed.slot_ids  # one True per token with an adapter
    h = (x.to(packed.a.dtype) @ packed.a.T).view(t, packed.max_loras, s, packed.rank)
    if shards is not None and shards.sum_shrink is not None:
        h = shards.sum_shrink(h)
    slot = slots[:t].long().clamp_min(0)
    counted = None if shards is None else shards.counted
    delta = None
    if packed.scale is None:  # ||B_s h_s||^2 = h_s^T G_s h_s for every slot, then each token's own
        hf = h.float().flatten(2)
        per_slot = (torch.einsum("tli,lij->tlj", hf, packed.gram) * hf).view(t, packed.max_loras, s, -1).sum(3)
        delta_sq = (per_slot * mine.unsqueeze(2)).sum(1)
    else:  # DoRA: (c - 1) W0 x + c B A x, with c = 1 for LoRA slots
        c = packed.scale[slot]
        w0x = output if packed.bias is None else output - packed.bias
        delta = (c - 1) * w0x.float() + c * own_lora_delta(h, mine, packed).float()
        delta_sq = slice_sq_norms(delta, packed.offsets, counted)
    norms = torch.stack([delta_sq, slice_sq_norms(output, packed.offsets, counted)])
    if shards is not None and shards.sum_norms is not None:
        norms = shards.sum_norms(norms)
    on = keep_from_thresholds(norms[0], norms[1], packed.tau_sq[slot], packed.floor[slot])
    return h, delta, on & packed.covered[slot] & mine.any(1, keepdim=True), mine


def own_lora_delta(h: Tensor, mine: Tensor, packed: PackedLoRA) -> Tensor:
    """B[slot] h [T, sum N]: each token's own slot's LoRA delta, from `gate_decisions`' h and mine."""
    return (h * mine[:, :, None, None]).flatten(1) @ packed.b_t


def slice_sq_norms(t: Tensor, offsets: Sequence[int], counted: Tensor | None = None) -> Tensor:
    """[T, S] fp32: each row's squared norm over each slice's columns (only the `counted` ones)."""
    if counted is not None:
        t = t * counted
    return torch.stack([row_sq_norm(t[:, lo:hi]) for lo, hi in zip(offsets, offsets[1:])], dim=1)
