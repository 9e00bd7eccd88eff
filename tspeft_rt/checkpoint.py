"""Checkpoints written atomically: a crash or SIGKILL never corrupts the last good one.

    <output_dir>/checkpoints/step-000100/
        adapter.safetensors   adapter tensors under module paths (A, B, magnitude, token_gate.tau)
        trainer.pt            optimizer, scheduler, threshold controller, RNG states (tensors only;
                              read with torch.load(weights_only=True))
        meta.json             step, config, per-module keep rates
    <output_dir>/checkpoints/latest   name of the newest complete checkpoint

A checkpoint is written into a temporary folder, fsynced and renamed into place; only then does
`latest` move (write + fsync + rename). A half-written folder is never named by `latest`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tspeft_rt.errors import CheckpointError

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(root: Path, step: int, adapter: dict[str, torch.Tensor], trainer: dict, meta: dict,
                    keep: int) -> Path:
    """Write step-<step> under root/checkpoints atomically, point `latest` at it, prune old ones."""
    ckpts = root / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=ckpts))
    try:
        save_file({k: v.contiguous() for k, v in adapter.items()}, tmp / "adapter.safetensors")
        torch.save(trainer, tmp / "trainer.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(ckpts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(ckpts / LATEST, final.name)
    _prune(ckpts, keep, final.name)
    return final


def _prune(ckpts: Path, keep: int, newest: str) -> None:
    done = sorted(p for p in ckpts.glob("step-*") if p.is_dir())
    for p in done[: max(0, len(done) - max(1, keep))]:
        if p.name != newest:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpts.glob(".step-*"):  # leftovers of a killed write
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = root / "checkpoints" / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer}: names {path.name!r}, which does not exist")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(adapter tensors, trainer state, meta) of a checkpoint folder."""
    for name in ("adapter.safetensors", "trainer.pt", "meta.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r}: missing {name}")
    try:
        adapter = load_file(path / "adapter.safetensors")
        trainer = torch.load(path / "trainer.pt", weights_only=True)
        meta = json.loads((path / "meta.json").read_text())
    except Exception as e:  # noqa: BLE001 - corrupt files raise many types
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable: {type(e).__name__}: {e}") from None
    return adapter, trainer, meta
