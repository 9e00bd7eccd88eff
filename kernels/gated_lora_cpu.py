"""The CPU serving path of gated LoRA in one op per layer call: `tspeft::gated_lora_cpu`.

The PyTorch path (`tspeft_rt.kernels.gated_lora.gated_lora`) traced into vLLM's Inductor graph runs as
~8 kernels per layer call (two matmuls for every slot, a Gram product, fused loops, an add and a copy),
each called from the graph's Python wrapper. In a decode step that overhead, not arithmetic, is the
cost (a 135M model's step makes 120 such calls of 16 tokens). This op does a layer call in one C++
function (`gated_lora_cpu.cpp`): per token, only its own slot's shrink, the decision from the Gram
form, and the expand of the slices that are on; off tokens skip the expand. Above `LOOP_TOKENS` tokens
(prefill) the shrink is one matmul for all tokens; the decisions and the expand stay per token.

The decisions are the PyTorch path's (h rounded to the model dtype, squared norms and thresholds in
fp32), up to the order of summation; tests/test_kernels_cpu.py and tests/test_serve_layers.py check
them token by token. LoRA slots on one device only: DoRA and tensor-parallel layers keep the PyTorch
path.

The op is compiled on first use with the C++ compiler Inductor uses (`torch.utils.cpp_extension`,
cached under TORCH_EXTENSIONS_DIR, ~35 s once per machine and source); built for the host CPU
(-march=native), so the build's name carries a fingerprint of the CPU's model and flags.
"""

from __future__ import annotations

import hashlib
import platform
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from tspeft_rt.gate import EPS
from tspeft_rt.kernels.gated_lora import PackedLoRA

LOOP_TOKENS = 64
"""Up to this many tokens a layer call's shrink loops over each token's own slot; above it, one matmul."""


def _cpu_fingerprint() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha1("\n".join([platform.machine(), *wanted]).encode()).hexdigest()[:10]


@cache
def load_op() -> None:
    """Register `torch.ops.tspeft.gated_lora_cpu` (the library built once per machine and source, then
    loaded from the cache) and its shape function for tracing."""
    from torch.utils.cpp_extension import load

    load(name=f"tspeft_gated_lora_cpu_{_cpu_fingerprint()}",
         sources=[str(Path(__file__).with_name("gated_lora_cpu.cpp"))],
         extra_cflags=["-O3", "-march=native", "-fopenmp"], is_python_module=False, verbose=False)

    @torch.library.register_fake("tspeft::gated_lora_cpu")
    def _(*args) -> None:
        return None


@cache
def cpu_op_loaded() -> bool:
    """Whether the op is registered: built or loaded now if needed; False, with a warning, where it cannot
    be built (no C++ compiler), so that the caller serves with the PyTorch path instead."""
    try:
        load_op()
    except Exception as e:  # a compiler error, a missing toolchain
        warnings.warn(f"tspeft-rt: the CPU op gated_lora_cpu could not be built ({type(e).__name__}: "
                      f"{str(e)[-500:]}); gated layers use the PyTorch path", stacklevel=2)
        return False
    return True


def gated_lora_cpu(output: Tensor, x: Tensor, packed: PackedLoRA, slots: Tensor,
                   counters: Tensor | None = None) -> None:
    """`gated_lora` (same arguments; LoRA slots, one device) in one op: output [T, sum N] += the gated
    delta. `load_op()` must have run (outside any traced code: it is not traceable)."""
    x = x.to(packed.a.dtype)
    torch.ops.tspeft.gated_lora_cpu(
        output, x if x.stride(-1) == 1 else x.contiguous(), packed.a, packed.b_t, packed.gram, packed.tau_sq,
        packed.floor, packed.covered, packed.covered_count, slots,
        output.new_zeros(0, 0, dtype=torch.int64) if counters is None else counters, packed.offsets, packed.rank,
        EPS * EPS, LOOP_TOKENS)
