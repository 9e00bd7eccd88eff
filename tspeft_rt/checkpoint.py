"""Checkpoints and run logs that survive a crash or SIGKILL: the last good checkpoint is never corrupted,
and a log loses at most the line being written.

    <output_dir>/checkpoints/step-000100/
        adapter.safetensors   adapter tensors under module paths (A, B, magnitude, token_gate.tau)
        trainer.pt            optimizer, scheduler, threshold controller, RNG states (tensors only;
                              read with torch.load(weights_only=True))
        meta.json             step, config, per-module keep rates
    <output_dir>/checkpoints/latest   name of the newest complete checkpoint

A checkpoint is written into a temporary folder, fsynced and renamed into place; only then does
`latest` move (write + fsync + rename). A half-written folder is never named by `latest`.

The run logs (<output_dir>/metrics.jsonl, gate_stats.jsonl) hold one JSON object per line, each with
its integer `step`. Appending is not atomic, so a kill can cut the last line short; readers leave such
a torn line out, and a resumed run rewrites the log (atomically) without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from tspeft_rt.config import is_positive_int, is_rate
from tspeft_rt.errors import CheckpointError, parse_json, read_json, read_text, shown

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
    name = read_text(pointer, CheckpointError).strip()
    if not re.fullmatch(r"step-\d+", name):
        raise CheckpointError(f"{pointer}: expected the name of a checkpoint folder (step-NNNNNN), found {shown(name)}")
    path = root / "checkpoints" / name
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
    except Exception as e:  # noqa: BLE001 - corrupt files raise many types
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable: {type(e).__name__}: {e}") from None
    return adapter, trainer, read_meta(path)


def read_meta(path: Path) -> dict:
    """meta.json of the checkpoint folder `path`, with `step`, `config` and `keep_rates` of the types written."""
    mfile = path / "meta.json"
    meta = read_json(mfile, CheckpointError)
    keep_rates = meta.get("keep_rates", {})
    checks = (("step", is_positive_int(meta.get("step")), "an integer > 0"),
              ("config", isinstance(meta.get("config"), dict), "an object"),
              ("keep_rates", isinstance(keep_rates, dict) and all(map(is_rate, keep_rates.values())),
               "an object {module: keep rate in [0, 1]}"))
    for key, ok, expected in checks:
        if not ok:
            raise CheckpointError(f"{mfile}: key {key!r} must be {expected}, found {shown(meta.get(key, '<missing>'))}")
    return meta


# ---- run logs --------------------------------------------------------------------------------
class RunLog(NamedTuple):
    records: list[dict]
    torn: bool  # the last line was cut short (a kill during its append) and is left out


def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(_log_line(record))


def rewrite_log(path: Path, records: list[dict]) -> None:
    """Replace a run log atomically: a kill leaves the old or the new one, never a mix or nothing."""
    atomic_write_text(path, "".join(map(_log_line, records)))


def read_log(path: Path) -> RunLog:
    """The records of a run log. Only the last line can be torn (see the module's docstring); a bad line
    before it is damage that raises CheckpointError naming the file and line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    *lines, last = data.split(b"\n")  # `last` is empty when the file ends with its newline
    records = [_log_record(line, f"{path}:{i}") for i, line in enumerate(lines, 1) if line.strip()]
    if not last.strip():
        return RunLog(records, torn=False)
    try:  # a record complete but for its newline is kept
        records.append(_log_record(last, f"{path}:{len(lines) + 1}"))
    except CheckpointError:
        return RunLog(records, torn=True)
    return RunLog(records, torn=False)


def _log_line(record: dict) -> str:
    return json.dumps(record) + "\n"


def _log_record(line: bytes, where: str) -> dict:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: not UTF-8 text; expected a JSON object per line") from None
    record = parse_json(text, where, CheckpointError)
    if not (isinstance(record, dict) and is_positive_int(record.get("step"))):
        raise CheckpointError(f"{where}: expected a JSON object with an integer 'step' > 0, found {shown(record)}")
    return record
