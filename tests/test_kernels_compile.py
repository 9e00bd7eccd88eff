"""The Triton serving kernels compile for sm_90a and sm_80 without spilling at decode shapes: the
quick subset of `tools/kernel_report.py` (ahead-of-time compiles and ptxas, no GPU; about 50 s on
2 cores with a cold Triton cache, 10 s warm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
DECODE_TOKENS = 128


def _has_ptxas() -> bool:
    try:  # the wheel's ptxas (or TRITON_PTXAS_PATH), as Triton finds it; sm_90a uses the newer one
        return all(tool.path for tool in (triton.knobs.nvidia.ptxas, triton.knobs.nvidia.ptxas_blackwell))
    except RuntimeError:
        return False


@pytest.mark.skipif(not _has_ptxas(), reason="no ptxas (Triton's NVIDIA backend)")
def test_kernels_compile_without_decode_spills(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    # The conftest turns the interpreter on for this process; the compiler must not see it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_report.py"), "--quick", "--json", str(out),
                           "--no-spills-up-to", str(DECODE_TOKENS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    rows = json.loads(out.read_text())
    seen = {(r["kernel"], r["target"], r["dtype"]) for r in rows}
    assert seen >= {(k, t, d) for k in ("shrink", "gated_expand") for t in ("sm_90a", "sm_80") for d in ("fp16", "bf16")}
    assert not [r for r in rows if r["error"]]
    assert {r["rank"] for r in rows} >= {16, 64} and any(r["tokens"] > DECODE_TOKENS for r in rows)
    spilling = [r for r in rows if r["tokens"] <= DECODE_TOKENS and (r["spill_stores"] or r["spill_loads"])]
    assert not spilling, spilling
