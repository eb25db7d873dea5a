"""Helpers the benchmark scripts share: importing slimtune from this checkout, $OUT files, markdown."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

#: a UNet lean threshold (``slimtune.core.lean_layers.UNET_LEAN_BYTES``) past any tensor: no lean layer at all
NO_LEAN_BYTES = 2**62

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout, installed or not
    sys.path.insert(0, str(REPO_ROOT))


def out_dir() -> Path | None:
    """``$OUT`` (created if missing) when set, else ``None``."""
    out = os.environ.get("OUT")
    if not out:
        return None
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


class JsonlSink:
    """Appends one JSON line per record to ``$OUT/<name>`` (when ``$OUT`` is set), flushing each line."""

    def __init__(self, name: str) -> None:
        directory = out_dir()
        self.path = directory / name if directory is not None else None
        if self.path is not None:
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")


def write_out_text(name: str, text: str) -> Path | None:
    """Write ``$OUT/<name>`` when ``$OUT`` is set."""
    directory = out_dir()
    if directory is None:
        return None
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_line() -> str:
    """Python, torch, transformers, peft versions and the GPU (or CPU), without importing transformers/peft."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    return (f"python {platform.python_version()} · torch {torch.__version__} · transformers "
            f"{package_version('transformers')} · peft {package_version('peft')} · {device}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"
