"""Errors that the CLI reports as one clear line and a non-zero exit, never as a traceback, and the
guarded readers of users' files that raise them where a parser would raise its own exception.

    config = read_json(path / "adapter_config.json", AdapterError)    # a dict, or AdapterError naming the file
"""

from __future__ import annotations

import json
import reprlib
import sys
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 16 << 20
"""Largest config or metadata file read: bigger ones are mistakes, refused before they fill memory."""

MAX_DEPTH = 100
"""Deepest nesting accepted in a parsed file: real ones nest a few levels, and code that walks a value
recursively (json.dumps, repr) fails near Python's recursion limit of about 1000."""


class TspeftError(Exception):
    """Bad input or a stopped run: the message names the file, key or option and what was expected."""


class ConfigError(TspeftError):
    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key  # the config key at fault, so that the message can name where it was set


class DataError(TspeftError):
    pass


class ModelError(TspeftError):
    pass


class CheckpointError(TspeftError):
    pass


class TrainingDiverged(TspeftError):
    pass


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 60


def shown(value: Any) -> str:
    """repr(value) cut to one short line, also for huge, deeply nested or self-containing values."""
    return _SHORT.repr(value)


def read_text(path: Path, error: type[TspeftError]) -> str:
    """A user's UTF-8 text file of at most MAX_FILE_BYTES."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # bounded: a huge file or a device never fills memory
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise error(f"{path}: larger than {MAX_FILE_BYTES >> 20} MiB; expected a small text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def parse_json(text: str, where: str, error: type[TspeftError]) -> Any:
    """JSON whose every defect, including ones json.loads reports as RecursionError or ValueError,
    raises `error` naming `where`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError:  # json.loads converts integers only up to Python's digit limit
        raise error(f"{where}: not valid JSON (an integer of more than {sys.get_int_max_str_digits()} "
                    "digits)") from None
    except RecursionError:
        raise error(f"{where}: nested deeper than {MAX_DEPTH} levels") from None
    check_tree(value, where, error)
    return value


def read_json(path: Path, error: type[TspeftError]) -> dict:
    """A user's JSON file holding one object."""
    value = parse_json(read_text(path, error), str(path), error)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def check_tree(value: Any, where: str, error: type[TspeftError]) -> None:
    """Refuse a parsed value nested deeper than MAX_DEPTH, or holding a string that cannot be printed or
    used as a path (an unpaired surrogate escape such as \\ud800, which JSON and YAML both allow).
    A container met twice (a YAML alias) is walked once."""
    seen: set[int] = set()
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise error(f"{where}: string {shown(v)} holds an unpaired surrogate escape; expected "
                            "Unicode text") from None
        elif isinstance(v, (dict, list)) and id(v) not in seen:
            if depth == MAX_DEPTH:
                raise error(f"{where}: nested deeper than {MAX_DEPTH} levels")
            seen.add(id(v))
            stack.extend((c, depth + 1) for c in ([*v, *v.values()] if isinstance(v, dict) else v))
