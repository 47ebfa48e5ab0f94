"""What every part of the daemon's configuration shares: the strict frozen model, and config-relative paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo


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
    """A path relative to the config file's folder (the validation context's base_dir); a NUL byte is refused
    (no file system takes one: every open of the path would fail)."""
    if "\0" in str(value):
        raise ValueError("a path cannot hold a NUL byte")
    base_dir = Path((info.context or {}).get("base_dir", "."))
    return Path(os.path.abspath(base_dir / value))


def _not_empty(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("an empty folder name would mean the config's own folder: give the folder")
    return value


Folder = Annotated[Path, BeforeValidator(_not_empty)]  # a folder setting: "" refused (Path("") is ".")
