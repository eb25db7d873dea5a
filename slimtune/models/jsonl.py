"""JSONL files (one JSON object a line), read with errors that name the file and the line: the data format of
``slimtune train`` and ``slimtune allocate``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError


def read_jsonl(path: str | Path, what: str = "--data") -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line; :class:`DataError` for a missing or empty file, a
    line that is not JSON or not an object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{what} {path}: cannot read it ({exc.strerror})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({getattr(exc, 'msg', exc)}, column "
                            f"{getattr(exc, 'colno', '?')})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        records.append((number, value))
    if not records:
        raise DataError(f"{what} {path} is empty: no JSON lines")
    return records
