"""The output directory of a run: ``run.json`` (its settings), ``log.jsonl`` (one line per logged step and
evaluation), its checkpoints and the final adapter.

A directory that holds another run is refused unless ``--resume`` is given, and a resumed run must keep every
setting that changes what it computes (:meth:`TrainConfig.changes_from`); the data, eval-data and rank files are
compared by content (SHA-256), so they may move but not change.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..version import __version__
from .config import TrainConfig

RUN_NAME = "run.json"
LOG_NAME = "log.jsonl"


def file_digest(path: str | None) -> str | None:
    """SHA-256 of a file's bytes (``None`` for no file); of a folder (latents shards): of its ``.safetensors`` files'
    names and bytes, in name order."""
    if path is None or path == "auto":
        return path
    digest = hashlib.sha256()
    folder = Path(path).is_dir()
    for file in sorted(Path(path).glob("*.safetensors")) if folder else [Path(path)]:
        if folder:
            digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprints(cfg: TrainConfig) -> dict[str, str | None]:
    return {"data": file_digest(cfg.data), "eval_data": file_digest(cfg.eval_data), "ranks": file_digest(cfg.ranks)}


class RunDir:
    """``OUT``: what it holds, and the run record and log in it."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out)
        self.run_file = self.path / RUN_NAME
        self.log_file = self.path / LOG_NAME

    def recorded(self) -> dict[str, Any] | None:
        if not self.run_file.is_file():
            return None
        try:
            value = json.loads(self.run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.run_file}: cannot read it ({exc}); it is not a slimtune run record") from None
        return value if isinstance(value, dict) else None

    def check(self, cfg: TrainConfig, prints: dict[str, str | None]) -> bool:
        """Refuse an output directory this run cannot use; returns whether it holds this run (to resume)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path} exists and is not a directory")
        recorded = self.recorded()
        if recorded is None:
            if path.is_dir() and any(p.name != LOG_NAME for p in path.iterdir()):
                raise ConfigError(f"--out {path} is not empty and holds no slimtune run: choose a new or empty "
                                  "directory")
            return False
        if not cfg.resume:
            raise ConfigError(f"--out {path} holds another run ({RUN_NAME}): pass --resume to continue it, or "
                              "choose another --out")
        changes = cfg.changes_from(recorded.get("config", {}))
        changes += [f"{key} file content changed" for key, value in prints.items()
                    if recorded.get("fingerprints", {}).get(key) != value]
        if changes:
            raise ConfigError(f"--resume: the settings differ from the run in {path}: " + "; ".join(changes))
        return True

    def start(self, cfg: TrainConfig, prints: dict[str, str | None], extra: dict[str, Any]) -> None:
        """Write ``run.json`` (main process, fresh run)."""
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"slimtune_version": __version__, "config": cfg.to_dict(), "fingerprints": prints, **extra}
        self.run_file.write_text(json.dumps(record, indent=1), encoding="utf-8")
        self.log_file.write_text("", encoding="utf-8")

    def trim_log(self, step: int) -> None:
        """Drop log lines of steps after ``step`` (those a resumed run repeats)."""
        if not self.log_file.is_file():
            return
        kept = [line for line in self.log_file.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.log_file.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        with self.log_file.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
