"""Registers, spills and shared memory of the Triton serving kernels, compiled ahead of time (no GPU).

    python tools/kernel_report.py                      # every shape: ~100 s on 2 cores (cold Triton cache)
    python tools/kernel_report.py --quick              # the CI subset: ~30-45 s cold, ~7 s warm
    python tools/kernel_report.py --quick --json rows.json --no-spills-up-to 128   # tests/test_kernels_compile.py

From the repo root, installed or not (`tools/repo.py`). For each shape it
builds the launches exactly as the runtime does (`shrink_launch`, `gated_expand_launches` of
tspeft_rt.kernels.triton_gated_lora, on never-touched CPU tensors; the dot mode is the one a CUDA
device gets), binds them with each kernel's own JIT binder for the target, compiles with
`triton.compile` for sm_90a and sm_80, and runs ptxas -v (the one Triton uses, with its flags) on
the PTX. Launches that share a specialisation (several token counts often do) are compiled once.

Columns: the Triton kernel; its mode (the gated expand runs fused, gate+expand, or as a gate launch
and then an expand launch); the shape; BLOCK_M/N/R/K and warps; ptxas registers and spill bytes;
Triton's shared memory (bytes).

Shapes: slices qkv [4096, 1024, 1024], o [4096], gate_up [14336, 14336]; hidden 4096 (8192 for qkv
and gate_up); ranks 16 and 64; tokens 1, 16, 64, 128, 1024, 8192; 4 slots; fp16 and bf16.
--quick: qkv at hidden 4096, tokens 1..128 and 8192, ranks 16 and 64, fp16 and bf16. DoRA (the expand
with a scale and a bias, mode "+dora"): bf16 qkv at rank 16 and 64, in the quick subset at tokens 16
and 8192.

Exit code 1 if a compile fails, or (--no-spills-up-to T) if a launch with at most T tokens spills.
TRITON_INTERPRET is dropped from the environment first: the interpreter cannot compile.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # read once, when triton is first imported
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated: silences its warning

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from repo import import_repo  # tools/repo.py, beside this script

TARGETS = {"sm_90a": 90, "sm_80": 80}
SLICES = {"qkv": [4096, 1024, 1024], "o": [4096], "gate_up": [14336, 14336]}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOKENS = [1, 16, 64, 128, 1024, 8192]
MAX_LORAS = 4


@dataclass(frozen=True)
class Case:
    dtype: str
    tokens: int
    rank: int
    slices: str
    hidden: int
    dora: bool = False


@dataclass
class Row:
    kernel: str
    mode: str  # the gated expand's GATE/EXPAND: fused (gate+expand), or one of the two launches; +dora
    target: str
    dtype: str
    tokens: int
    rank: int
    slices: str
    hidden: int
    block_m: int
    block_n: int | None
    block_r: int
    block_k: int | None
    num_warps: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)

    @property
    def label(self) -> str:
        return (f"{self.kernel} ({self.mode}) {self.target} {self.dtype} T={self.tokens} rank={self.rank} "
                f"{self.slices} K={self.hidden}")


def cases(quick: bool) -> list[Case]:
    dora_tokens = (16, 8192) if quick else TOKENS
    dora = [Case("bf16", t, r, "qkv", 4096, dora=True) for r in (16, 64) for t in dora_tokens]
    if quick:
        return [Case(d, t, r, "qkv", 4096) for d in DTYPES for r in (16, 64) for t in (*TOKENS[:4], 8192)] + dora
    layers = [(s, 4096) for s in SLICES] + [("qkv", 8192), ("gate_up", 8192)]
    return [Case(d, t, r, s, k) for d in DTYPES for s, k in layers for r in (16, 64) for t in TOKENS] + dora


def launches(case: Case) -> list:
    """The launches of one shape (the shrink, then the gate and expand: one or two), as the runtime
    builds them on a CUDA device."""
    from tspeft_rt.kernels import triton_gated_lora as tg

    dtype, T, R, L, slices = DTYPES[case.dtype], case.tokens, case.rank, MAX_LORAS, SLICES[case.slices]
    S = len(slices)
    lora_a = [torch.empty(L, 1, R, case.hidden, dtype=dtype) for _ in slices]
    lora_b = [torch.empty(L, 1, n, R, dtype=dtype) for n in slices]
    weights = tg.LoRAWeights.from_buffers(lora_a, lora_b, slices)
    grams, taus = tg.packed_gate_views(torch.empty(L, S * R, S * R), torch.empty(L, S))
    x, output = torch.empty(T, case.hidden, dtype=dtype), torch.empty(T, sum(slices), dtype=dtype)
    h = torch.empty(S, T, R)
    segments = (torch.empty(T, dtype=torch.int32), torch.empty(L, dtype=torch.int32), torch.empty(L, dtype=torch.int32))
    counters = torch.empty(2, L, dtype=torch.int64)
    scale, bias = (torch.empty(L, sum(slices)), torch.empty(sum(slices), dtype=dtype)) if case.dora else (None, None)
    # On CPU tensors dot_mode picks the interpreter's fp32 dots; the report is for a CUDA device.
    upcast, precision = tg.dot_mode(SimpleNamespace(device=torch.device("cuda"), dtype=dtype))
    runtime = (tg.shrink_launch(h, x, weights.lora_a, weights.a_table, taus, *segments),
               *tg.gated_expand_launches(output, h, weights.lora_b, weights.b_table, grams, taus, *segments, slices,
                                         counters, None, scale, bias))
    return [replace(launch, meta={**launch.meta, "UPCAST": upcast, "PRECISION": precision}) for launch in runtime]


class Compiler:
    """Compiles launches for the targets, once per specialisation (kernel, argument types and
    alignments, constexprs, options, target)."""

    def __init__(self) -> None:
        self.backends = {name: make_backend(GPUTarget("cuda", cap, 32)) for name, cap in TARGETS.items()}
        self.binders: dict = {}
        self.results: dict[str, dict] = {}

    def usage(self, launch, target: str) -> dict:
        """{registers, spill_stores, spill_loads, shared} or {error} of `launch` compiled for `target`."""
        kernel, backend = launch.kernel, self.backends[target]
        if (kernel, target) not in self.binders:  # JITFunction.create_binder asks the (absent) driver for its target
            self.binders[kernel, target] = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = self.binders[kernel, target](*launch.args, **launch.meta)
        key = repr((kernel.fn.__name__, target, specialization, sorted(options.items())))
        if key not in self.results:
            try:
                self.results[key] = compile_usage(kernel, backend, launch.meta, bound, specialization, options)
            except Exception as e:  # noqa: BLE001 - any compiler failure is a row of the report
                self.results[key] = {"error": summary(e)}
        return self.results[key]


def summary(e: Exception) -> str:
    """One line: Triton's errors put the source position first and the cause last, source between."""
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: " + " ... ".join(dict.fromkeys([lines[0][:200], lines[-1][:200]]))


def compile_usage(kernel, backend, meta: dict, bound: dict, specialization: list, options: dict) -> dict:
    """As JITFunction.run compiles on a cache miss, for `backend`'s target instead of the driver's."""
    opts, signature, constexprs, attrs = kernel._pack_args(backend, dict(meta), bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=backend.target,
                              options=opts.__dict__)
    return {**ptxas_usage(compiled.asm["ptx"], backend.target.arch), "shared": compiled.metadata.shared}


def ptxas_usage(ptx: str, cap: int) -> dict:
    """Registers and spill bytes from `ptxas -v`, with Triton's own ptxas flags for this target."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        cmd = [get_ptxas(cap).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(cap)}", f.name, "-o", os.devnull]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    if not (spills and registers):
        raise RuntimeError(f"unexpected ptxas -v output: {log!r}")
    return {"registers": int(registers[1]), "spill_stores": int(spills[1]), "spill_loads": int(spills[2])}


def report(case: Case, compiler: Compiler) -> list[Row]:
    rows = []
    for launch in launches(case):
        m = launch.meta
        name = launch.kernel.fn.__name__.strip("_").removesuffix("_kernel")
        mode = "+".join(part.lower() for part in ("GATE", "EXPAND", "DORA") if m.get(part)) or "-"
        for target in TARGETS:
            rows.append(Row(name, mode, target, case.dtype, case.tokens, case.rank, case.slices, case.hidden,
                            m["BLOCK_M"], m.get("BLOCK_N"), m["BLOCK_R"], m.get("BLOCK_K"), m["num_warps"],
                            **compiler.usage(launch, target)))
    return rows


COLUMNS = [("kernel", "kernel", "<12"), ("mode", "mode", "<16"), ("target", "target", "<6"), ("dtype", "dtype", "<5"),
           ("T", "tokens", ">5"), ("rank", "rank", ">4"), ("slices", "slices", "<7"), ("K", "hidden", ">5"),
           ("BM", "block_m", ">3"), ("BN", "block_n", ">3"), ("BR", "block_r", ">3"), ("BK", "block_k", ">3"),
           ("warps", "num_warps", ">5"), ("regs", "registers", ">4"), ("spill_st", "spill_stores", ">8"),
           ("spill_ld", "spill_loads", ">8"), ("smem", "shared", ">6")]


def print_table(rows: list[Row]) -> None:
    print(" ".join(f"{head:{align}}" for head, _, align in COLUMNS))
    for r in rows:
        cells = (getattr(r, field) for _, field, _ in COLUMNS)
        line = " ".join(f"{'-' if c is None else c:{align}}" for c, (_, _, align) in zip(cells, COLUMNS))
        print(line + (f"  FAILED: {r.error}" if r.error else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI subset")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--no-spills-up-to", type=int, metavar="T",
                        help="exit 1 if a launch with at most T tokens spills")
    args = parser.parse_args()
    import_repo()

    start, compiler = time.perf_counter(), Compiler()
    rows = [row for case in cases(args.quick) for row in report(case, compiler)]
    print_table(rows)
    failed = [r for r in rows if r.error]
    spilling = [r for r in rows if r.spills]
    print(f"\n{len(rows)} launches, {len(compiler.results)} compiles, {time.perf_counter() - start:.0f} s; "
          f"{len(failed)} failed; {len(spilling)} spill")
    for r in spilling:
        print(f"  spills: {r.label} ({r.spill_stores} B stored, {r.spill_loads} B loaded)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    bad = failed + [r for r in spilling if args.no_spills_up_to is not None and r.tokens <= args.no_spills_up_to]
    for r in bad:
        print(f"FAIL: {r.label}: {r.error or 'spills'}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
