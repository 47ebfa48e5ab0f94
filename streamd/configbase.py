"""What every part of the daemon's configuration shares: the strict frozen model, and config-relative paths."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def path_is(path: Path, kind: str) -> bool:
    """path.is_file() / is_dir(), and False (not a traceback) for a path the file system refuses (too long, ...)."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except OSError as exc:
        raise ValueError(f"{short_path(path)}: {exc.strerror}") from None


def short_path(path: Path) -> str:
    """A path for an error line: long ones are cut in the middle."""
    text = str(path)
    return text if len(text) <= 200 else f"{text[:120]}...{text[-60:]} ({len(text)} characters)"


def resolve_path(value: Path, info: ValidationInfo) -> Path:
    """A path relative to the config file's folder (the validation context's base_dir)."""
    base_dir = Path((info.context or {}).get("base_dir", "."))
    return Path(os.path.abspath(base_dir / value))
